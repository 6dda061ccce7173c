"""The shards stage (join, plan, write) and validate-shards, read back with webdataset's own reader."""

import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.encoders import write_manifest
from pipeline.records import ClipRecord, read_jsonl
from pipeline.runner import InlineExecutor, StageConfigError
from pipeline.shards import INDEX_JSON, build_shards, parse_npy, tar_member
from pipeline.validate_shards import validate_shard, validate_shards
import llark.cli

DIM = 16
MANIFEST = {"manifest_version": 1, "name": "testenc", "layer": None, "frame_rate_hz": 10.0, "dim": DIM,
            "dtype": "float16", "config": {"kind": "fixture"}, "packages": {}}


def cli(argv, monkeypatch):
    return llark.cli.main(argv)


def instruction(clip_id, family, n_pairs=2, **extra):
    return {"id": f"{clip_id}-{family}", "clip_id": clip_id, "task_family": family,
            "pairs": [{"question": f"q{k} about {clip_id}?", "answer": f"a{k}"} for k in range(n_pairs)],
            "backend": "template", "model": "none", "prompt_version": "v1", "dataset": "fixture", "split": "train",
            **extra}


@pytest.fixture
def inputs(tmp_path):
    """12 training clips (two families each, some three), 2 valid, 2 evaluation clips, and one of
    every way a sample can be missing."""
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb"
    write_manifest(emb, MANIFEST)
    clips, records, errors, instructions = [], [], [], []
    splits = ["train"] * 12 + ["valid"] * 2 + ["test"] * 2
    for k, split in enumerate(splits):
        cid = f"{split}-{k:02d}"
        families = [] if split == "test" else (["understanding", "reasoning"] + (["captioning"] if k % 4 == 0 else []))
        clips.append(ClipRecord(id=cid, dataset="fixture", split=split, audio_path=f"/data/{cid}.wav",
                                task_families=families, start_s=0.0, end_s=25.0,
                                features={"tempo_bpm": 100 + k}).model_dump(mode="json", exclude_none=True))
        if cid == "train-05":
            errors.append({"id": cid, "stage": "embed", "code": "silent", "reason": "the window is silent"})
            continue
        if cid == "train-06":
            continue  # never embedded
        frames = 20 + k
        path = emb / "fixture" / f"{cid}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        array = rng.standard_normal((frames, DIM)).astype(np.float16)
        if cid == "train-08":
            array[3, 4] = np.nan
        np.save(path, array)
        records.append({"id": cid, "dataset": "fixture", "split": split, "embedding_path": str(path),
                        "frames": frames, "dim": DIM, "dtype": "float16", "encoder": "testenc", "duration_s": 25.0})
    (emb / "fixture" / "train-07.npy").unlink()  # the record says it is there
    for clip in clips:
        for family in clip["task_families"]:
            if clip["id"] == "train-03" and family == "reasoning":
                continue  # the instructions stage produced nothing for it
            instructions.append(instruction(clip["id"], family, split=clip["split"]))
    instructions.append(instruction("ghost-01", "understanding"))
    instructions.append(instruction("train-01", "understanding"))  # a duplicate line
    instructions.append({**instruction("train-09", "captioning"), "pairs": []})
    instructions.append({"id": "train-10-humming", "clip_id": "train-10", "task_family": "humming", "pairs": []})
    write = lambda name, rows: (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("clips.jsonl", clips)
    write("instructions.jsonl", instructions)
    write("emb/embeddings.jsonl", records)
    write("emb/embeddings.errors.jsonl", errors)
    return tmp_path


def build(inputs, out="shards", **kw):
    kw.setdefault("executor", InlineExecutor())
    return build_shards(inputs / "clips.jsonl", inputs / "instructions.jsonl", inputs / "emb", inputs / out,
                        progress=False, **kw)


def read_back(shards_dir):
    """Every sample of every indexed shard, through webdataset's reader and default decoders."""
    index = json.loads((shards_dir / INDEX_JSON).read_text())
    urls = [str(shards_dir / s["file"]) for s in index["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode()), index


def test_join_reports_every_missing_part(inputs):
    summary = build(inputs)
    missing = read_jsonl(inputs / "shards" / "missing.jsonl")
    by_reason = Counter(m["reason"] for m in missing)
    assert by_reason == {
        "no_instructions": 1,         # train-03 reasoning
        "no_clip_record": 1, "duplicate_instruction": 1, "no_pairs": 1, "invalid_instruction": 1,
        "embedding_failed": 2,        # train-05, both families
        "no_embedding": 2,            # train-06
        "embedding_file_missing": 2,  # train-07
        "bad_embedding": 3,           # train-08 (three families) holds a NaN: skipped when its shards are written
    }
    assert summary.missing == by_reason and summary.clips_without_families == 2
    failed = [m for m in missing if m["reason"] == "embedding_failed"]
    assert {m["clip_id"] for m in failed} == {"train-05"} and "silent" in failed[0]["detail"]
    assert {m["task_family"] for m in missing if m["clip_id"] == "train-08"} == {"understanding", "reasoning", "captioning"}
    assert any("non_finite" in m["detail"] for m in missing if m["reason"] == "bad_embedding")


def test_shards_read_back_with_webdataset(inputs):
    summary = build(inputs)
    samples, index = read_back(inputs / "shards")
    assert summary.complete and len(samples) == index["total_samples"] == summary.samples
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys))
    expected = {f"{c}-{f}" for c, f in (("train-00", "captioning"), ("valid-12", "reasoning"), ("train-03", "understanding"))}
    assert expected <= set(keys) and "train-03-reasoning" not in keys and not any(k.startswith("test-") for k in keys)
    for sample in samples:
        meta = sample["json"]
        assert sample["__key__"] == meta["key"] == f"{meta['clip_id']}-{meta['task_family']}"
        source = np.load(inputs / "emb" / "fixture" / f"{meta['clip_id']}.npy", allow_pickle=False)
        assert sample["npy"].dtype == np.float16 and np.array_equal(sample["npy"], source)
        assert meta["encoding"]["frames"] == source.shape[0] and meta["encoding"]["encoder"] == "testenc"
        assert meta["clip"]["id"] == meta["clip_id"] and meta["clip"]["features"]["tempo_bpm"] >= 100
        assert meta["pairs"][0]["question"].startswith("q0 about") and meta["instructions"]["prompt_version"] == "v1"
        assert Path(sample["__url__"]).name.split("-")[1:3] == [meta["split"], meta["task_family"]]
    names = sorted(s["file"] for s in index["shards"])
    assert names == [f"llark-{s}-{f}-fixture-testenc-000000.tar" for s, f in [
        ("train", "captioning"), ("train", "reasoning"), ("train", "understanding"),
        ("valid", "captioning"), ("valid", "reasoning"), ("valid", "understanding")]]
    assert index["splits"]["train"]["understanding"] == {"shards": 1, "samples": 8}
    assert {s["dataset"] for s in index["shards"]} == {"fixture"}  # one shard set per dataset too
    assert json.loads((inputs / "shards" / "encoder.json").read_text()) == MANIFEST


def test_shards_are_cut_by_size_shuffled_by_seed_and_reproducible(inputs):
    build(inputs, out="a", shard_samples=3)
    _, index = read_back(inputs / "a")
    understanding = [s for s in index["shards"] if s["split"] == "train" and s["task_family"] == "understanding"]
    assert [s["samples"] for s in understanding] == [3, 3, 2]
    build(inputs, out="by-bytes", shard_bytes=2500)  # a sample is ~0.6 kB of array plus its JSON and headers
    _, by_bytes = read_back(inputs / "by-bytes")
    assert len(by_bytes["shards"]) > len(index["shards"]) and by_bytes["total_samples"] == index["total_samples"]

    lines = (inputs / "instructions.jsonl").read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    (inputs / "instructions.jsonl").write_text("".join(lines))
    build(inputs, out="b", shard_samples=3)
    for shard in index["shards"]:
        assert (inputs / "a" / shard["file"]).read_bytes() == (inputs / "b" / shard["file"]).read_bytes()
    build(inputs, out="c", shard_samples=3, seed=1)
    first = lambda d: [s["__key__"] for s in read_back(inputs / d)[0]]
    assert first("a") != first("c") and sorted(first("a")) == sorted(first("c"))
    with tarfile.open(inputs / "a" / understanding[0]["file"]) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
    assert [m.name.split(".")[1] for m in members] == ["npy", "json"] * 3


def test_rerun_resumes_and_a_changed_plan_needs_overwrite(inputs):
    build(inputs, shard_samples=3)
    again = build(inputs, shard_samples=3)
    assert again.run.done == 0 and again.run.skipped == again.planned_shards and again.complete
    with pytest.raises(StageConfigError, match="--overwrite"):
        build(inputs, shard_samples=4)
    redone = build(inputs, shard_samples=4, overwrite=True)
    files = sorted(p.name for p in (inputs / "shards").glob("*.tar"))
    assert redone.complete and len(files) == redone.planned_shards
    assert not validate_shards(inputs / "shards", workers=1).problems


def test_an_encoder_mismatch_between_embeddings_and_shards_stops_before_any_work(inputs):
    out = inputs / "shards"
    write_manifest(out, {**MANIFEST, "dim": DIM + 1})
    with pytest.raises(StageConfigError, match="encoder.json.*--embeddings.*dim"):
        build(inputs)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json"]


# --- validate-shards ----------------------------------------------------------------------------


@pytest.fixture
def shards(inputs):
    build(inputs, shard_samples=4)
    return inputs / "shards"


def members_of(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def rewrite(path, members):
    with open(path, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_member(name, len(data)), io.BytesIO(data))


def npy_bytes(array, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def first_shard(shards):
    """The shard with the most samples."""
    index = json.loads((shards / INDEX_JSON).read_text())
    return shards / max(index["shards"], key=lambda s: s["samples"])["file"]


def codes(report):
    return Counter(p.code for p in report.problems)


def test_good_shards_validate(shards):
    report = validate_shards(shards, workers=2)
    index = json.loads((shards / INDEX_JSON).read_text())
    assert report.ok and report.samples == index["total_samples"] and report.shards == len(index["shards"])


def test_a_sample_of_another_dataset_than_its_shards_is_reported(shards):
    index = json.loads((shards / INDEX_JSON).read_text())
    index["shards"][0]["dataset"] = "gtzan"
    (shards / INDEX_JSON).write_text(json.dumps(index))
    report = validate_shards(shards, workers=1)
    assert any("clip.dataset 'fixture' in a 'gtzan' shard" in p.message for p in report.problems), report.problems


def test_a_truncated_tar_is_reported_with_its_shard_and_offset(shards):
    path = first_shard(shards)
    listing = [m for m, _ in members_of(path)]
    cut = listing[2]  # the second sample's array
    path.write_bytes(path.read_bytes()[: cut.offset_data + 100])
    report = validate_shards(shards, workers=1)
    truncated = [p for p in report.problems if p.code == "truncated"]
    assert truncated and truncated[0].shard == path.name and truncated[0].offset == cut.offset
    assert "count_mismatch" in codes(report)
    # webdataset's own reader fails on it too, rather than yielding a partial sample
    with pytest.raises(Exception):
        list(wds.WebDataset([str(path)], shardshuffle=False).decode())


def test_a_tar_cut_between_members_or_with_a_corrupt_header_is_reported(shards):
    path = first_shard(shards)
    data = path.read_bytes()
    listing = [m for m, _ in members_of(path)]
    path.write_bytes(data[: listing[4].offset])  # two whole samples, no end-of-archive blocks
    problems = validate_shard(path, json.loads((shards / "encoder.json").read_text())).problems
    assert [(p.code, p.offset) for p in problems] == [("truncated", listing[4].offset)]
    corrupt = bytearray(data)
    corrupt[listing[4].offset + 148 : listing[4].offset + 156] = b"99999999"  # its header checksum
    path.write_bytes(bytes(corrupt))
    report = validate_shards(shards, workers=1)
    assert any(p.code == "bad_header" and p.offset == listing[4].offset for p in report.problems)


def test_wrong_dim_nan_and_pickled_payloads_are_reported(shards):
    path = first_shard(shards)
    members = [(m.name, data) for m, data in members_of(path)]
    key0, key1, key2 = members[0][0].split(".")[0], members[2][0].split(".")[0], members[4][0].split(".")[0]
    members[0] = (members[0][0], npy_bytes(np.zeros((5, DIM + 1), np.float16)))
    nan = np.load(io.BytesIO(members[2][1]))
    nan[0, 0] = np.nan
    members[2] = (members[2][0], npy_bytes(nan))
    members[4] = (members[4][0], npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True))
    members.insert(6, (f"{key2}.pyd", b"\x80\x04K\x01."))
    rewrite(path, members)
    report = validate_shards(shards, workers=1)
    found = {(p.code, p.key) for p in report.problems}
    assert {("wrong_dim", key0), ("non_finite", key1), ("pickled_payload", key2)} <= found
    assert sum(p.code == "pickled_payload" for p in report.problems) == 2  # the object array and the .pyd
    assert ("mismatch", key0) not in found  # the frames check is skipped for an unreadable array


def test_duplicate_keys_bad_json_and_index_disagreements_are_reported(shards):
    index = json.loads((shards / INDEX_JSON).read_text())
    a, b = (shards / s["file"] for s in sorted(index["shards"], key=lambda s: -s["samples"])[:2])
    members_a = [(m.name, data) for m, data in members_of(a)]
    members_b = [(m.name, data) for m, data in members_of(b)]
    members_b[:2] = members_a[:2]  # the same sample in two shards
    bad = json.loads(members_b[3][1])
    del bad["pairs"]
    members_b[3] = (members_b[3][0], json.dumps(bad).encode())
    members_b.append(members_b[0])  # a key again, not consecutive
    rewrite(b, members_b)
    shutil.copy(a, shards / "stray-000000.tar")
    next(s for s in index["shards"] if s["file"] == a.name)["samples"] += 1
    index["shards"].append({"file": "gone.tar", "split": "train", "task_family": "understanding", "samples": 1})
    (shards / INDEX_JSON).write_text(json.dumps(index))
    report = validate_shards(shards, workers=1)
    assert codes(report)["duplicate_key"] >= 2
    assert {"bad_schema", "count_mismatch", "missing_shard", "unindexed_shard", "incomplete_sample"} <= set(codes(report))
    assert any(p.code == "duplicate_key" and p.shard == b.name and a.name in p.message for p in report.problems)


def test_parse_npy_never_unpickles():
    payload = npy_bytes(np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as exc:
        parse_npy(payload, "float16", DIM)
    assert exc.value.code == "pickled_payload"
    with pytest.raises(ValueError) as exc:
        parse_npy(npy_bytes(np.zeros((3, DIM), np.float32)), "float16", DIM)
    assert exc.value.code == "wrong_dtype"
    assert parse_npy(npy_bytes(np.ones((3, DIM), np.float16)), "float16", DIM).shape == (3, DIM)


def test_shards_and_validate_verbs(inputs, monkeypatch, capsys):
    args = ["shards", "--clips", str(inputs / "clips.jsonl"), "--instructions", str(inputs / "instructions.jsonl"),
            "--embeddings", str(inputs / "emb"), "--out", str(inputs / "out"), "--executor", "inline", "--no-progress"]
    assert cli(args, monkeypatch) == 0
    assert cli(args + ["--strict"], monkeypatch) == 1  # some clips are missing parts
    assert cli(["validate-shards", str(inputs / "out"), "--workers", "1"], monkeypatch) == 0
    assert "no problems" in capsys.readouterr().out
    shard = first_shard(inputs / "out")
    shard.write_bytes(shard.read_bytes()[:3000])
    assert cli(["validate-shards", str(inputs / "out"), "--out", str(inputs / "report.jsonl")], monkeypatch) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err and "@ byte" in err
    assert read_jsonl(inputs / "report.jsonl")[0]["shard"] == shard.name
    assert cli(["validate-shards", str(inputs / "nowhere")], monkeypatch) == 2
    assert cli(["shards", "--clips", str(inputs / "clips.jsonl"), "--instructions", str(inputs / "missing.jsonl"),
                "--embeddings", str(inputs / "emb"), "--out", str(inputs / "o2")], monkeypatch) == 2
    assert "--instructions" in capsys.readouterr().err
