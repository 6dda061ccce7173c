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
    OutputLock,
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


# --- batched stages ---------------------------------------------------------------------------


def make_calls_dir(tmp_path, name="calls"):
    calls = tmp_path / name
    calls.mkdir()
    return calls


@pytest.mark.parametrize("executor", [InlineExecutor(), LocalExecutor(2)], ids=["inline", "local"])
def test_a_batched_stage_writes_what_the_per_item_stage_writes(tmp_path, executor):
    from runner_fixtures import batch_calls, batched_echo, single_calls

    rows = [{"id": f"item-{i:02d}", "sleep": 0.01 * ((7 * i) % 5)} for i in range(20)]
    rows[4] = {"id": "item-04", "fail": "silent"}
    rows[9] = {"id": "item-09", "bug": True}
    rows[13] = {"id": "item-13", "fanout": 2}
    inp = write_input(tmp_path / "in.jsonl", rows)
    calls = make_calls_dir(tmp_path)
    summary = run_stage(batched_echo(3, calls), inp, tmp_path / "batched.jsonl", executor=executor, progress=False)
    run_stage(stage(), inp, tmp_path / "single.jsonl", executor=InlineExecutor(), progress=False)
    assert read_jsonl(tmp_path / "batched.jsonl") == read_jsonl(tmp_path / "single.jsonl")
    errors = read_jsonl(errors_path(tmp_path / "batched.jsonl"))
    assert [(e["id"], e["code"]) for e in errors] == [("item-04", "silent"), ("item-09", "exception:ValueError")]
    assert "hit a bug" in errors[1]["traceback"]
    assert summary.done == 18 and summary.failed == {"silent": 1, "exception:ValueError": 1}
    # Every item went through exactly one batch call of consecutive items, and none ran alone.
    ids = [r["id"] for r in rows]
    batches = batch_calls(calls)
    assert sorted(i for batch in batches for i in batch) == ids and single_calls(calls) == {}
    assert sorted(batches) == [ids[i : i + 3] for i in range(0, 20, 3)]
    entries = [json.loads(line) for line in ledger_path(tmp_path / "batched.jsonl").read_text().splitlines()[1:]]
    assert len(entries) == 20 and all(e["wall_s"] >= 0 and e["cpu_s"] >= 0 for e in entries)


@pytest.mark.parametrize("trouble", ["batch_bug", "short_batch"])
def test_a_batch_that_fails_as_a_whole_is_rerun_item_by_item(tmp_path, trouble):
    from runner_fixtures import batch_calls, batched_echo, single_calls

    rows = [{"id": f"r{i}"} for i in range(10)]
    rows[5] = {"id": "r5", trouble: True}
    rows[7] = {"id": "r7", "fail": "silent"}
    inp = write_input(tmp_path / "in.jsonl", rows)
    calls = make_calls_dir(tmp_path)
    summary = run_stage(batched_echo(4, calls), inp, tmp_path / "out.jsonl", executor=InlineExecutor(), progress=False)
    assert batch_calls(calls) == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]
    assert single_calls(calls) == {"r4": 1, "r5": 1, "r6": 1, "r7": 1}  # only the failed batch, one at a time
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(10) if i != 7]
    assert summary.failed == {"silent": 1}


