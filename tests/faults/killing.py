"""Run a stage's command, SIGKILL it (and its workers) at chosen points, then let it finish; and
read back what it wrote."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

from pipeline.runner import ledger_path

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Running: a zombie that nobody reaps yet (a container without init) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def finished_items(out: Path) -> int:
    ledger = ledger_path(out)
    return max(ledger.read_text().count("\n") - 1, 0) if ledger.exists() else 0


def kill_when(cmd: list[str], condition: Callable[[], bool], timeout: float = 120.0, env: dict | None = None,
              log: Path | None = None) -> bool:
    """Start ``cmd``; SIGKILL its whole process group as soon as ``condition()`` holds.

    Returns False if the command finished on its own first. ``log``: where its stdout and stderr go.
    """
    sink = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=sink)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if condition():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended in between
                    pass
                return proc.wait() == -signal.SIGKILL
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{cmd} made no progress in {timeout} s")
        return False
    finally:
        if log is not None:
            sink.close()


def kill_at(cmd: list[str], out: Path, after_items: int, timeout: float = 120.0) -> bool:
    """Start ``cmd``; SIGKILL its whole process group once ``after_items`` items are in the ledger.

    Returns False if the command finished on its own first.
    """
    return kill_when(cmd, lambda: finished_items(out) >= after_items, timeout)


def llark(*args: str) -> list[str]:
    return [sys.executable, "-m", "llark.cli", *(str(a) for a in args)]


def cli(*args) -> int:
    """``llark ARGS`` in this process (so that a test can patch what the stage calls); an exception
    the command does not handle is exit status 1, as it would be for the process."""
    from llark.cli import main

    try:
        return main([str(a) for a in args])
    except Exception:
        import traceback

        traceback.print_exc()
        return 1


def run_ok(cmd: list[str], env: dict | None = None, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[3:]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def kill_points(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """``n`` distinct ledger counts in [low, high], increasing: each kill lands after the previous one."""
    return sorted(rng.sample(range(low, high + 1), n))


def leftover_temporaries(*dirs: Path) -> list[str]:
    """The temporary files (``.NAME.tmp-PID``) that a killed writer left and no rerun removed."""
    return sorted(str(p) for d in dirs for p in Path(d).rglob(".*.tmp-*"))


def shard_contents(shards_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard: key -> {extension: bytes}; a key seen twice fails the test."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                assert ext not in samples.setdefault(key, {}), f"{key}.{ext} is in more than one place ({tar_path.name})"
                samples[key][ext] = tar.extractfile(member).read()
    return samples
