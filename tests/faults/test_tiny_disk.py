"""A stage writing to a disk that fills up stops with a clear error, keeps what it finished, and
a rerun once there is space ends like an uninterrupted run.

The disk is a tmpfs of a few hundred kilobytes mounted for the test (this needs root); where
mounting is not allowed the same tests run with the stage's writes failing with ENOSPC instead."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

from pipeline.records import read_jsonl
from pipeline.runner import InlineExecutor, RunAborted, Stage, ledger_path, run_stage
from pipeline.testing import echo_item, enospc_after
from tests.faults.killing import cli, leftover_temporaries

FULL = re.compile(r"No space left on device.*rerun the same command", re.S)


def ledger_entries(out: Path) -> list[dict]:
    """The ledger's complete lines (a write cut short by the full disk may have torn the last)."""
    text = ledger_path(out).read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()[1:]]


def stopped_clearly(rc: int, err: str, errors_file: Path) -> None:
    detail = errors_file.read_text()[:1500] if errors_file.exists() else ""
    assert rc == 3, f"the full disk did not stop the run (exit {rc}); stderr: {err[-1500:]}; errors: {detail}"
    assert FULL.search(err), err


def without(records: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != key} for r in records]


def stop_on_a_full_disk_then_finish(args, out, errors, reference_records, path_field, small_disk, room,
                                    module, writer, writes_before_full, monkeypatch, capfd):
    """Run a stage whose files fill ``small_disk`` (a tmpfs of ``room``, or ``writer`` failing with
    ENOSPC after ``writes_before_full`` writes where mounting is not allowed): it stops clearly,
    keeping whole what it finished; with space again, the same command ends like the reference run,
    redoing nothing and leaving no partial file."""
    if small_disk.mount(room):
        rc = cli(*args, "--workers", "2")
    else:
        monkeypatch.setattr(module, writer, enospc_after(getattr(module, writer), writes_before_full))
        rc = cli(*args, "--executor", "inline")
    stopped_clearly(rc, capfd.readouterr().err, errors)
    reference = {r["id"]: r for r in reference_records}
    done = ledger_entries(out)
    assert 0 < len(done) < len(reference) and all(e["ok"] for e in done)
    for entry in done:  # what was finished is there, whole
        [record] = entry["outputs"]
        assert Path(record[path_field]).read_bytes() == Path(reference[record["id"]][path_field]).read_bytes()

    if small_disk.mounted:
        small_disk.resize("64m")
    else:
        monkeypatch.undo()
    assert cli(*args) == 0
    resumed = read_jsonl(out)
    assert without(resumed, path_field) == without(list(reference.values()), path_field)
    for record in resumed:
        assert Path(record[path_field]).read_bytes() == Path(reference[record["id"]][path_field]).read_bytes()
    entries = ledger_entries(out)
    assert len(entries) == len({e["id"] for e in entries}) == len(reference), "an item finished before the full disk was redone"
    assert leftover_temporaries(small_disk.path) == [], "partial files still take the space of the small disk"


@pytest.mark.slow
def test_crop_on_a_full_disk_stops_and_a_rerun_with_space_finishes(tmp_path, pipeline_data, small_disk, monkeypatch,
                                                                    capfd):
    import pipeline.crop

    out = tmp_path / "clips.jsonl"  # the records on a disk with room, the wavs on the small one
    args = ["crop", pipeline_data.ingested, "--out", out, "--clips-dir", small_disk.path / "clips", "--no-progress"]
    stop_on_a_full_disk_then_finish(  # 2 MB: room for five of the 24 wavs
        args, out, tmp_path / "clips.errors.jsonl", read_jsonl(pipeline_data.clips), "clip_path", small_disk, "2m",
        pipeline.crop, "write_wav16", 5, monkeypatch, capfd)


@pytest.mark.slow
def test_embed_on_a_full_disk_stops_and_a_rerun_with_space_finishes(pipeline_data, small_disk, monkeypatch, capfd):
    import pipeline.embed

    emb = small_disk.path / "emb"  # arrays, records and ledger all on the small disk
    args = ["embed", pipeline_data.clips, "--embeddings-dir", emb, "--no-progress"]
    stop_on_a_full_disk_then_finish(  # 120 KB: room for about a third of the arrays
        args, emb / "embeddings.jsonl", emb / "embeddings.errors.jsonl",
        read_jsonl(pipeline_data.embeddings / "embeddings.jsonl"), "embedding_path", small_disk, "120k",
        pipeline.embed, "save_npy", 8, monkeypatch, capfd)


@pytest.mark.slow
def test_shards_on_a_disk_filling_up_stop_clearly_and_a_rerun_with_space_finishes(pipeline_data, reference_shards,
                                                                                  small_disk, monkeypatch, capfd):
    import pipeline.shards

    out = small_disk.path / "shards"
    args = pipeline_data.shards_args(out, "--no-progress")
    mounted = small_disk.mount("64k")  # not even room for the joined samples (samples.jsonl)
    if not mounted:
        monkeypatch.setattr(pipeline.shards, "join_inputs",
                            enospc_after(pipeline.shards.join_inputs, 0, target=str(out / "samples.jsonl")))
    rc = cli(*args, *(["--workers", "2"] if mounted else ["--executor", "inline"]))
    stopped_clearly(rc, capfd.readouterr().err, out / "shards.errors.jsonl")
    assert not list(out.glob("*.tar"))

    if mounted:
        small_disk.resize("600k")  # room for the plan and about half the shards
    else:
        monkeypatch.undo()
        monkeypatch.setattr(pipeline.shards, "write_shard_item", enospc_after(pipeline.shards.write_shard_item, 20))
    rc = cli(*args, *(["--workers", "2"] if mounted else ["--executor", "inline"]))
    stopped_clearly(rc, capfd.readouterr().err, out / "shards.errors.jsonl")
    done = ledger_entries(out / "shards.jsonl")
    assert 0 < len(done) < len(read_jsonl(reference_shards / "shards.jsonl")) and all(e["ok"] for e in done)
    for entry in done:
        [shard] = entry["outputs"]
        assert (out / shard["file"]).read_bytes() == (reference_shards / shard["file"]).read_bytes()
    assert not (out / "index.json").exists(), "an index of shards that are not all written"

    if mounted:
        small_disk.resize("64m")
    else:
        monkeypatch.undo()
    assert cli(*args) == 0
    for name in ["index.json", "missing.jsonl", "shards.jsonl"] + sorted(p.name for p in reference_shards.glob("*.tar")):
        assert (out / name).read_bytes() == (reference_shards / name).read_bytes(), name
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in reference_shards.glob("*.tar"))
    assert leftover_temporaries(small_disk.path) == [], "partial files still take the space of the small disk"


def test_a_full_disk_when_the_output_file_is_written_stops_the_run_clearly(tmp_path, monkeypatch):
    """Every item is finished and in the ledger; only writing the output file fails."""
    import pipeline.runner

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i:02d}"}) + "\n" for i in range(12)))
    stage = Stage(name="echo", process=echo_item, settings={"tag": "t"})

    def full(path, lines):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline.runner, "_write_atomically", full)
    with pytest.raises(RunAborted, match=FULL):
        run_stage(stage, inp, out, executor=InlineExecutor(), progress=False)
    assert len(ledger_entries(out)) == 12
    monkeypatch.undo()
    summary = run_stage(stage, inp, out, executor=InlineExecutor(), progress=False)
    assert summary.skipped == 12 and summary.done == 0
    assert [r["id"] for r in read_jsonl(out)] == [f"r{i:02d}" for i in range(12)]
