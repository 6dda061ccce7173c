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

A stage is a ``Stage`` (``pipeline/stage.py``); executors (``pipeline/executors.py``) only see
``Stage`` objects and lists of ``(index, row)``; a distributed executor (Ray) plugs in beside
``LocalExecutor`` without touching the per-item functions.

A stage whose work batches well (a model on a GPU) may also give ``process_batch`` and a
``batch_size``: executors then hand it up to ``batch_size`` consecutive items at once, and
everything above stays per item (ledger, error records, order, progress, resume). A batch call that
fails as a whole, or whose worker dies, is rerun one item at a time through ``process``, so only
the item at fault becomes an error record.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.files import (AppendLog, atomic_write, describe_os_error, is_disk_failure, pid_alive,
                            remove_dead_temporaries, temporary_path)
from pipeline.errors import InvalidRecord, ItemError, OutputLocked, RunAborted, StageConfigError  # noqa: F401
from pipeline.records import check_id, iter_jsonl, to_json_line
# Stages and executors are defined in their own modules; stages import them from here.
from pipeline.executors import (THREAD_ENV_VARS, Executor, InlineExecutor, LocalExecutor,  # noqa: F401
                                default_workers, make_executor)
from pipeline.stage import Stage, failure_outcome, result_outcome, run_batch, run_chunks, run_item  # noqa: F401

log = logging.getLogger("llark")

LEDGER_VERSION = 1


def disk_remedy(read_only: bool = False) -> str:
    """What to do before rerunning a run that a full (or read-only) disk stopped."""
    return f"{'make the disk writable' if read_only else 'free space'} and rerun the same command to go on"


def stopped_by_disk(stage: str, exc: OSError, kept: str) -> RunAborted:
    """The error that ends a run whose disk failed (``is_disk_failure``); ``kept`` says what is safe."""
    return RunAborted(f"{stage} stopped: {describe_os_error(exc)}. {kept}; {disk_remedy(exc.errno == errno.EROFS)}.")


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
