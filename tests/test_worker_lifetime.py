"""A process that calls ``exit_with_parent`` exits soon after its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.faults.killing import REPO, alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

WORKER = """
import signal, time
from pipeline.worker_lifetime import exit_with_parent
signal.signal(signal.SIGTERM, signal.SIG_IGN)
exit_with_parent()
print("watching", flush=True)
time.sleep(600)
"""

# Starts WORKER from its main thread, or from a thread that ends once the worker is watching;
# prints the worker's pid.
PARENT = """
import subprocess, sys, threading, time
procs = []
def start():
    procs.append(subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True))
    assert procs[0].stdout.readline() == "watching\\n"
if sys.argv[2] == "thread":
    t = threading.Thread(target=start)
    t.start()
    t.join()
else:
    start()
print(procs[0].pid, flush=True)
time.sleep(600)
"""


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_a_worker_exits_when_its_parent_is_killed(started_from):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WORKER, started_from], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # longer than a poll: the thread that started it has ended, the worker lives on
        assert alive(worker), "the worker died while its parent was alive"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert gone_within(worker, 10), f"worker {worker} outlived its killed parent by 10 s"
    finally:
        with_group_killed(parent)


def test_a_parent_already_gone_ends_the_worker_at_once():
    code = "from pipeline.worker_lifetime import exit_with_parent; exit_with_parent(2**22 + 1); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "alive" not in done.stdout


def with_group_killed(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
