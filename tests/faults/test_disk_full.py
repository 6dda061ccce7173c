"""A full disk stops a run with a clear error and loses nothing already finished."""

import errno
import json

import pytest

from pipeline.records import read_jsonl
from pipeline.runner import InlineExecutor, Ledger, LocalExecutor, RunAborted, Stage, ledger_path, run_stage
from pipeline.testing import disk_full_on, echo_item


def rows_file(tmp_path, n=12):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i:02d}"}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("executor", [InlineExecutor(), LocalExecutor(2)], ids=["inline", "local"])
def test_an_item_hitting_a_full_disk_stops_the_run_and_a_rerun_finishes(tmp_path, executor):
    inp, out = rows_file(tmp_path), tmp_path / "out.jsonl"
    flag = tmp_path / "disk-is-full"
    flag.touch()
    stage = Stage(name="s", process=disk_full_on, settings={"full_at": "r05", "disk_full_flag": str(flag)})
    with pytest.raises(RunAborted, match="No space left on device.*rerun the same command"):
        run_stage(stage, inp, out, executor=executor, progress=False)
    entries = [json.loads(line) for line in ledger_path(out).read_text().splitlines()[1:]]
    assert "r05" not in {e["id"] for e in entries}, "the item that hit the full disk is not recorded"
    assert all(e["ok"] for e in entries) and len(entries) >= 1
    assert not out.exists()
    flag.unlink()  # space is back
    summary = run_stage(stage, inp, out, executor=executor, progress=False)
    assert summary.skipped == len(entries) and summary.failed_total == 0
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i:02d}" for i in range(12)]


def test_a_ledger_write_error_stops_the_run_keeping_what_was_written(tmp_path, monkeypatch):
    inp, out = rows_file(tmp_path), tmp_path / "out.jsonl"
    stage = Stage(name="echo", process=echo_item, settings={"tag": "d"})
    real_write, calls = Ledger._write, {"n": 0}

    def failing_write(self, line, sync=False):
        calls["n"] += 1
        if calls["n"] > 5:  # the header and four items fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, line, sync)

    monkeypatch.setattr(Ledger, "_write", failing_write)
    with pytest.raises(RunAborted, match="No space left"):
        run_stage(stage, inp, out, executor=InlineExecutor(), progress=False)
    monkeypatch.setattr(Ledger, "_write", real_write)
    summary = run_stage(stage, inp, out, executor=InlineExecutor(), progress=False)
    assert summary.skipped == 4 and summary.done == 8
    run_stage(stage, inp, tmp_path / "clean.jsonl", executor=InlineExecutor(), progress=False)
    assert read_jsonl(out) == read_jsonl(tmp_path / "clean.jsonl")
