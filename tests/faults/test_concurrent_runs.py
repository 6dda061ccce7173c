"""A second run on an output that a live run is writing is refused before it touches anything;
the first run then finishes as if alone.

The first run is frozen (SIGSTOP) once it holds its lock, so the second one surely meets it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from pipeline.records import read_jsonl
from tests.faults.killing import REPO, cli, llark, shard_contents


def holds_lock(lock: Path) -> bool:
    """The lock file is there with its owner written in it."""
    try:
        return "pid" in json.loads(lock.read_text())
    except (OSError, ValueError):
        return False


def frozen_when(cmd: list[str], condition: Callable[[], bool], timeout: float = 120.0) -> subprocess.Popen:
    """Start ``cmd`` and SIGSTOP its process group as soon as ``condition()`` holds."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{cmd} ended or stalled before the condition held: {proc.communicate()[1][-2000:]}")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGSTOP)
    return proc


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under ``dirs`` with a hash of its bytes (hidden and lock files included)."""
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for d in dirs for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


def second_run_meets_the_first(first_cmd: list[str], second_args: list, lock: Path, watched: Path, capfd):
    """Run ``llark SECOND_ARGS`` (in this process) while the run of ``first_cmd`` holds ``lock``;
    then let the first finish."""
    first = frozen_when(first_cmd, lambda: holds_lock(lock))
    try:
        before = snapshot(watched)
        capfd.readouterr()
        rc = cli(*second_args)
        err = capfd.readouterr().err
        after = snapshot(watched)
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err[-3000:]
    assert rc == 2, err[-3000:]
    assert f"pid {first.pid}" in err and "being written by another run" in err
    assert after == before, "the refused run changed files of the run it met: " + ", ".join(
        sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))


@pytest.mark.slow
def test_a_second_shards_run_on_the_same_output_is_refused(tmp_path, pipeline_data, reference_shards, capfd):
    out = tmp_path / "shards"
    args = pipeline_data.shards_args(out, "--workers", "2", "--no-progress")
    second_run_meets_the_first(llark(*args), args, out / "plan.jsonl.lock", out, capfd)
    assert shard_contents(out) == shard_contents(reference_shards)
    for name in ("index.json", "missing.jsonl", "shards.jsonl"):
        assert (out / name).read_bytes() == (reference_shards / name).read_bytes(), name


@pytest.mark.slow
def test_a_second_instructions_run_on_the_same_output_is_refused(tmp_path, pipeline_data, many_clips,
                                                                 many_instructions, capfd):
    out = tmp_path / "instructions.jsonl"
    first = llark("instructions", many_clips, "--out", out, "--backend", "template", "--workers", "2", "--no-progress")
    # The second run has other input: whatever it wrote would show in the first run's output.
    second = ["instructions", pipeline_data.clips, "--out", out, "--backend", "template", "--no-progress"]
    second_run_meets_the_first(first, second, out.with_name(out.name + ".lock"), tmp_path, capfd)
    assert read_jsonl(out) == read_jsonl(many_instructions)
