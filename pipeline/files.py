"""Writing files so that a killed or failing run never leaves one half written.

Every file the project writes for another stage or a later run goes through here:

- ``atomic_write`` / ``atomic_directory``: the content goes to a temporary ``.NAME.tmp-PID`` beside
  the target, is flushed to disk, then renamed over the target; on any failure the temporary is
  removed and the target is left as it was. A full disk, an exceeded quota or a read-only file
  system raises with the target's path (a failed write alone does not say where).
- ``write_json``, ``write_jsonl``, ``write_text``: the usual contents, through ``atomic_write``.
- ``AppendLog``: an append-only JSONL file whose first line records the settings it was written
  with; a rerun with other settings is refused naming both, and a torn last line (a writer killed
  mid-line) is discarded on opening.
- ``settings_changes`` / ``check_same_settings``: the one rule for "resume only with the same
  settings", used by the runner's ledger, evaluation's ``run.json`` and training's checkpoints.

This module imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

log = logging.getLogger("llark")

# Errors of the machine, not of an item: carrying on would only fail every following write.
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def is_disk_failure(exc: BaseException) -> bool:
    """``exc`` says the disk is full, over quota or read-only: no later write can succeed either."""
    return isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """``strerror: filename``, e.g. ``No space left on device: /data/clips/a.wav``."""
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.NAME.tmp-PID``, so that a later
    run can tell whose it is (``remove_dead_temporaries``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _name_disk_failure(exc: OSError, path: Path) -> None:
    if exc.filename is None and is_disk_failure(exc):
        exc.filename = str(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True,
                 keep: Callable[[], bool] | None = None) -> Iterator[IO]:
    """A file object on ``path``'s temporary file, renamed to ``path`` when the block ends without
    an error and removed when it does not: ``path`` is never seen half written. ``fsync``: flush the
    content to disk before the rename (off only for files a rerun recreates anyway). ``keep``: asked
    when the block ends; False discards what was written and removes an older ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if keep is None or keep():
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        _name_disk_failure(exc, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory beside ``path``, moved to ``path`` (replacing an older one) when
    the block ends without an error and removed when it does not."""
    path = Path(path)
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        _name_disk_failure(exc, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", fsync=fsync) as fh:
        fh.write(text)
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``data`` as one JSON document (with a final newline)."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def json_line(row: Any) -> str:
    """One JSONL line: ``row`` (a dict, or anything with ``to_json()`` or pydantic's ``model_dump``)."""
    if hasattr(row, "to_json"):
        return row.to_json() + "\n"
    if hasattr(row, "model_dump"):
        return json.dumps(row.model_dump(mode="json"), ensure_ascii=False) + "\n"
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """``rows`` one JSON object a line (see ``json_line``); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_write(path, "w") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json_line(row))
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Temporaries left by killed runs

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_dead_temporaries(directory: Path, owned: Callable[[str], bool]) -> list[Path]:
    """Delete the temporary files (``.NAME.tmp-PID``) in ``directory`` that a process no longer alive
    on this host left behind (a killed run) while writing a file NAME for which ``owned(NAME)`` holds.

    Call it holding the lock of the output those names belong to: no live run then writes them,
    and a live process's temporaries are kept all the same. Returns the files removed.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or not owned(match["name"]) or not entry.is_file(follow_symlinks=False):
            continue
        if pid_alive(int(match["pid"])):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporary files that killed runs left in %s", len(removed), directory)
    return removed


# ---------------------------------------------------------------------------------------------
# Settings a run may resume with


def flatten(settings: Mapping[str, Any], keep_whole: Iterable[str] = (), prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b": value}``; a key in ``keep_whole`` stays one value."""
    keep_whole = tuple(keep_whole)
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and key not in keep_whole:
            out.update(flatten(value, keep_whole, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_changes(before: Any, now: Any, may_change: Iterable[str] = (),
                     keep_whole: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(field, before, now)`` for every setting (flattened to dotted names) that differs, except
    those in ``may_change``; sorted by field. Settings that are not mappings compare whole (field "")."""
    may_change = set(may_change)
    if not isinstance(before, Mapping) or not isinstance(now, Mapping):
        return [] if before == now else [("", before, now)]
    a, b = flatten(before, keep_whole), flatten(now, keep_whole)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in may_change]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``field (before -> now), ...`` for an error message."""
    return ", ".join(f"{k or 'settings'} ({json.dumps(a, sort_keys=True, default=str)} -> "
                     f"{json.dumps(b, sort_keys=True, default=str)})" for k, a, b in changes)


def check_same_settings(where: str, before: Any, now: Any, remedy: str, error: type[Exception] = ValueError,
                        may_change: Iterable[str] = (), keep_whole: Iterable[str] = ()) -> None:
    """Raise ``error`` when ``now`` differs from the settings ``where`` was written with."""
    changes = settings_changes(before, now, may_change, keep_whole)
    if changes:
        raise error(f"{where} was written with other settings than this run's: {describe_changes(changes)}; {remedy}")


# ---------------------------------------------------------------------------------------------
# Append-only JSONL with a settings header


def drop_torn_tail(path: Path) -> bool:
    """Cut the last line of ``path`` if a killed writer left it without its newline; True if it did."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "r+b") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return False
        fh.seek(0)
        fh.truncate(fh.read().rfind(b"\n") + 1)
    log.warning("%s: discarding a torn last line left by an interrupted run", path)
    return True


class AppendLog:
    """An append-only JSONL file: a header line ``{kind: version, **header}``, then one entry a line.

    ``load()`` discards a torn last line, checks the header (a file of another kind or version is
    refused; other settings are refused naming the fields) and returns the entries. ``append``
    writes one line with one ``write`` (a kill can tear only the last line), flushed, and synced to
    disk at most every ``sync_every_s`` seconds and on ``close``.
    """

    def __init__(self, path: str | os.PathLike, kind: str, version: int, header: dict[str, Any],
                 remedy: str, error: type[Exception] = ValueError, sync_every_s: float = 2.0):
        self.path = Path(path)
        self.kind, self.version = kind, version
        self.header = {kind: version, **header}
        self.remedy, self.error = remedy, error
        self.sync_every_s = sync_every_s
        self._fh: IO | None = None
        self._last_sync = time.monotonic()

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        drop_torn_tail(self.path)
        with open(self.path, "rb") as fh:
            lines = fh.read().splitlines()
        if not lines:
            return []
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get(self.kind) != self.version:
            raise self.error(f"{self.path} is not a {self.kind} this version can read; move it away to start over")
        check_same_settings(str(self.path), {k: v for k, v in header.items() if k != self.kind},
                            {k: v for k, v in self.header.items() if k != self.kind}, self.remedy, self.error)
        entries = []
        for raw in lines[1:]:
            try:
                entry = json.loads(raw)
            except ValueError:
                log.warning("%s: skipping an unreadable line", self.path)
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", encoding="utf-8")
        if new:
            self._write(json.dumps(self.header, ensure_ascii=False) + "\n", sync=True)

    def append(self, entry: dict[str, Any]) -> None:
        self._write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _write(self, line: str, sync: bool = False) -> None:
        try:
            self._fh.write(line)
            self._fh.flush()
            if sync or time.monotonic() - self._last_sync > self.sync_every_s:
                os.fsync(self._fh.fileno())
                self._last_sync = time.monotonic()
        except OSError as exc:
            _name_disk_failure(exc, self.path)
            raise

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "AppendLog":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