def test_resume_after_a_partial_batched_run_and_with_another_batch_size(tmp_path):
    from runner_fixtures import batch_calls, batched_echo, single_calls

    rows = [{"id": f"r{i:02d}"} for i in range(11)]
    inp = write_input(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    calls = make_calls_dir(tmp_path)
    first = run_stage(batched_echo(3, calls), inp, out, executor=InlineExecutor(), limit=5, progress=False)
    assert first.done == 5 and batch_calls(calls) == [["r00", "r01", "r02"], ["r03", "r04"]]
    second = run_stage(batched_echo(4, calls), inp, out, executor=LocalExecutor(2), progress=False)
    assert (second.skipped, second.done) == (5, 6)
    batches = batch_calls(calls)
    assert sorted(i for batch in batches for i in batch) == [r["id"] for r in rows] and single_calls(calls) == {}
    assert sorted(batches[2:]) == [["r05", "r06", "r07", "r08"], ["r09", "r10"]]
    run_stage(stage(), inp, tmp_path / "single.jsonl", executor=InlineExecutor(), progress=False)
    assert read_jsonl(out) == read_jsonl(tmp_path / "single.jsonl")


def test_a_worker_crash_mid_batch_fails_only_its_item(tmp_path):
    from runner_fixtures import batched_echo, single_calls

    rows = [{"id": f"r{i:02d}", "sleep": 0.02} for i in range(12)]
    rows[5] = {"id": "r05", "crash": True}  # the second item of the second batch of four
    inp = write_input(tmp_path / "in.jsonl", rows)
    calls = make_calls_dir(tmp_path)
    summary = run_stage(batched_echo(4, calls), inp, tmp_path / "out.jsonl", executor=LocalExecutor(2), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["id"] for r in rows if r["id"] != "r05"]
    errors = read_jsonl(errors_path(tmp_path / "out.jsonl"))
    assert [(e["id"], e["code"]) for e in errors] == [("r05", "worker_crashed")]
    assert summary.failed == {"worker_crashed": 1}
    alone = single_calls(calls)
    assert {"r04", "r05", "r06", "r07"} <= set(alone) and all(n == 1 for n in alone.values())


def test_batch_size_must_be_positive():
    from runner_fixtures import batched_echo

    with pytest.raises(StageConfigError, match="--batch-size"):
        batched_echo(0)
    assert not stage().batched and batched_echo(2).batched and not batched_echo(1).batched


def test_a_lock_file_appears_with_its_owner_in_it_so_a_contender_never_takes_it_over(tmp_path, monkeypatch):
    """Two runs race for one output while writing the owner is slow: no reader ever sees the lock
    file empty or half written (a stale lock, by its looks), and exactly one run gets the lock."""
    import threading

    import pipeline.runner

    out = tmp_path / "out.jsonl"

    def slow_write(path, content):
        with open(path, "w") as fh:
            fh.write(content[:5])
            fh.flush()
            time.sleep(0.3)
            fh.write(content[5:])

    monkeypatch.setattr(pipeline.runner, "_write_owner", slow_write)
    seen, torn, results = [], [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                text = lock_path(out).read_text()
            except FileNotFoundError:
                continue
            try:
                seen.append(json.loads(text)["pid"])
            except (ValueError, KeyError):
                torn.append(text)

    start = threading.Barrier(2)

    def contend():
        start.wait()
        try:
            with OutputLock(out, "echo"):
                results.append("held")
                time.sleep(0.3)
        except OutputLocked:
            results.append("refused")

    watcher = threading.Thread(target=watch)
    watcher.start()
    runs = [threading.Thread(target=contend) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    stop.set()
    watcher.join()
    assert torn == [], f"a lock file was seen without its owner: {torn[:3]}"
    assert seen and set(seen) == {os.getpid()}
    assert sorted(results) == ["held", "refused"]
    assert not lock_path(out).exists() and list(tmp_path.iterdir()) == [], "the lock left files behind"


def test_the_lock_works_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    import errno

    import pipeline.runner

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(pipeline.runner.os, "link", no_links)
    out = tmp_path / "out.jsonl"
    with OutputLock(out, "echo"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
            OutputLock(out, "echo").__enter__()
    assert list(tmp_path.iterdir()) == []


def test_a_run_removes_the_temporary_files_killed_runs_left_for_its_output_and_no_others(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [{"id": "r0"}])
    out = tmp_path / "out.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        removed = [f".out.jsonl.tmp-{dead.pid}", f".out.errors.jsonl.tmp-{dead.pid}",
                   f".out.jsonl.lock.0a1b2c3d.tmp-{dead.pid}"]
        kept = [f".out.jsonl.tmp-{live.pid}",  # a live process may still be writing it
                f".other.jsonl.tmp-{dead.pid}",  # not this output's
                ".out.jsonl.tmp-x1", f".out.jsonl.part-{dead.pid}"]  # not a temporary file's name
        for name in removed + kept:
            (tmp_path / name).write_text("partial")
        (tmp_path / f".out.jsonl.ledger.tmp-{dead.pid}").mkdir()  # a directory is never removed
        kept.append(f".out.jsonl.ledger.tmp-{dead.pid}")
        run_stage(stage(), inp, out, executor=InlineExecutor(), progress=False)
        assert sorted(p.name for p in tmp_path.glob(".*")) == sorted(kept)
        assert read_jsonl(out)[0]["id"] == "r0"
    finally:
        live.kill()
        live.wait()


def test_a_full_disk_when_the_output_is_renamed_into_place_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    import pipeline.runner
    from pipeline.runner import RunAborted

    inp = write_input(tmp_path / "in.jsonl", [{"id": f"r{i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(pipeline.runner.os, "replace", full)
    with pytest.raises(RunAborted, match=r"echo stopped: No space left on device: .*out\.jsonl\. The 3 items "
                                         r"finished in this run are kept in .*; free space and rerun the same command"):
        run_stage(stage(), inp, out, executor=InlineExecutor(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl.ledger"]


def test_a_command_that_meets_a_full_disk_outside_the_runner_exits_3_with_what_to_do(monkeypatch, capsys):
    import errno

    import pipeline.ingest.run
    from llark.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/records.jsonl")

    monkeypatch.setattr(pipeline.ingest.run, "ingest_dataset", full)
    assert main(["ingest", "demo", "--root", "/nowhere", "--out", "/data/records.jsonl"]) == 3
    err = capsys.readouterr().err
    assert "llark ingest: stopped: No space left on device: /data/records.jsonl; free space and rerun the same command" in err

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "/data/records.jsonl")

    monkeypatch.setattr(pipeline.ingest.run, "ingest_dataset", broken)
    with pytest.raises(OSError, match="Input/output error"):  # not a full disk: a bug to see whole
        main(["ingest", "demo", "--root", "/nowhere", "--out", "/data/records.jsonl"])


def test_atomic_write_replaces_whole_or_not_at_all_and_names_the_file_of_a_full_disk(tmp_path):
    import errno

    from pipeline.files import atomic_write

    path = tmp_path / "a.npy"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as failed:
        with atomic_write(path) as fh:
            fh.write(b"half of the n")
            raise OSError(errno.ENOSPC, "No space left on device")  # what a write() on a full disk raises
    assert failed.value.filename == str(path) and str(path) in str(failed.value)
    with pytest.raises(OSError) as failed:
        with atomic_write(path) as fh:
            raise OSError(errno.EIO, "Input/output error")  # maybe from reading another file: not named
    assert failed.value.filename is None
    with pytest.raises(ValueError):
        with atomic_write(path) as fh:
            fh.write(b"new")
            raise ValueError("the data was wrong")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.npy"]
    with atomic_write(path, "w", fsync=True) as fh:
        fh.write("new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.npy"]
