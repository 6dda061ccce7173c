"""Toy per-item functions for the runner's tests and benchmarks (importable by worker processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.runner import ItemError


def echo_item(row: dict, settings: dict) -> dict:
    """Return the row with a marker; behaviour is steered by fields of the row.

    ``sleep``: seconds to sleep first; ``fail``: raise ItemError with this code; ``bug``: raise
    ValueError; ``crash``: kill the worker process; ``fanout``: return that many records.
    With ``settings["calls_dir"]``, every call leaves a file there, so tests can count calls.
    """
    if settings and settings.get("calls_dir"):
        marker = Path(settings["calls_dir"]) / f"{row['id']}.{os.getpid()}.{time.monotonic_ns()}"
        marker.touch()
    time.sleep(float(row.get("sleep", 0)))
    if row.get("crash"):
        os._exit(17)
    if row.get("fail"):
        raise ItemError(row["fail"], f"item {row['id']} asked to fail with {row['fail']}")
    if row.get("bug"):
        raise ValueError(f"item {row['id']} hit a bug")
    out = {**row, "seen": True, "tag": settings.get("tag") if settings else None}
    fanout = int(row.get("fanout", 0))
    if fanout:
        return [{**out, "id": f"{row['id']}-{k}"} for k in range(fanout)]
    return out


def noop_item(row: dict, settings) -> dict:
    return row


def cpu_item(row: dict, settings) -> dict:
    """About ``settings['work']`` iterations of pure-Python arithmetic: a CPU-bound item."""
    acc = 0
    for i in range(int(settings["work"])):
        acc = (acc * 31 + i) % 1_000_003
    return {"id": row["id"], "acc": acc}


def disk_full_on(row: dict, settings: dict) -> dict:
    """Like echo_item, but the item named ``settings['full_at']`` hits a full disk while the file
    ``settings['disk_full_flag']`` exists (delete it to "free space")."""
    if row["id"] == settings["full_at"] and Path(settings["disk_full_flag"]).exists():
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/clip.wav")
    return {**row, "seen": True}


def crash_on_setup(settings) -> None:
    """A per-worker setup that kills its process (a native crash while loading a model)."""
    os._exit(19)


def enospc_after(func, calls: int, target: str | None = None):
    """``func`` that works ``calls`` times, then raises ``OSError(ENOSPC)`` on every call: a disk
    that has just filled up. The error names ``target``, else the call's first argument when it
    is a path."""
    import errno
    import functools

    done = {"calls": 0}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if done["calls"] >= calls:
            where = target or (args[0] if args and isinstance(args[0], (str, os.PathLike)) else None)
            raise OSError(errno.ENOSPC, "No space left on device", None if where is None else str(where))
        done["calls"] += 1
        return func(*args, **kwargs)

    return wrapper
