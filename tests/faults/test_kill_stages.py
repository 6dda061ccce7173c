"""SIGKILL a stage at several points, rerun: the output equals an uninterrupted run's, with no
duplicates and no lost items."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.records import read_jsonl
from tests.faults.killing import REPO, kill_at, llark


@pytest.fixture(scope="module")
def demo_records(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    subprocess.run(llark("demo-data", "--out", str(d / "src"), "--clips", "24", "--duration", "4"), cwd=REPO, check=True, capture_output=True)
    subprocess.run(llark("ingest", "demo", "--root", str(d / "src"), "--out", str(d / "in.jsonl")), cwd=REPO, check=True, capture_output=True)
    return d / "in.jsonl"


def strip_paths(records):
    return [{k: v for k, v in r.items() if k != "clip_path"} for r in records]


def test_crop_killed_three_times_ends_like_an_uninterrupted_run(tmp_path, demo_records):
    out = tmp_path / "clips.jsonl"
    cmd = llark("crop", str(demo_records), "--out", str(out), "--clips-dir", str(tmp_path / "clips"), "--workers", "2", "--no-progress")
    kills = [kill_at(cmd, out, after_items=n) for n in (3, 9, 16)]
    assert any(kills), "the stage finished before any kill; the test proves nothing"
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    clean = tmp_path / "clean.jsonl"
    subprocess.run(llark("crop", str(demo_records), "--out", str(clean), "--clips-dir", str(tmp_path / "clean-clips"), "--no-progress"),
                   cwd=REPO, check=True, capture_output=True)
    resumed, reference = read_jsonl(out), read_jsonl(clean)
    assert strip_paths(resumed) == strip_paths(reference)
    assert len({r["id"] for r in resumed}) == len(resumed) == 24
    for a, b in zip(resumed, reference):
        assert Path(a["clip_path"]).read_bytes() == Path(b["clip_path"]).read_bytes()
    assert read_jsonl(tmp_path / "clips.errors.jsonl") == []


def test_a_jsonl_line_cut_in_half_is_an_error_and_the_rest_goes_through(tmp_path, demo_records):
    lines = demo_records.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:5] + [lines[5][: len(lines[5]) // 2]] + lines[6:10]) + "\n")
    out = tmp_path / "o.jsonl"
    subprocess.run(llark("crop", str(cut), "--out", str(out), "--clips-dir", str(tmp_path / "c"), "--no-progress"), cwd=REPO, check=True, capture_output=True)
    assert len(read_jsonl(out)) == 9
    [error] = read_jsonl(tmp_path / "o.errors.jsonl")
    assert error["code"] == "malformed_input" and error["id"] == "line-6"


SLOW_WRITER = """
import sys
from pipeline.runner import InlineExecutor, Stage, run_stage
from pipeline.testing import echo_item
run_stage(Stage(name="echo", process=echo_item, settings={}), sys.argv[1], sys.argv[2], executor=InlineExecutor(), progress=False)
"""


def test_two_runs_on_one_output_refuse_to_interleave(tmp_path, demo_records):
    slow = tmp_path / "slow.jsonl"
    slow.write_text("".join(json.dumps({"id": f"s{i:03d}", "sleep": 0.1}) + "\n" for i in range(600)))
    out = tmp_path / "o.jsonl"
    first = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(slow), str(out)], cwd=REPO, start_new_session=True)
    try:
        lock = tmp_path / "o.jsonl.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        second = subprocess.run(llark("crop", str(demo_records), "--out", str(out), "--clips-dir", str(tmp_path / "c"), "--no-progress"),
                                cwd=REPO, capture_output=True, text=True)
        assert first.poll() is None, "the first run ended before the second started; the test proves nothing"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "being written by another run" in second.stderr
    assert not (tmp_path / "c").exists(), "the refused run must not have started any work"
    text = (tmp_path / "o.jsonl.ledger").read_text()
    complete = text[: text.rfind("\n") + 1]  # the kill may have torn the last line
    ledger = [json.loads(line) for line in complete.splitlines()[1:]]
    assert ledger and all(entry["id"].startswith("s") for entry in ledger)


@pytest.fixture(scope="module")
def cropped(tmp_path_factory, demo_records):
    d = tmp_path_factory.mktemp("cropped")
    subprocess.run(llark("crop", str(demo_records), "--out", str(d / "clips.jsonl"), "--clips-dir", str(d / "clips"), "--no-progress"),
                   cwd=REPO, check=True, capture_output=True)
    return d / "clips.jsonl"


STAGE_COMMANDS = {
    "augment": lambda inp, out, work: llark("augment", str(inp), "--out", str(out), "--workers", "2", "--no-progress"),
    "embed": lambda inp, out, work: llark("embed", str(inp), "--embeddings-dir", str(work / "emb"), "--out", str(out),
                                          "--workers", "2", "--no-progress"),
}


def comparable(records):
    """Records without the paths that differ between two output directories; the files' bytes instead."""
    out = []
    for r in records:
        r = dict(r)
        if "embedding_path" in r:
            r["embedding_bytes"] = Path(r.pop("embedding_path")).read_bytes()
        out.append(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_stage_killed_three_times_ends_like_an_uninterrupted_run(tmp_path, cropped, stage):
    command = STAGE_COMMANDS[stage]
    out = tmp_path / "killed" / "out.jsonl"
    out.parent.mkdir()
    cmd = command(cropped, out, tmp_path / "killed")
    kills = [kill_at(cmd, out, after_items=n) for n in (2, 7, 13)]
    assert any(kills), "the stage finished before any kill; the test proves nothing"
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    clean = tmp_path / "clean" / "out.jsonl"
    clean.parent.mkdir()
    subprocess.run(command(cropped, clean, tmp_path / "clean"), cwd=REPO, check=True, capture_output=True)
    resumed, reference = read_jsonl(out), read_jsonl(clean)
    assert len({r["id"] for r in resumed}) == len(resumed) == 24
    assert comparable(resumed) == comparable(reference)
