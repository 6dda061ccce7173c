"""A batched toy stage for the runner's tests (module level, so worker processes can import it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.runner import Stage
from pipeline.testing import echo_item


def echo_batch(rows: list[dict], settings: dict) -> list:
    """``echo_item`` over several rows in one call; one result or exception per row.

    Each call leaves ``batch-*.json`` in ``settings["calls_dir"]`` listing its row ids. Rows steer
    it like ``echo_item`` (``fail``, ``bug``, ``crash`` kill or fail only inside the call), plus
    ``batch_bug``: the whole call raises; ``short_batch``: the call returns one result too few.
    """
    calls_dir = settings.get("calls_dir")
    if calls_dir:
        marker = Path(calls_dir) / f"batch-{os.getpid()}-{time.monotonic_ns()}.json"
        marker.write_text(json.dumps([row["id"] for row in rows]))
    if any(row.get("batch_bug") for row in rows):
        raise RuntimeError("this batch cannot run as a whole")
    quiet = {**settings, "calls_dir": None}
    results: list = []
    for row in rows:
        try:
            results.append(echo_item(row, quiet))
        except Exception as exc:
            results.append(exc)
    return results[:-1] if any(row.get("short_batch") for row in rows) else results


def batched_echo(batch_size: int, calls_dir: Path | None = None, tag: str = "a") -> Stage:
    return Stage(name="echo", process=echo_item, process_batch=echo_batch, batch_size=batch_size,
                 settings={"tag": tag, "calls_dir": str(calls_dir) if calls_dir else None})


def batch_calls(calls_dir: Path) -> list[list[str]]:
    """The row ids of every batch call, in the order the calls started."""
    files = sorted(calls_dir.glob("batch-*.json"), key=lambda f: int(f.stem.rsplit("-", 1)[1]))
    return [json.loads(f.read_text()) for f in files]


def single_calls(calls_dir: Path) -> dict[str, int]:
    """How many times ``echo_item`` ran each row alone."""
    counts: dict[str, int] = {}
    for f in calls_dir.iterdir():
        if not f.name.startswith("batch-"):
            key = f.name.split(".")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts
