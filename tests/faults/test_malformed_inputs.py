"""Malformed input lines (cut in half, a record missing required fields) become error records with
their reason, and every other item goes through unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.records import read_jsonl
from pipeline.runner import errors_path
from tests.faults.killing import cli, shard_contents


def cut(line: str) -> str:
    return line[: len(line) // 2]


def drop_field(line: str, field: str) -> str:
    record = json.loads(line)
    del record[field]
    return json.dumps(record)


@pytest.mark.slow
def test_instructions_report_broken_clip_lines_and_write_the_rest(tmp_path, pipeline_data):
    lines = pipeline_data.clips.read_text().splitlines()
    broken = {4: cut(lines[3]), 8: drop_field(lines[7], "split"), len(lines): cut(lines[-1])}  # by line number
    for number, line in broken.items():
        lines[number - 1] = line
    inp, out = tmp_path / "clips.jsonl", tmp_path / "instructions.jsonl"
    inp.write_text("\n".join(lines))  # the last line is cut short: no newline after it
    args = ["instructions", inp, "--out", out, "--backend", "template", "--executor", "inline", "--no-progress"]
    assert cli(*args) == 0

    errors = {e["id"]: e for e in read_jsonl(errors_path(out))}
    assert set(errors) == {f"line-{n}" for n in broken}
    assert all(e["code"] == "invalid_clip" for e in errors.values())
    assert "not valid JSON" in errors["line-4"]["reason"] and "not valid JSON" in errors[f"line-{len(lines)}"]["reason"]
    assert "split" in errors["line-8"]["reason"] and "Field required" in errors["line-8"]["reason"]
    lost = {json.loads(pipeline_data.clips.read_text().splitlines()[n - 1])["id"] for n in broken}
    expected = [r for r in read_jsonl(pipeline_data.instructions) if r["clip_id"] not in lost]
    assert read_jsonl(out) == expected and expected
    assert cli(*args, "--strict") == 1, "--strict must fail a run with error records"


def break_instructions(pipeline_data, tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """The instruction records with line 3 cut in half, line 6 without its pairs and the last
    line cut short; returns the file and the ids of the broken records by line number."""
    lines = pipeline_data.instructions.read_text().splitlines()
    ids = {n: json.loads(lines[n - 1])["id"] for n in (3, 6, len(lines))}
    lines[2], lines[5], lines[-1] = cut(lines[2]), drop_field(lines[5], "pairs"), cut(lines[-1])
    path = tmp_path / "instructions.jsonl"
    path.write_text("\n".join(lines))
    return path, ids


@pytest.mark.slow
def test_shards_report_broken_instruction_lines_and_shard_the_rest(tmp_path, pipeline_data, reference_shards):
    instructions, broken = break_instructions(pipeline_data, tmp_path)
    out = tmp_path / "shards"
    assert cli("shards", "--clips", pipeline_data.clips, "--instructions", instructions, "--embeddings",
               pipeline_data.embeddings, "--out", out, "--shard-samples", "1", "--executor", "inline",
               "--no-progress") == 0

    missing = read_jsonl(out / "missing.jsonl")
    invalid = {m["detail"].split(":")[0]: m for m in missing if m["reason"] == "invalid_instruction"}
    assert set(invalid) == {f"line {n}" for n in broken}
    assert "not valid JSON" in invalid["line 3"]["detail"] and "pairs" in invalid["line 6"]["detail"]
    # The clips of the broken records are short of those instructions, and say so.
    assert {f"{m['clip_id']}-{m['task_family']}" for m in missing if m["reason"] == "no_instructions"} == set(broken.values())
    reference = shard_contents(reference_shards)
    assert shard_contents(out) == {k: v for k, v in reference.items() if k not in broken.values()}
    assert json.loads((out / "index.json").read_text())["total_samples"] == len(reference) - len(broken)


@pytest.mark.slow
def test_shards_report_clips_whose_embedding_record_is_broken(tmp_path, pipeline_data, reference_shards):
    embeddings = tmp_path / "emb"
    embeddings.mkdir()
    shutil.copy(pipeline_data.embeddings / "encoder.json", embeddings)
    lines = (pipeline_data.embeddings / "embeddings.jsonl").read_text().splitlines()
    torn = json.loads(lines[4])["id"]
    lines[4] = cut(lines[4])
    (embeddings / "embeddings.jsonl").write_text("\n".join(lines) + "\n")  # the arrays stay where they are
    out = tmp_path / "shards"
    assert cli("shards", "--clips", pipeline_data.clips, "--instructions", pipeline_data.instructions, "--embeddings",
               embeddings, "--out", out, "--shard-samples", "1", "--executor", "inline", "--no-progress") == 0

    missing = read_jsonl(out / "missing.jsonl")
    assert {(m["clip_id"], m["reason"]) for m in missing} == {(torn, "no_embedding")}
    assert len(missing) == 2  # both task families of that clip
    reference = shard_contents(reference_shards)
    assert shard_contents(out) == {k: v for k, v in reference.items() if not k.startswith(f"{torn}-")}


@pytest.mark.slow
def test_shards_refuse_a_clip_file_with_a_broken_line_naming_it(tmp_path, pipeline_data, capfd):
    lines = pipeline_data.clips.read_text().splitlines()
    lines[9] = cut(lines[9])
    clips = tmp_path / "clips.jsonl"
    clips.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    rc = cli("shards", "--clips", clips, "--instructions", pipeline_data.instructions, "--embeddings",
             pipeline_data.embeddings, "--out", out, "--shard-samples", "1", "--executor", "inline", "--no-progress")
    err = capfd.readouterr().err
    assert rc == 2
    assert f"--clips {clips}: line 10 is not valid JSON" in err
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()
