"""Key estimation: the MIREX weighted score.

Conventions
-----------
Keys are strings ``'<tonic> <mode>'`` as ``mir_eval.key`` reads them: the tonic one of C, C#, Db,
D, D#, Eb, E, F, F#, Gb, G, G#, Ab, A, A#, Bb, B (case-insensitive; enharmonic spellings are one
pitch class) and the mode ``major`` or ``minor``. An estimate is ``None`` when the answer named no
key (see :func:`llark.evaluate.parse.parse_key`); it scores 0 and is counted as unparseable.

Metrics
-------
The MIREX weighted score (MIREX Audio Key Detection; LLark Table 4; CMI-Bench uses
``mir_eval.key.weighted_score``), per item, averaged over items:

=========================================================  =====
relationship of the estimate to the reference              score
=========================================================  =====
same tonic and mode                                        1.0
same mode, tonic a perfect fifth *above* the reference     0.5
relative major/minor (same key signature)                  0.3
parallel major/minor (same tonic)                          0.2
anything else, or no key in the answer                     0.0
=========================================================  =====

``allow_descending_fifths=False`` is the default because it is the table both papers report
(and the only rule of ``mir_eval`` 0.8); MIREX has also credited a fifth below since 2017, which
``allow_descending_fifths=True`` gives. ``evaluate`` also reports exact accuracy (Clopper-Pearson
interval) and the share of each relationship. The mean weighted score gets a bootstrap interval:
it is not a proportion, so a binomial interval does not apply.

Krumhansl, "Cognitive Foundations of Musical Pitch", 1990;
https://www.music-ir.org/mirex/wiki/2021:Audio_Key_Detection
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from llark.evaluate import stats
from llark.evaluate.parse import CANONICAL_TONIC, key_label, parse_key
from llark.evaluate.tasks import Task, columns, each, label, register

MODES = ("major", "minor")
_TONICS = {"c": 0, "c#": 1, "db": 1, "d": 2, "d#": 3, "eb": 3, "e": 4, "f": 5, "f#": 6, "gb": 6, "g": 7,
           "g#": 8, "ab": 8, "a": 9, "a#": 10, "bb": 10, "b": 11}
RELATIONSHIPS = ("correct", "fifth", "relative", "parallel", "other", "unparseable")
SCORES = {"correct": 1.0, "fifth": 0.5, "relative": 0.3, "parallel": 0.2, "other": 0.0, "unparseable": 0.0}


def split_key(key: str) -> tuple[int, str]:
    """``'Eb minor'`` → ``(3, 'minor')``; ValueError naming the string when it is not a key."""
    if not isinstance(key, str):
        raise ValueError(f"key must be a string, got {key!r}")
    parts = key.split()
    if len(parts) != 2 or parts[0].lower() not in _TONICS or parts[1].lower() not in MODES:
        raise ValueError(f"{key!r} is not a key: expected '<tonic> <major|minor>' with the tonic one of "
                         "C, C#, Db, D, D#, Eb, E, F, F#, Gb, G, G#, Ab, A, A#, Bb, B")
    return _TONICS[parts[0].lower()], parts[1].lower()


def validate(reference_keys: Sequence[str], estimated_keys: Sequence[str | None]) -> None:
    """Raise ValueError for a malformed key or unequal lengths; None estimates are allowed."""
    if len(reference_keys) != len(estimated_keys):
        raise ValueError(f"{len(reference_keys)} reference keys but {len(estimated_keys)} estimates")
    for key in reference_keys:
        split_key(key)
    for key in estimated_keys:
        if key is not None:
            split_key(key)


def relationship(reference_key: str, estimated_key: str | None, allow_descending_fifths: bool = False) -> str:
    """How the estimate relates to the reference: one of :data:`RELATIONSHIPS`."""
    if estimated_key is None:
        return "unparseable"
    ref_pc, ref_mode = split_key(reference_key)
    est_pc, est_mode = split_key(estimated_key)
    interval = (est_pc - ref_pc) % 12
    if interval == 0 and est_mode == ref_mode:
        return "correct"
    if est_mode == ref_mode and (interval == 7 or (allow_descending_fifths and interval == 5)):
        return "fifth"
    if ref_mode == "major" and est_mode == "minor" and interval == 9:
        return "relative"
    if ref_mode == "minor" and est_mode == "major" and interval == 3:
        return "relative"
    if interval == 0:
        return "parallel"
    return "other"


def weighted_score(reference_key: str, estimated_key: str | None, allow_descending_fifths: bool = False) -> float:
    """The MIREX weighted score of one estimate (see the module table)."""
    return SCORES[relationship(reference_key, estimated_key, allow_descending_fifths)]


def evaluate(reference_keys: Sequence[str], estimated_keys: Sequence[str | None],
             allow_descending_fifths: bool = False) -> dict:
    """``{"mirex": Estimate, "accuracy": Estimate, "fraction_<relationship>": float, ...}``."""
    validate(reference_keys, estimated_keys)
    if not reference_keys:
        raise ValueError("no keys to evaluate")
    kinds = [relationship(r, e, allow_descending_fifths) for r, e in zip(reference_keys, estimated_keys)]
    counts = Counter(kinds)
    out: dict = {
        "mirex": stats.mean([SCORES[k] for k in kinds]),
        "accuracy": stats.accuracy([k == "correct" for k in kinds]),
    }
    for kind in RELATIONSHIPS:
        out[f"fraction_{kind}"] = counts[kind] / len(kinds)
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation task

ALL_KEYS = [f"{t} major" for t in CANONICAL_TONIC] + [f"{t} minor" for t in CANONICAL_TONIC]


def reference(record) -> str | None:
    """The clip's key (its labels' ``key``)."""
    key = label(record, "key")
    return " ".join(key.split()) if isinstance(key, str) else None


def score(rows, context) -> tuple[list[dict], dict]:
    refs, parsed = columns(rows)
    return [{"score": weighted_score(r, p)} for r, p in zip(refs, parsed)], evaluate(refs, parsed)


def canonical(key: str | None) -> str | None:
    """One spelling per key (``'D# minor'`` → ``'Eb minor'``), None kept."""
    return None if key is None else key_label(*split_key(key))


def confusion(rows, metrics) -> tuple[list[str], list, list]:
    refs, parsed = columns(rows)
    return ALL_KEYS, [canonical(r) for r in refs], [canonical(p) for p in parsed]


TASK = register(Task(name="key", prompt="What is the key of this song?", reference=reference, parse=each(parse_key),
                     score=score, headline=("mirex", "accuracy"), confusion=confusion))
