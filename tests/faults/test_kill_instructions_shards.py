"""SIGKILL the instructions and shards stages at random points and between their phases, rerun:
the output equals an uninterrupted run's, with no duplicates and no lost items."""

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.instructions.stage import items_path, rejected_path
from pipeline.records import read_jsonl
from pipeline.runner import errors_path
from tests.faults.killing import kill_at, kill_points, kill_when, leftover_temporaries, llark, run_ok, shard_contents


@pytest.mark.slow
def test_instructions_killed_at_random_points_ends_like_an_uninterrupted_run(tmp_path, many_clips, many_instructions,
                                                                            fault_rng):
    out = tmp_path / "instructions.jsonl"
    cmd = llark("instructions", many_clips, "--out", out, "--backend", "template", "--workers", "2", "--no-progress")
    reference = read_jsonl(many_instructions)
    first, second = kill_points(fault_rng, 2, 1, len(reference) * 3 // 4)
    kills = [
        kill_when(cmd, items_path(out).exists),  # the items are written, the runner has not started
        kill_at(cmd, out, first),
        kill_at(cmd, out, second),
        # The runner's output is there, its private keys possibly not yet moved out of it.
        kill_when(cmd, out.exists),
    ]
    assert all(kills[:3]), f"a kill came too late to prove anything: {kills}"
    run_ok(cmd)

    resumed = read_jsonl(out)
    clips = read_jsonl(many_clips)
    expected = {f"{c['id']}-{family}" for c in clips for family in c["task_families"]}
    ids = Counter(r["id"] for r in resumed)
    assert not [i for i, n in ids.items() if n > 1], "duplicate instruction records"
    assert set(ids) == expected, f"lost: {sorted(expected - set(ids))[:5]}, unexpected: {sorted(set(ids) - expected)[:5]}"
    assert resumed == reference
    assert read_jsonl(rejected_path(out)) == read_jsonl(rejected_path(many_instructions))
    assert read_jsonl(errors_path(out)) == []
    assert leftover_temporaries(tmp_path) == [], "partial files of the killed runs were never cleaned up"


def same_shards_dir(result: Path, reference: Path) -> None:
    """Same files with the same bytes; the ledger (timings) and the plan (absolute paths) aside."""
    names = sorted(p.name for p in result.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in reference.iterdir() if not p.name.startswith("."))
    for name in names:
        if name.endswith(".ledger"):
            continue
        a, b = (result / name).read_bytes(), (reference / name).read_bytes()
        if name == "plan.jsonl":
            a = a.replace(str(result.resolve()).encode(), b"OUT")
            b = b.replace(str(reference.resolve()).encode(), b"OUT")
        assert a == b, f"{name} differs from the uninterrupted run's"


@pytest.mark.slow
def test_shards_killed_at_random_points_ends_like_an_uninterrupted_run(tmp_path, pipeline_data, reference_shards,
                                                                      fault_rng):
    out = tmp_path / "shards"
    cmd = llark(*pipeline_data.shards_args(out, "--workers", "2", "--no-progress"))
    first, second = kill_points(fault_rng, 2, 1, len(read_jsonl(reference_shards / "shards.jsonl")) * 3 // 4)
    kills = [
        kill_when(cmd, lambda: any(out.glob("*samples.jsonl*"))),  # joining: before any shard is planned
        kill_at(cmd, out / "shards.jsonl", first),
        kill_at(cmd, out / "shards.jsonl", second),
        kill_when(cmd, (out / "missing.jsonl").exists),  # every shard written, index.json maybe not yet
    ]
    assert all(kills[:3]), f"a kill came too late to prove anything: {kills}"
    run_ok(cmd)

    samples = shard_contents(out)
    expected = {r["id"] for r in read_jsonl(pipeline_data.instructions)}
    assert set(samples) == expected, f"lost: {sorted(expected - set(samples))[:5]}"
    assert all(set(parts) == {"npy", "json"} for parts in samples.values())
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == len(expected) == sum(s["samples"] for s in index["shards"])
    same_shards_dir(out, reference_shards)
    assert samples == shard_contents(reference_shards)
    assert leftover_temporaries(tmp_path) == [], "partial files of the killed runs were never cleaned up"

