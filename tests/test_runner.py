import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.records import read_jsonl
from pipeline.runner import (
    InlineExecutor,
    LocalExecutor,
    OutputLocked,
    Stage,
    StageConfigError,
    errors_path,
    ledger_path,
    lock_path,
    run_stage,
)
from pipeline.testing import echo_item

REPO = Path(__file__).resolve().parents[1]


def write_input(path: Path, rows: list[dict | str]) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def stage(tag="a", calls_dir=None) -> Stage:
    return Stage(name="echo", process=echo_item, settings={"tag": tag, "calls_dir": str(calls_dir) if calls_dir else None})


def count_calls(calls_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in calls_dir.iterdir():
        key = f.name.split(".")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_output_in_input_order_whatever_the_workers(tmp_path):
    # Later items finish first, so completion order differs from input order.
    rows = [{"id": f"item-{i:02d}", "sleep": 0.02 * ((7 * i) % 5)} for i in range(20)]
    inp = write_input(tmp_path / "in.jsonl", rows)
    run_stage(stage(), inp, tmp_path / "two.jsonl", executor=LocalExecutor(2), progress=False)
    run_stage(stage(), inp, tmp_path / "one.jsonl", executor=InlineExecutor(), progress=False)
    two, one = read_jsonl(tmp_path / "two.jsonl"), read_jsonl(tmp_path / "one.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in rows]
    assert two == one
    assert all(r["seen"] and r["tag"] == "a" for r in two)
    assert not lock_path(tmp_path / "two.jsonl").exists()


def test_failures_become_error_records_and_the_run_goes_on(tmp_path):
    rows = [
        {"id": "ok-1"},
        {"id": "bad-1", "fail": "silent"},
        {"id": "ok-2"},
        {"id": "bug-1", "bug": True},
        {"id": "bad-2", "fail": "silent"},
    ]
    inp = write_input(tmp_path / "in.jsonl", rows)
    summary = run_stage(stage(), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["ok-1", "ok-2"]
    errors = read_jsonl(errors_path(tmp_path / "out.jsonl"))
    assert [e["id"] for e in errors] == ["bad-1", "bug-1", "bad-2"]
    assert all(e["stage"] == "echo" for e in errors)
    assert errors[0]["code"] == "silent" and "asked to fail" in errors[0]["reason"]
    assert errors[1]["code"] == "exception:ValueError" and "hit a bug" in errors[1]["traceback"]
    assert summary.done == 2 and summary.failed == {"silent": 2, "exception:ValueError": 1}
    assert any("silent: 2" in line for line in summary.lines())


def test_malformed_input_lines_are_reported_not_fatal(tmp_path):
    inp = write_input(
        tmp_path / "in.jsonl",
        [
            {"id": "good-1"},
            '{"id": "cut-in-ha',
            {"no_id": 1},
            {"id": "../etc/passwd"},
            {"id": "good-1"},
            "[1, 2]",
            {"id": "good-2"},
        ],
    )
    summary = run_stage(stage(), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["good-1", "good-2"]
    errors = read_jsonl(errors_path(tmp_path / "out.jsonl"))
    assert [e["code"] for e in errors] == ["malformed_input", "invalid_id", "invalid_id", "duplicate_id", "malformed_input"]
    assert errors[0]["id"] == "line-2"
    assert "repeats the id of line 1" in errors[3]["reason"]
    assert summary.total == 7


def test_one_item_many_outputs_and_duplicate_output_ids(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [{"id": "a", "fanout": 3}, {"id": "b"}, {"id": "a-1x", "fanout": 0}])
    run_stage(stage(), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["a-0", "a-1", "a-2", "b", "a-1x"]

    clash = write_input(tmp_path / "clash.jsonl", [{"id": "x", "fanout": 2}, {"id": "x-1"}])
    run_stage(stage(), clash, tmp_path / "clash-out.jsonl", executor=InlineExecutor(), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "clash-out.jsonl")] == ["x-0", "x-1"]
    assert read_jsonl(errors_path(tmp_path / "clash-out.jsonl"))[0]["code"] == "duplicate_output_id"


def test_resume_skips_items_already_done(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    rows = [{"id": f"r{i}"} for i in range(10)]
    inp = write_input(tmp_path / "in.jsonl", rows)
    first = run_stage(stage(calls_dir=calls), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), limit=4, progress=False)
    assert first.done == 4 and len(read_jsonl(tmp_path / "out.jsonl")) == 4
    second = run_stage(stage(calls_dir=calls), inp, tmp_path / "out.jsonl", executor=LocalExecutor(2), progress=False)
    assert second.skipped == 4 and second.done == 6
    assert count_calls(calls) == {f"r{i}": 1 for i in range(10)}
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["id"] for r in rows]
    third = run_stage(stage(calls_dir=calls), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    assert third.skipped == 10 and third.done == 0


def test_failed_items_are_retried_unless_asked_not_to(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    inp = write_input(tmp_path / "in.jsonl", [{"id": "ok"}, {"id": "flaky", "fail": "timeout"}])
    run_stage(stage(calls_dir=calls), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    run_stage(stage(calls_dir=calls), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), retry_failed=False, progress=False)
    assert count_calls(calls) == {"ok": 1, "flaky": 1}
    run_stage(stage(calls_dir=calls), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    assert count_calls(calls) == {"ok": 1, "flaky": 2}
    # The errors file reflects the latest attempt only: one line per failing item.
    assert [e["id"] for e in read_jsonl(errors_path(tmp_path / "out.jsonl"))] == ["flaky"]


def test_torn_ledger_line_is_discarded(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [{"id": f"r{i}"} for i in range(5)])
    out = tmp_path / "out.jsonl"
    run_stage(stage(), inp, out, executor=InlineExecutor(), limit=2, progress=False)
    with open(ledger_path(out), "a") as fh:
        fh.write('{"id": "r2", "ok": true, "outputs": [{"id": "r2", "se')  # a kill mid-write
    summary = run_stage(stage(), inp, out, executor=InlineExecutor(), progress=False)
    assert summary.skipped == 2 and summary.done == 3
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i}" for i in range(5)]
    assert all(r["seen"] for r in read_jsonl(out))


def test_other_settings_are_refused_before_any_work(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    inp = write_input(tmp_path / "in.jsonl", [{"id": "r0"}, {"id": "r1"}])
    out = tmp_path / "out.jsonl"
    run_stage(stage(tag="a", calls_dir=calls), inp, out, executor=InlineExecutor(), limit=1, progress=False)
    with pytest.raises(StageConfigError, match="other settings"):
        run_stage(stage(tag="b", calls_dir=calls), inp, out, executor=InlineExecutor(), progress=False)
    assert count_calls(calls) == {"r0": 1}
    run_stage(stage(tag="b", calls_dir=calls), inp, out, executor=InlineExecutor(), overwrite=True, progress=False)
    assert {r["tag"] for r in read_jsonl(out)} == {"b"}


def test_a_live_lock_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [{"id": "r0"}])
    out = tmp_path / "out.jsonl"
    import socket

    lock_path(out).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": "echo"}))
    with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
        run_stage(stage(), inp, out, executor=InlineExecutor(), progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "stage": "echo"}))
    run_stage(stage(), inp, out, executor=InlineExecutor(), progress=False)
    assert read_jsonl(out)[0]["id"] == "r0" and not lock_path(out).exists()


def test_a_worker_crash_fails_only_its_item(tmp_path):
    rows = [{"id": f"r{i}", "sleep": 0.05} for i in range(6)]
    rows[2] = {"id": "r2", "crash": True}
    inp = write_input(tmp_path / "in.jsonl", rows)
    summary = run_stage(stage(), inp, tmp_path / "out.jsonl", executor=LocalExecutor(2), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["r0", "r1", "r3", "r4", "r5"]
    errors = read_jsonl(errors_path(tmp_path / "out.jsonl"))
    assert [(e["id"], e["code"]) for e in errors] == [("r2", "worker_crashed")]
    assert summary.failed == {"worker_crashed": 1}


KILLABLE_RUN = textwrap.dedent(
    """
    import sys
    from pipeline.runner import LocalExecutor, Stage, run_stage
    from pipeline.testing import echo_item
    stage = Stage(name="echo", process=echo_item, settings={"tag": "k", "calls_dir": sys.argv[3]})
    run_stage(stage, sys.argv[1], sys.argv[2], executor=LocalExecutor(2), progress=False)
    """
)


def test_killed_run_resumes_to_the_same_output_without_duplicates(tmp_path):
    rows = [{"id": f"r{i:03d}", "sleep": 0.03, "n": i} for i in range(80)]
    inp = write_input(tmp_path / "in.jsonl", rows)
    calls = tmp_path / "calls"
    calls.mkdir()
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_RUN, str(inp), str(out), str(calls)],
        cwd=REPO, start_new_session=True,
    )
    ledger = ledger_path(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ledger.exists() and ledger.read_text().count("\n") > 15:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker pool, mid-run
    proc.wait()
    assert not out.exists(), "a killed run must not leave an output file a reader would trust"
    done_before = ledger.read_text().count("\n") - 1
    assert 0 < done_before < len(rows)

    # The lock of the dead run is stale; the rerun takes it over and finishes.
    summary = run_stage(Stage(name="echo", process=echo_item, settings={"tag": "k", "calls_dir": str(calls)}),
                        inp, out, executor=LocalExecutor(2), progress=False)
    assert summary.skipped >= done_before - 1
    run_stage(Stage(name="echo", process=echo_item, settings={"tag": "k", "calls_dir": None}),
              inp, tmp_path / "clean.jsonl", executor=LocalExecutor(2), progress=False)
    resumed, clean = read_jsonl(out), read_jsonl(tmp_path / "clean.jsonl")
    assert resumed == clean
    assert len({r["id"] for r in resumed}) == len(rows)
    # Items finished before the kill were not run again (only those in flight at the kill may be).
    calls_per_item = count_calls(calls)
    assert sum(calls_per_item.values()) <= len(rows) + 4


def test_workers_dying_at_start_abort_the_run_with_a_clear_message(tmp_path):
    from pipeline.runner import RunAborted
    from pipeline.testing import crash_on_setup

    inp = write_input(tmp_path / "in.jsonl", [{"id": f"r{i}"} for i in range(4)])
    dying = Stage(name="echo", process=echo_item, settings={}, setup=crash_on_setup)
    with pytest.raises(RunAborted, match="--executor inline"):
        run_stage(dying, inp, tmp_path / "out.jsonl", executor=LocalExecutor(2), progress=False)


def test_a_crash_racing_with_submission_still_fails_only_its_item(tmp_path):
    # Many quick items around the crashing one: the pool often breaks between a wait and a submit.
    rows = [{"id": f"r{i:02d}"} for i in range(40)]
    rows[5] = {"id": "r05", "crash": True}
    inp = write_input(tmp_path / "in.jsonl", rows)
    for attempt in range(3):
        out = tmp_path / f"out{attempt}.jsonl"
        summary = run_stage(stage(), inp, out, executor=LocalExecutor(2), progress=False)
        assert summary.failed == {"worker_crashed": 1}
        assert len(read_jsonl(out)) == 39
