"""SIGKILL a runner (only the runner, as the OOM killer does): no process it started outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.killing import REPO, alive, finished_items

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

LOCAL_RUN = """
import sys
from pipeline.runner import LocalExecutor, Stage, run_stage
from pipeline.testing import echo_item
if __name__ == "__main__":
    run_stage(Stage(name="echo", process=echo_item, settings={}), sys.argv[1], sys.argv[2], executor=LocalExecutor(2),
              progress=False)
"""


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except (FileNotFoundError, ProcessLookupError):
                continue
            todo += children - found
            found |= children
    return found


def test_a_killed_runner_leaves_no_worker_behind(tmp_path):
    items = tmp_path / "in.jsonl"
    items.write_text("".join(json.dumps({"id": f"s{i:03d}", "sleep": 0.2}) + "\n" for i in range(300)))
    out = tmp_path / "out.jsonl"
    script = tmp_path / "run_local.py"  # a file, not -c: spawned workers re-import the main module
    script.write_text(LOCAL_RUN)
    runner = subprocess.Popen([sys.executable, str(script), str(items), str(out)], cwd=REPO, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while finished_items(out) < 4 and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.05)
        assert runner.poll() is None and finished_items(out) >= 4, "the run never got going"
        started = descendants(runner.pid)
        assert len(started) >= 2, f"expected two workers, found {started}"
        os.kill(runner.pid, signal.SIGKILL)  # the runner alone, not its process group
        runner.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, started)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = sorted(pid for pid in started if alive(pid))
        assert not left, f"processes of the killed run still alive after 10 s: {left}"
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.wait()
