"""Metre: beats per bar (the demo data's question; not a task of the LLark paper).

Conventions
-----------
The reference is the number of beats in a bar (3 for 3/4, 4 for 4/4). An answer is read with
:func:`llark.evaluate.parse.parse_metre`: a time signature's numerator, except compound metres,
whose beats are dotted (6/8 → 2, 9/8 → 3, 12/8 → 4), or "N beats per bar", "triple metre". An
answer with none of these is unparseable and wrong.

Metrics
-------
**accuracy**: the estimate equals the reference, with a 95% Clopper-Pearson interval.
"""

from __future__ import annotations

from typing import Sequence

from llark.evaluate import stats
from llark.evaluate.parse import parse_metre
from llark.evaluate.tasks import Task, columns, each, label, register


def validate(reference_beats_per_bar: Sequence[int], estimated_beats_per_bar: Sequence[int | None]) -> None:
    """Raise ValueError for unequal lengths or a count that is not a positive integer."""
    if len(reference_beats_per_bar) != len(estimated_beats_per_bar):
        raise ValueError(f"{len(reference_beats_per_bar)} references but {len(estimated_beats_per_bar)} estimates")
    for kind, values in (("reference", reference_beats_per_bar), ("estimated", estimated_beats_per_bar)):
        for v in values:
            if v is None and kind == "estimated":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{kind} beats per bar {v!r} must be a positive integer")


def evaluate(reference_beats_per_bar: Sequence[int], estimated_beats_per_bar: Sequence[int | None]) -> dict:
    """``{"accuracy": Estimate}``."""
    validate(reference_beats_per_bar, estimated_beats_per_bar)
    if not reference_beats_per_bar:
        raise ValueError("no metres to evaluate")
    return {"accuracy": stats.accuracy([r == e for r, e in zip(reference_beats_per_bar, estimated_beats_per_bar)])}


# ---------------------------------------------------------------------------------------------
# The evaluation task


def reference(record) -> int | None:
    """The clip's beats per bar (its labels' ``beats_per_bar``)."""
    n = label(record, "beats_per_bar")
    return int(n) if isinstance(n, int) and n > 0 else None


def score(rows, context) -> tuple[list[dict], dict]:
    refs, parsed = columns(rows)
    return [{"score": float(r == p)} for r, p in zip(refs, parsed)], evaluate(refs, parsed)


TASK = register(Task(name="metre", prompt="What is the time signature of this song?", reference=reference,
                     parse=each(parse_metre), score=score, headline=("accuracy",)))
