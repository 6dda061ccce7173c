"""The evaluation tasks, one registry: each task's module (``key.py``, ``tempo.py``, ...) describes
itself as a :class:`Task` and registers it; :mod:`llark.evaluate.run` loops over the registry.

A task gives, with the same signature for every task:

- ``name`` and ``prompt`` (the question asked about every clip it applies to);
- ``reference(record)``: the reference of a clip record (JSON-serialisable), or None where the
  clip has none and is not asked;
- ``parse(rows, context)``: the value read out of each row's ``answer``, None where the answer
  holds none (unparseable);
- ``score(rows, context) -> (per row, metrics)``: the rows carry ``reference``, ``answer`` and
  ``parsed``; each per-row dict holds ``score`` and any further columns for the predictions file,
  ``metrics`` the task's ``evaluate()`` result;
- ``headline``: the metrics the summary table shows, in order; ``max_new_tokens``: the answer
  length the question needs; optionally ``vocabulary(record)`` (a label vocabulary the clip
  carries) and ``confusion(rows, metrics)`` (the report's confusion matrix: labels, references,
  predictions).

References come from a clip's normalised ``labels`` block (``pipeline.labels.Labels``, with label
vocabularies under ``labels["vocabularies"]``); for records written before labels existed, the
dataset's adapter derives the block from the annotations (``pipeline.ingest.labels_of``). No task
knows which dataset a clip came from.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from llark.errors import LlarkConfigError

# The built-in tasks' modules, in the order the command line lists them.
BUILT_IN = ("key", "tempo", "genre", "instruments", "captions", "beats", "metre")
DEFAULT_MAX_NEW_TOKENS = 64


class EvalConfigError(LlarkConfigError):
    """An evaluation that cannot run as asked; the message says what to change."""


@dataclass
class Context:
    """What a task's parser and scorer know beyond the rows of one (task, dataset) group."""

    dataset: str
    # The label vocabulary the evaluated clips carry for this task, when they carry one.
    vocabulary: list[str] | None = None
    # A text embedder ``texts -> [n, d]`` for tasks that compare answers by meaning; None: the task's default.
    embed: Callable[[list[str]], Any] | None = None
    # Facts a task reports once for the whole run (summary.json's top level), shared by every group.
    notes: dict[str, Any] = field(default_factory=dict)


Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    reference: Callable[[Any], Any]
    parse: Callable[[Rows, Context], list]
    score: Callable[[Rows, Context], tuple[list[dict], dict]]
    headline: tuple[str, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    vocabulary: Callable[[Any], list[str] | None] | None = None
    confusion: Callable[[Rows, dict], tuple[Sequence[str], list, list]] | None = None


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the registry (a second task of the same name is refused); returns it."""
    if REGISTRY.get(task.name, task) != task:
        raise ValueError(f"an evaluation task named {task.name!r} is already registered")
    REGISTRY[task.name] = task
    return task


def registered() -> list[Task]:
    """Every registered task: the built-in ones in their order, then the others as registered."""
    for module in BUILT_IN:
        importlib.import_module(f"llark.evaluate.{module}")
    order = {name: i for i, name in enumerate(BUILT_IN)}
    return sorted(REGISTRY.values(), key=lambda task: order.get(task.name, len(order)))


def names() -> list[str]:
    return [task.name for task in registered()]


def get(name: str) -> Task:
    known = names()
    if name not in known:
        raise EvalConfigError(f"unknown task {name!r}; choose from {', '.join(known)}")
    return REGISTRY[name]


# ---------------------------------------------------------------------------------------------
# Helpers for the tasks' modules


def _labels(record) -> Mapping[str, Any]:
    from pipeline.ingest import labels_of

    return labels_of(record).to_dict()


def label(record, name: str) -> Any | None:
    """The fact ``name`` of the record's ``labels`` block; None where it holds none."""
    return _labels(record).get(name)


def label_vocabulary(record, name: str) -> list[str] | None:
    """The vocabulary of the fact ``name`` that the record's ``labels`` block carries, if any."""
    vocabulary = (_labels(record).get("vocabularies") or {}).get(name)
    return list(vocabulary) if vocabulary else None


def each(read: Callable[[str], Any]) -> Callable[[Rows, Context], list]:
    """A task parser reading every answer on its own with ``read(answer)``."""
    return lambda rows, context: [read(row["answer"]) for row in rows]


def columns(rows: Rows) -> tuple[list, list]:
    """The rows' references and parsed values."""
    return [row["reference"] for row in rows], [row["parsed"] for row in rows]
