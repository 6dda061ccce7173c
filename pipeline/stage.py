"""A stage as the runner sees it (``Stage``: a named per-item function, its settings and optional
per-worker setup and batch function), and how one item or one batch of items is run into an
outcome, in whatever process an executor chooses."""

from __future__ import annotations

import errno
import json
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import InvalidRecord, ItemError, StageConfigError
from pipeline.files import describe_os_error, is_disk_failure
from pipeline.records import check_id

log = logging.getLogger("llark")


@dataclass(frozen=True)
class Stage:
    """A named per-item function and what it needs.

    ``process(row, state)`` maps one input row (a dict) to one output row or a list of them.
    ``state`` is ``setup(settings)`` when ``setup`` is given (called once per worker, e.g. to load a
    model), else ``settings`` itself. ``settings`` must be picklable and is recorded, as JSON, in
    the ledger so that a rerun with other settings is refused; a settings object with a
    ``ledger_json()`` method records that instead (leaving out what cannot change the results,
    such as how many items share a model call). The functions must be importable module-level
    functions (they travel to worker processes).

    ``process_batch(rows, state)``, when given, does the work of ``process`` for several rows at
    once and returns one result per row, in order: what ``process`` would return, or the exception
    that row failed with. Executors call it on up to ``batch_size`` consecutive items (``process``
    still serves single items and the one-at-a-time rerun of a batch that failed as a whole). The
    batch size is not a setting: a rerun with another batch size resumes the same ledger.
    """

    name: str
    process: Callable[[dict, Any], dict | list[dict]]
    settings: Any = None
    setup: Callable[[Any], Any] | None = None
    process_batch: Callable[[list[dict], Any], list[Any]] | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise StageConfigError(f"--batch-size must be at least 1, got {self.batch_size!r}")

    @property
    def batched(self) -> bool:
        return self.process_batch is not None and self.batch_size > 1

    def chunks(self, items: list) -> list[list]:
        """``items`` cut into the consecutive runs that executors hand over together."""
        size = self.batch_size if self.batched else 1
        return [items[i : i + size] for i in range(0, len(items), size)]

    def settings_json(self) -> Any:
        s = self.settings
        if s is None:
            return None
        if hasattr(s, "ledger_json"):
            return s.ledger_json()
        if hasattr(s, "model_dump"):
            return s.model_dump(mode="json")
        if hasattr(s, "__dataclass_fields__"):
            from dataclasses import asdict

            return json.loads(json.dumps(asdict(s), default=str))
        return json.loads(json.dumps(s, default=str))


# ---------------------------------------------------------------------------------------------
# Running one item (in whatever process the executor chooses)


def run_item(process: Callable, row: dict, state: Any) -> dict:
    """Run the per-item function on one row and return a ledger outcome (never raises).

    The outcome carries the item's CPU and wall seconds (``cpu_s``, ``wall_s``), kept in the
    ledger so that ``llark plan`` can size a full run from measured figures.
    """
    cpu0, wall0 = time.process_time(), time.perf_counter()
    outcome = _run_item(process, row, state)
    outcome["cpu_s"] = round(time.process_time() - cpu0, 4)
    outcome["wall_s"] = round(time.perf_counter() - wall0, 4)
    return outcome


def _run_item(process: Callable, row: dict, state: Any) -> dict:
    try:
        result = process(row, state)
    except Exception as exc:
        return failure_outcome(exc)
    return result_outcome(result)


def result_outcome(result: Any) -> dict:
    """The ledger outcome of what a per-item function returned (or an exception it returned)."""
    if isinstance(result, BaseException):
        return failure_outcome(result)
    try:
        outputs = result if isinstance(result, list) else [result]
        for out in outputs:
            if not isinstance(out, dict):
                raise TypeError(f"the stage returned a {type(out).__name__}, not a dict")
            check_id(out.get("id"))
    except Exception as exc:
        return failure_outcome(exc)
    return {"ok": True, "outputs": outputs}


def failure_outcome(exc: BaseException) -> dict:
    """The ledger outcome of an item that failed with ``exc``."""
    if isinstance(exc, ItemError):
        return {"ok": False, "code": exc.code, "reason": str(exc)}
    if isinstance(exc, InvalidRecord):
        return {"ok": False, "code": "invalid_record", "reason": str(exc)}
    if isinstance(exc, MemoryError):
        return {"ok": False, "code": "out_of_memory", "reason": "ran out of memory on this item"}
    if is_disk_failure(exc):
        return {"ok": False, "fatal": True, "code": "disk_full" if exc.errno != errno.EROFS else "read_only",
                "reason": describe_os_error(exc)}
    # a bug or an unforeseen input: keep the traceback for the report
    return {
        "ok": False,
        "code": f"exception:{type(exc).__name__}",
        "reason": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8)),
    }


def run_batch(stage: Stage, rows: list[dict], state: Any) -> list[dict]:
    """Outcomes of ``rows``, in order (never raises): one ``process_batch`` call for a batched
    stage, else ``run_item`` per row. A batch call that raises, or does not return one result per
    row, is rerun one row at a time, so that only the row at fault fails. The batch's CPU and wall
    seconds are shared equally among its rows."""
    if not stage.batched or len(rows) < 2:
        return [run_item(stage.process, row, state) for row in rows]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        results = stage.process_batch(rows, state)
        if not isinstance(results, list) or len(results) != len(rows):
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise TypeError(f"process_batch returned {got} results for {len(rows)} rows")
    except Exception as exc:
        log.warning("%s: a batch of %d items failed as a whole (%s: %s); running them one at a time",
                    stage.name, len(rows), type(exc).__name__, exc)
        return [run_item(stage.process, row, state) for row in rows]
    cpu_s = round((time.process_time() - cpu0) / len(rows), 4)
    wall_s = round((time.perf_counter() - wall0) / len(rows), 4)
    return [{**result_outcome(result), "cpu_s": cpu_s, "wall_s": wall_s} for result in results]


def run_chunks(stage: Stage, rows: list[dict], state: Any) -> list[dict]:
    """Outcomes of ``rows``, in order, running them in the stage's batches (``run_batch``)."""
    return [outcome for chunk in stage.chunks(rows) for outcome in run_batch(stage, chunk, state)]

