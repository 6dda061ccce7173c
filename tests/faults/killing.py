"""Run a stage's command, SIGKILL it (and its workers) at chosen points, then let it finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.runner import ledger_path

REPO = Path(__file__).resolve().parents[2]


def finished_items(out: Path) -> int:
    ledger = ledger_path(out)
    return max(ledger.read_text().count("\n") - 1, 0) if ledger.exists() else 0


def kill_at(cmd: list[str], out: Path, after_items: int, timeout: float = 120.0) -> bool:
    """Start ``cmd``; SIGKILL its whole process group once ``after_items`` items are in the ledger.

    Returns False if the command finished on its own first.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if finished_items(out) >= after_items:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise TimeoutError(f"{cmd} made no progress in {timeout} s")
    return False


def llark(*args: str) -> list[str]:
    return [sys.executable, "-m", "llark.cli", *args]
