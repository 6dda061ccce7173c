"""Global tempo estimation: Acc1 and Acc2.

Conventions
-----------
Tempi are in beats per minute, positive and finite. One reference tempo per item (GiantSteps
Tempo's 'v2' labels, with the tracks labelled 0 BPM dropped at ingestion). An estimate is
``None`` when the answer named no tempo (see :func:`llark.evaluate.parse.parse_tempo`); it is
wrong and counted as unparseable.

Metrics
-------
- **Acc1**: the estimate is within ``tol`` (4%) of the reference: ``|est - ref| <= tol * ref``.
- **Acc2**: the estimate is within ``tol`` of the reference times one of ``FACTORS`` (1/3, 1/2,
  1, 2, 3): octave errors and errors by a factor of three are forgiven. This is the metric the
  LLark paper reports (Table 2).

Both are accuracies, reported with 95% Clopper-Pearson intervals.

Gouyon, Klapuri, Dixon, Alonso, Tzanetakis, Uhle, Cano, "An experimental comparison of audio
tempo induction algorithms", IEEE TASLP 14(5), 2006 (Acc1, Acc2); Knees et al., "Two data sets
for tempo estimation and key detection in electronic dance music annotated from user
corrections", ISMIR 2015 (their use with GiantSteps Tempo).
"""

from __future__ import annotations

import math
from typing import Sequence

from llark.evaluate import stats
from llark.evaluate.parse import parse_tempo
from llark.evaluate.tasks import Task, columns, each, label, register

TOLERANCE = 0.04
FACTORS = (1 / 3, 1 / 2, 1.0, 2.0, 3.0)


def _check_tempo(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}={value!r} must be a positive, finite number of BPM")


def validate(reference_tempi: Sequence[float], estimated_tempi: Sequence[float | None]) -> None:
    """Raise ValueError for a non-positive or non-finite tempo, or unequal lengths."""
    if len(reference_tempi) != len(estimated_tempi):
        raise ValueError(f"{len(reference_tempi)} reference tempi but {len(estimated_tempi)} estimates")
    for t in reference_tempi:
        _check_tempo(t, "reference tempo")
    for t in estimated_tempi:
        if t is not None:
            _check_tempo(t, "estimated tempo")


def acc1(reference_tempo: float, estimated_tempo: float | None, tol: float = TOLERANCE) -> bool:
    """``|est - ref| <= tol * ref``; False for a missing estimate."""
    if estimated_tempo is None:
        return False
    return abs(estimated_tempo - reference_tempo) <= tol * reference_tempo + 1e-9


def acc2(reference_tempo: float, estimated_tempo: float | None, tol: float = TOLERANCE,
         factors: Sequence[float] = FACTORS) -> bool:
    """Acc1 against ``factor * ref`` for any of ``factors`` (1/3, 1/2, 1, 2, 3)."""
    if estimated_tempo is None:
        return False
    return any(acc1(f * reference_tempo, estimated_tempo, tol) for f in factors)


def evaluate(reference_tempi: Sequence[float], estimated_tempi: Sequence[float | None],
             tol: float = TOLERANCE) -> dict:
    """``{"acc1": Estimate, "acc2": Estimate}`` over the items."""
    validate(reference_tempi, estimated_tempi)
    if not reference_tempi:
        raise ValueError("no tempi to evaluate")
    return {
        "acc1": stats.accuracy([acc1(r, e, tol) for r, e in zip(reference_tempi, estimated_tempi)]),
        "acc2": stats.accuracy([acc2(r, e, tol) for r, e in zip(reference_tempi, estimated_tempi)]),
    }


# ---------------------------------------------------------------------------------------------
# The evaluation task


def reference(record) -> float | None:
    """The clip's tempo in BPM (its labels' ``tempo_bpm``)."""
    bpm = label(record, "tempo_bpm")
    return float(bpm) if isinstance(bpm, (int, float)) and bpm > 0 else None


def score(rows, context) -> tuple[list[dict], dict]:
    refs, parsed = columns(rows)
    per_row = [{"score": float(acc2(r, p)), "acc1": acc1(r, p)} for r, p in zip(refs, parsed)]
    return per_row, evaluate(refs, parsed)


TASK = register(Task(name="tempo", prompt="What is the tempo of this song?", reference=reference,
                     parse=each(parse_tempo), score=score, headline=("acc2", "acc1")))
