"""Beat tracking from a text answer: F-measure at a 20 ms window (CMI-Bench's protocol).

Conventions
-----------
Beat times are seconds from the start of the clip the model heard. The model is asked for a
comma-separated list ("0.1s, 1.19s, 2.25s, ..."); :func:`llark.evaluate.parse.parse_times`
keeps every number and sorts them (CMI-Bench drops non-numeric items and sorts the rest). An
answer with no number is unparseable and scores 0.

Metrics
-------
**f_measure**: ``mir_eval.beat.f_measure`` with ``f_measure_threshold=0.02`` (CMI-Bench, section
3.3; ``mir_eval``'s own default is 0.07 s), per item, averaged, with a 95% bootstrap interval.
Beats are not trimmed: ``mir_eval.beat.evaluate`` drops the first 5 s by default, CMI-Bench's
description does not, and on 10-25 s clips trimming would drop a large share of the beats;
``min_beat_time`` restores it.

Davies, Degara, Plumbley, "Evaluation methods for musical audio beat tracking algorithms",
Queen Mary University of London, Tech. Rep. C4DM-TR-09-06, 2009; Raffel et al., "mir_eval",
ISMIR 2014; Yuan et al., "CMI-Bench", 2025.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from llark.evaluate import stats
from llark.evaluate.parse import parse_times
from llark.evaluate.tasks import Task, columns, each, label, register

F_MEASURE_THRESHOLD = 0.02


def validate(reference_beats: Sequence[np.ndarray], estimated_beats: Sequence[np.ndarray | None]) -> None:
    """Raise ValueError for unequal lengths, or beat times that are negative, non-finite or not
    sorted (as ``mir_eval.util.validate_events``)."""
    if len(reference_beats) != len(estimated_beats):
        raise ValueError(f"{len(reference_beats)} reference beat lists but {len(estimated_beats)} estimates")
    for kind, lists in (("reference", reference_beats), ("estimated", estimated_beats)):
        for beats in lists:
            if beats is None:
                if kind == "reference":
                    raise ValueError("a reference beat list is None")
                continue
            b = np.asarray(beats, dtype=np.float64)
            if b.ndim != 1 or not np.isfinite(b).all() or (b < 0).any() or (np.diff(b) < 0).any():
                raise ValueError(f"{kind} beats must be a sorted 1-d array of non-negative seconds, got {beats!r}")


def f_measure(reference_beats: np.ndarray, estimated_beats: np.ndarray | None,
              threshold: float = F_MEASURE_THRESHOLD, min_beat_time: float = 0.0) -> float:
    """``mir_eval.beat.f_measure`` at ``threshold`` seconds; 0 for a missing estimate."""
    import mir_eval

    if estimated_beats is None:
        return 0.0
    ref = mir_eval.beat.trim_beats(np.asarray(reference_beats, dtype=np.float64), min_beat_time)
    est = mir_eval.beat.trim_beats(np.asarray(estimated_beats, dtype=np.float64), min_beat_time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mir_eval warns on an empty list; the score is 0
        return float(mir_eval.beat.f_measure(ref, est, f_measure_threshold=threshold))


def evaluate(reference_beats: Sequence[np.ndarray], estimated_beats: Sequence[np.ndarray | None],
             threshold: float = F_MEASURE_THRESHOLD, min_beat_time: float = 0.0) -> dict:
    """``{"f_measure": Estimate}`` (the mean of the items' F-measures)."""
    validate(reference_beats, estimated_beats)
    if not reference_beats:
        raise ValueError("no beat lists to evaluate")
    return {"f_measure": stats.mean([f_measure(r, e, threshold, min_beat_time)
                                     for r, e in zip(reference_beats, estimated_beats)])}


# ---------------------------------------------------------------------------------------------
# The evaluation task

PROMPT = ("Identify and list the timestamps of all beats in this audio track. Use the format of "
          "'0.0s,0.54s,1.0s, ...'")


def reference(record) -> list[float] | None:
    """The beat times in the clip (its labels' ``beats``, seconds from the clip start)."""
    beats = label(record, "beats")
    return [round(float(b), 6) for b in beats] if beats else None


def score(rows, context) -> tuple[list[dict], dict]:
    refs, parsed = columns(rows)
    refs = [np.array(r) for r in refs]
    parsed = [None if p is None else np.array(p) for p in parsed]
    return [{"score": f_measure(r, p)} for r, p in zip(refs, parsed)], evaluate(refs, parsed)


TASK = register(Task(name="beats", prompt=PROMPT, reference=reference, parse=each(parse_times), score=score,
                     headline=("f_measure",), max_new_tokens=384))
