"""The one runner behind every offline stage.

A stage is a per-item function of one input record; the runner does everything else:

- reads the input JSONL (a malformed line, a missing or unsafe id, or a duplicate id becomes an error
  record, not a crash);
- skips the items a previous run already finished (resume), keyed by the input record's ``id``;
- runs the rest on an executor (local worker processes by default), showing items done, rate and ETA;
- turns each item's failure into an error record (id, stage, code, reason) and goes on;
- writes the output and error files atomically, in input order whatever the number of workers,
  and ends with a summary (done, skipped, failed by reason).

Progress is kept in a ledger beside the output (``OUTPUT.ledger``): one JSON line per finished input
item, appended and flushed as items finish. A killed run leaves at most a torn last line, which the
next run discards. The output file itself is only ever replaced whole (written to a temporary file,
then renamed), so a reader never sees half of it. Temporary files are named ``.NAME.tmp-PID``; the
next run on the same output removes those a killed run left (whose process is gone). The ledger's
first line records the stage's settings; a rerun with different settings refuses to mix the two.
A full or read-only disk, met by an item or by the runner itself, ends the run with ``RunAborted``.

Executors only see ``Stage`` objects and lists of ``(index, row)``; a distributed executor (Ray)
plugs in beside ``LocalExecutor`` without touching the per-item functions.

A stage whose work batches well (a model on a GPU) may also give ``process_batch`` and a
``batch_size``: executors then hand it up to ``batch_size`` consecutive items at once, and
everything above stays per item (ledger, error records, order, progress, resume). A batch call that
fails as a whole, or whose worker dies, is rerun one item at a time through ``process``, so only
the item at fault becomes an error record.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import json
import logging
import multiprocessing
import os
import re
import secrets
import socket
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Protocol

from pipeline.files import (AppendLog, atomic_write, describe_os_error, is_disk_failure, pid_alive,
                            remove_dead_temporaries, temporary_path)
from pipeline.errors import InvalidRecord, ItemError, OutputLocked, RunAborted, StageConfigError  # noqa: F401
from pipeline.records import check_id, iter_jsonl, to_json_line

log = logging.getLogger("llark")

LEDGER_VERSION = 1
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def disk_remedy(read_only: bool = False) -> str:
    """What to do before rerunning a run that a full (or read-only) disk stopped."""
    return f"{'make the disk writable' if read_only else 'free space'} and rerun the same command to go on"


def stopped_by_disk(stage: str, exc: OSError, kept: str) -> RunAborted:
    """The error that ends a run whose disk failed (``is_disk_failure``); ``kept`` says what is safe."""
    return RunAborted(f"{stage} stopped: {describe_os_error(exc)}. {kept}; {disk_remedy(exc.errno == errno.EROFS)}.")


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


# ---------------------------------------------------------------------------------------------
# Executors


class Executor(Protocol):
    """Runs a stage's per-item function over ``(index, row)`` pairs, yielding ``(index, outcome)``
    as items finish, in any order. Outcomes are what ``run_item`` returns. A batched stage's items
    go to ``run_batch`` in the runs ``Stage.chunks`` cuts, and come back one outcome per item."""

    workers: int

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]: ...


_WORKER_STATE: Any = None
_WORKER_STAGE: Stage | None = None


def _init_worker(stage: Stage) -> None:
    global _WORKER_STATE, _WORKER_STAGE
    _WORKER_STAGE = stage
    _WORKER_STATE = stage.setup(stage.settings) if stage.setup else stage.settings


def _run_in_worker(row: dict) -> dict:
    return run_item(_WORKER_STAGE.process, row, _WORKER_STATE)


def _run_batch_in_worker(rows: list[dict]) -> list[dict]:
    return run_batch(_WORKER_STAGE, rows, _WORKER_STATE)


def _worker_ready() -> bool:
    return True


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalExecutor:
    """Worker processes on this machine (``spawn``ed, one BLAS/OpenMP thread each).

    Workers receive one item at a time, or one batch of a batched stage; ``max_in_flight`` counts
    those (default: two per worker). A worker that dies (a segfault in native code, the OOM killer)
    breaks the pool; the items that were in flight, batches included, are then rerun one at a time
    in a one-worker pool, so the one that kills its worker again is recorded as ``worker_crashed``
    and the others finish normally.
    """

    def __init__(self, workers: int | None = None, max_in_flight: int | None = None):
        self.workers = workers or default_workers()
        self.max_in_flight = max_in_flight or self.workers * 2

    def _pool(self, stage: Stage, workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(stage,),
        )

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        saved = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
        for k in THREAD_ENV_VARS:
            os.environ[k] = "1"  # inherited by the spawned workers: N workers use N cores
        try:
            yield from self._run(stage, items)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        queue = list(reversed(stage.chunks(items)))
        suspects: list[tuple[int, dict]] = []
        while queue or suspects:
            if suspects:
                yield from self._run_isolated(stage, suspects)
                suspects = []
                continue
            pool = self._pool(stage, self.workers)
            in_flight: dict[cf.Future, list[tuple[int, dict]]] = {}
            try:
                while queue or in_flight:
                    broken = False
                    while queue and len(in_flight) < self.max_in_flight:
                        chunk = queue.pop()
                        try:
                            in_flight[pool.submit(_run_batch_in_worker, [row for _, row in chunk])] = chunk
                        except cf.process.BrokenProcessPool:  # a worker died since the last wait
                            queue.append(chunk)
                            broken = True
                            break
                    if not broken:
                        done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                        for fut in done:
                            chunk = in_flight.pop(fut)
                            try:
                                outcomes = fut.result()
                            except cf.process.BrokenProcessPool:
                                suspects.extend(chunk)
                                broken = True
                                continue
                            for (index, _), outcome in zip(chunk, outcomes):
                                yield index, outcome
                    if broken:
                        if not in_flight and not suspects:
                            raise RunAborted(self._setup_crash_message(stage))
                        for chunk in in_flight.values():
                            suspects.extend(chunk)
                        in_flight.clear()
                        log.warning(
                            "%s: a worker process died; rerunning the %d items that were in "
                            "flight one at a time to find the one that kills it",
                            stage.name,
                            len(suspects),
                        )
                        break
            finally:
                pool.shutdown(wait=not suspects, cancel_futures=True)

    @staticmethod
    def _setup_crash_message(stage: Stage) -> str:
        return (f"{stage.name}: worker processes die before running any item (the stage's per-worker "
                "setup crashes); rerun with --executor inline to see the error")

    def _run_isolated(self, stage: Stage, suspects: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        """One suspect at a time in a one-worker pool (set up once, and again after each crash)."""
        pool = None
        try:
            for index, row in sorted(suspects, key=lambda x: x[0]):
                if pool is None:
                    pool = self._pool(stage, 1)
                    try:
                        pool.submit(_worker_ready).result()
                    except cf.process.BrokenProcessPool:
                        raise RunAborted(self._setup_crash_message(stage)) from None
                try:
                    outcome = pool.submit(_run_in_worker, row).result()
                except cf.process.BrokenProcessPool:
                    outcome = {
                        "ok": False,
                        "code": "worker_crashed",
                        "reason": "the worker process died while processing this item "
                        "(a crash in native code or the out-of-memory killer)",
                    }
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = None
                yield index, outcome
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class InlineExecutor:
    """Runs items (or a batched stage's batches) in this process, one after another: for debugging
    and tiny inputs."""

    workers = 1

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        state = stage.setup(stage.settings) if stage.setup else stage.settings
        for chunk in stage.chunks(items):
            for (index, _), outcome in zip(chunk, run_batch(stage, [row for _, row in chunk], state)):
                yield index, outcome


def make_executor(name: str, workers: int | None = None, **ray_options: Any) -> Executor:
    """``local``, ``inline`` or ``ray`` (``ray_options`` go to ``pipeline.ray_executor.RayExecutor``)."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "inline":
        return InlineExecutor()
    if name == "ray":
        from pipeline.ray_executor import RayExecutor

        return RayExecutor(workers=workers, **ray_options)
    raise StageConfigError(f"--executor: unknown executor {name!r} (choose 'local', 'inline' or 'ray')")


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Items done, rate and ETA: a tqdm bar on a terminal, a log line every ``interval`` s elsewhere."""

    def __init__(self, name: str, total: int, enabled: bool = True, interval: float = 15.0):
        self.name, self.total, self.done, self.failed = name, total, 0, 0
        self.start = self.last_log = time.monotonic()
        self.interval = interval
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="item", dynamic_ncols=True)

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
        elif time.monotonic() - self.last_log >= self.interval or self.done == self.total:
            self.last_log = time.monotonic()
            log.info("%s: %s", self.name, self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.done}/{self.total} items ({pct:.1f}%), {self.failed} failed, "
            f"{rate:.2f} items/s, ETA {eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Ledger, lock and output files


def ledger_path(output: Path) -> Path:
    return output.with_name(output.name + ".ledger")


def errors_path(output: Path) -> Path:
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".errors.jsonl")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    """A lock file beside the output naming its owner (pid, host); a dead owner's lock is taken over.

    The lock file appears with its owner already in it (written to a temporary file, then hard-linked
    into place), so another run never reads an empty lock and mistakes it for a stale one.
    """

    def __init__(self, output: Path, stage: str):
        self.path = lock_path(output)
        self.stage = stage
        self.held = False

    def __enter__(self) -> "OutputLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage, "since": time.time()}
        for _ in range(2):
            if self._create(json.dumps(me)):
                self.held = True
                return self
            owner = self._owner()
            if owner and self._alive(owner):
                raise OutputLocked(
                    f"{self.path.with_suffix('')} is being written by another run "
                    f"(stage {owner.get('stage')}, pid {owner.get('pid')} on {owner.get('host')}); "
                    f"wait for it to finish, or delete {self.path} if that run is gone"
                )
            log.warning("taking over a stale lock %s left by %s", self.path, owner)
            self.path.unlink(missing_ok=True)
        raise OutputLocked(f"could not take the lock {self.path}")

    def _create(self, content: str) -> bool:
        """Create the lock file holding ``content`` in one step; False if it already exists."""
        # A per-attempt name: two threads of one process may contend for the same lock.
        tmp = temporary_path(self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}"))
        try:
            _write_owner(tmp, content)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                return self._create_exclusive(content)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, content: str) -> bool:
        """For file systems without hard links: create, then write (a reader may see it empty)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
        return True

    def owns_temporary(self, name: str) -> bool:
        """Whether NAME of a temporary file ``.NAME.tmp-PID`` is one of this lock's."""
        return name.startswith(self.path.name + ".")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot tell from here: assume it is alive
        try:
            return pid_alive(int(owner["pid"]))
        except (KeyError, ValueError, TypeError):
            return True

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _write_owner(path: Path, content: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(content)


class Ledger(AppendLog):
    """Append-only record of finished items: a header line with the settings, then one line per item."""

    def __init__(self, path: Path, stage: str, settings: Any):
        super().__init__(path, "ledger", LEDGER_VERSION, {"stage": stage, "settings": settings},
                         remedy="use another output path, or --overwrite to start over", error=StageConfigError)
        self.entries: dict[str, dict] = {}

    def load(self) -> None:
        """Read what a previous run finished; drop a torn last line; refuse other settings."""
        for entry in super().load():
            if "id" in entry:
                self.entries[entry["id"]] = entry

    def append(self, entry: dict) -> None:
        self.entries[entry["id"]] = entry
        super().append(entry)


def _write_atomically(path: Path, lines: list[str]) -> None:
    with atomic_write(path, "w") as fh:
        fh.writelines(lines)


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class RunSummary:
    stage: str
    output: Path
    errors: Path
    total: int = 0
    done: int = 0
    skipped: int = 0
    outputs: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def lines(self) -> list[str]:
        out = [
            f"{self.stage}: {self.total} input items: {self.done} done now, {self.skipped} already "
            f"done, {self.failed_total} failed; {self.outputs} records in {self.output} "
            f"({self.seconds:.1f} s)"
        ]
        if self.failed:
            reasons = ", ".join(f"{code}: {n}" for code, n in self.failed.most_common())
            out.append(f"{self.stage}: failures by reason: {reasons}; details in {self.errors}")
        return out


def _read_items(input_path: Path, stage: str) -> tuple[list[tuple[int, str, dict]], list[tuple[int, dict]]]:
    """Input rows in order, and error entries (by position) for rows that cannot be items."""
    items: list[tuple[int, str, dict]] = []
    bad: list[tuple[int, dict]] = []
    first_line: dict[str, int] = {}
    for position, line in enumerate(iter_jsonl(input_path)):
        if line.error:
            bad.append((position, {"id": f"line-{line.number}", "ok": False, "code": "malformed_input", "reason": line.error}))
            continue
        raw_id = line.obj.get("id")
        try:
            item_id = check_id(raw_id)
        except InvalidRecord as exc:
            bad.append((position, {"id": f"line-{line.number}", "ok": False, "code": "invalid_id", "reason": f"line {line.number}: {exc}"}))
            continue
        if item_id in first_line:
            bad.append((position, {"id": item_id, "ok": False, "code": "duplicate_id",
                                   "reason": f"line {line.number} repeats the id of line {first_line[item_id]}"}))
            continue
        first_line[item_id] = line.number
        items.append((position, item_id, line.obj))
    return items, bad


def run_stage(
    stage: Stage,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    executor: Executor | None = None,
    retry_failed: bool = True,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run ``stage`` over every record of ``input_path`` and write ``output_path`` (see module doc).

    ``retry_failed``: items that failed in an earlier run are tried again (the default; a bad file
    fails again quickly). ``overwrite``: forget earlier runs and start over. ``limit``: process at
    most this many of the items not yet done (for trying a stage out).
    """
    input_path, output = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise StageConfigError(f"input file {input_path} does not exist")
    if output.resolve() == input_path.resolve():
        raise StageConfigError(f"output {output} is the input file; choose another output path")
    executor = executor or LocalExecutor()
    started = time.monotonic()
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(stage=stage.name, output=output, errors=errors_path(output))

    ledger = Ledger(ledger_path(output), stage.name, stage.settings_json())
    try:
        _run_locked(stage, input_path, output, ledger, summary, executor, retry_failed, overwrite, limit, progress)
    except OSError as exc:
        if not is_disk_failure(exc):
            raise
        raise stopped_by_disk(stage.name, exc, f"The {summary.done} items finished in this run are kept in "
                                               f"{ledger.path}") from None

    summary.seconds = time.monotonic() - started
    for line in summary.lines():
        log.info(line)
    return summary


def _run_locked(stage: Stage, input_path: Path, output: Path, ledger: Ledger, summary: RunSummary,
                executor: Executor, retry_failed: bool, overwrite: bool, limit: int | None, progress: bool) -> None:
    """``run_stage`` from taking the lock to writing the output and errors files."""
    lock = OutputLock(output, stage.name)
    with lock:
        owned = {output.name, summary.errors.name}
        remove_dead_temporaries(output.parent, lambda name: name in owned or lock.owns_temporary(name))
        if overwrite:
            ledger.path.unlink(missing_ok=True)
        ledger.load()
        items, bad_rows = _read_items(input_path, stage.name)
        summary.total = len(items) + len(bad_rows)

        todo = []
        for position, item_id, row in items:
            entry = ledger.entries.get(item_id)
            if entry is not None and (entry["ok"] or not retry_failed):
                summary.skipped += 1
            else:
                todo.append((position, row))
        if limit is not None:
            todo = todo[:limit]
        log.info(
            "%s: %d input items, %d already done, %d to run on %d worker%s%s",
            stage.name, summary.total, summary.skipped, len(todo), executor.workers,
            "" if executor.workers == 1 else "s", f" in batches of {stage.batch_size}" if stage.batched else "",
        )

        ledger.open()
        bar = Progress(stage.name, len(todo), enabled=progress)
        ids_by_position = {position: item_id for position, item_id, _ in items}
        aborted, remedy = None, disk_remedy()
        results = executor.run(stage, todo)
        try:
            for position, outcome in results:
                if outcome.get("fatal"):
                    aborted = f"item {ids_by_position[position]}: {outcome['reason']}"
                    remedy = disk_remedy(outcome["code"] == "read_only")
                    break
                entry = {"id": ids_by_position[position], **outcome}
                try:
                    ledger.append(entry)
                except OSError as exc:
                    aborted = f"writing {ledger.path}: {exc.strerror or exc}"
                    remedy = disk_remedy(exc.errno == errno.EROFS)
                    break
                summary.done += outcome["ok"]
                bar.update(outcome["ok"])
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # stops the executor's workers when the loop ended early
            bar.close()
            try:
                ledger.close()
            except OSError as exc:
                if not aborted:
                    aborted = f"writing {ledger.path}: {exc.strerror or exc}"
                    remedy = disk_remedy(exc.errno == errno.EROFS)
        if aborted:
            raise RunAborted(
                f"{stage.name} stopped: {aborted}. The {summary.done} items finished in this run are "
                f"kept in {ledger.path}; {remedy}."
            )

        # Materialise the output and errors from the ledger, in input order.
        out_lines, error_lines, seen_out = [], [], {}
        entries = [(p, ledger.entries.get(i)) for p, i, _ in items] + bad_rows
        for position, entry in sorted(entries, key=lambda x: x[0]):
            if entry is None:
                continue  # not reached (limit)
            if entry["ok"]:
                dup = next((o["id"] for o in entry["outputs"] if o["id"] in seen_out), None)
                if dup is None:
                    for o in entry["outputs"]:
                        seen_out[o["id"]] = entry["id"]
                        out_lines.append(to_json_line(o))
                    continue
                entry = {"id": entry["id"], "ok": False, "code": "duplicate_output_id",
                         "reason": f"output id {dup} was already produced by input {seen_out[dup]}"}
            error = {"id": entry["id"], "stage": stage.name, "code": entry["code"], "reason": entry["reason"]}
            if "traceback" in entry:
                error["traceback"] = entry["traceback"]
            error_lines.append(to_json_line(error))
            summary.failed[entry["code"]] += 1
        _write_atomically(output, out_lines)
        _write_atomically(summary.errors, error_lines)
        summary.outputs = len(out_lines)
