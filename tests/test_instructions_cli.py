"""``llark instructions`` on the command line: options, checks before any work, backends chosen."""

import argparse
import asyncio
import json

import pytest

import llark.cli
from instructions_fixtures import clip, every_dataset, write_clips
from llark.commands import instructions as command
from pipeline.instructions.async_executor import AsyncExecutor, Deferred
from pipeline.instructions.fake_openai import FakeOpenAIServer
from pipeline.instructions.prompts import load_prompt_set
from pipeline.instructions.stage import read_instruction_records as read_records
from pipeline.runner import Stage, StageConfigError, run_stage


@pytest.fixture
def cli(monkeypatch):
    """``llark`` with this verb registered (as llark.cli will list it)."""
    modules = list(llark.cli.COMMAND_MODULES)
    if "llark.commands.instructions" not in modules:
        modules.append("llark.commands.instructions")
    monkeypatch.setattr(llark.cli, "COMMAND_MODULES", modules)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return llark.cli.main


def test_the_verb_registers_with_help_and_defaults(capsys):
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="verb"))
    with pytest.raises(SystemExit):
        parser.parse_args(["instructions", "--help"])
    text = capsys.readouterr().out
    for option in ("--backend", "--max-cost", "--dry-run", "--price", "--base-url", "--concurrency", "--batch-id",
                   "--families", "--seed", "--workers", "--overwrite", "--reasoning-model"):
        assert option in text
    assert "default: gpt-4" in text and "(default: 16)" in text


def test_show_prompt_prints_the_assembled_prompt_and_its_version(cli, capsys):
    assert cli(["instructions", "--show-prompt", "musicnet", "captioning"]) == 0
    out = capsys.readouterr().out
    assert load_prompt_set().prompt_version("musicnet", "captioning") in out
    assert out.endswith(load_prompt_set().system_prompt("musicnet", "captioning"))
    assert cli(["instructions", "--show-prompt", "gtzan", "captioning"]) == 2
    assert "--show-prompt" in capsys.readouterr().err


@pytest.mark.parametrize("options,named", [
    (["--families", "understanding,lyrics"], "--families"),
    (["--max-cost", "-1"], "--max-cost"),
    (["--backend", "openai"], "OPENAI_API_KEY"),
    (["--backend", "openai-batch", "--api-key-env", "MY_KEY"], "$MY_KEY"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "mystery-7b"], "--price mystery-7b="),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--price", "gpt-4=cheap"], "--price"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--concurrency", "0"], "--concurrency"),
    (["--workers", "0"], "--workers"),
    (["--prompts-dir", "/nonexistent/prompts"], "--prompts-dir"),
])
def test_invalid_configuration_fails_before_any_work_naming_the_option(cli, capsys, tmp_path, options, named):
    inp = write_clips(tmp_path / "clips.jsonl", [clip("fma")])
    out = tmp_path / "out" / "instructions.jsonl"
    assert cli(["instructions", str(inp), "--out", str(out), *options]) == 2
    assert named in capsys.readouterr().err
    assert not out.parent.exists()


def test_missing_input_and_output(cli, capsys, tmp_path):
    assert cli(["instructions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["instructions", str(tmp_path / "none.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err


def test_auto_uses_the_template_writer_unless_a_key_or_url_is_configured(cli, tmp_path, monkeypatch, capsys):
    inp = write_clips(tmp_path / "clips.jsonl", [clip("mtg_jamendo")])
    assert cli(["instructions", str(inp), "--out", str(tmp_path / "a.jsonl"), "--executor", "inline", "--no-progress"]) == 0
    assert {r["backend"] for r in read_records(tmp_path / "a.jsonl")} == {"template"}
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        assert cli(["instructions", str(inp), "--out", str(tmp_path / "b.jsonl"), "--no-progress"]) == 0
        assert len(server.chat_requests()) == 2
        assert server.chat_requests()[0].authorization == "Bearer no-key-needed"  # a server of one's own
    assert {r["backend"] for r in read_records(tmp_path / "b.jsonl")} == {"openai"}
    assert "writer: openai" in capsys.readouterr().out


def test_the_demo_stage_on_cropped_clips_without_features(cli, tmp_path):
    demo = [clip("demo", n, features=False, split=split, task_families=[] if split == "test" else
                 ["understanding", "captioning", "reasoning"]) for n, split in enumerate(["train", "valid", "test"])]
    inp = write_clips(tmp_path / "clips.jsonl", demo)
    args = ["instructions", str(inp), "--out", str(tmp_path / "instructions.jsonl"), "--backend", "template", "--no-progress"]
    assert cli(args) == 0
    records = read_records(tmp_path / "instructions.jsonl")
    assert len(records) == 6 and {r["split"] for r in records} == {"train", "valid"}
    understanding = [r for r in records if r["task_family"] == "understanding"]
    assert all("112" in " ".join(p["answer"] for p in r["pairs"]) for r in understanding)  # the demo's own tempo
    before = (tmp_path / "instructions.jsonl").read_bytes()
    assert cli(args) == 0 and (tmp_path / "instructions.jsonl").read_bytes() == before  # a rerun changes nothing


def test_strict_exits_1_when_an_item_failed(cli, tmp_path):
    bare = clip("fma", features=False, annotations={"track_id": 1, "track": {}, "album": {}, "artist": {}})
    inp = write_clips(tmp_path / "clips.jsonl", [bare, clip("fma", 2)])
    base = ["instructions", str(inp), "--out", str(tmp_path / "o.jsonl"), "--backend", "template", "--no-progress",
            "--executor", "inline"]
    assert cli(base) == 0
    assert cli(base + ["--strict"]) == 1
    errors = [json.loads(x) for x in (tmp_path / "o.errors.jsonl").read_text().splitlines()]
    assert {e["code"] for e in errors} == {"too_little_metadata"}


def test_the_async_executor_defers_fails_and_stops(tmp_path):
    async def process(row, state):
        await asyncio.sleep(0.01 * (row["n"] % 3))
        if row["n"] == 3:
            raise Deferred("later")
        if row["n"] == 4:
            raise ValueError(f"bad item with secret {state['secret']}")
        return {"id": row["id"], "n": row["n"]}

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"i{n}", "n": n}) + "\n" for n in range(8)))
    executor = AsyncExecutor(3, redact=lambda text: text.replace("hunter2", "[redacted]"))
    summary = run_stage(Stage("t", process, {"secret": "hunter2"}), inp, tmp_path / "out.jsonl", executor=executor,
                        progress=False)
    assert summary.done == 6 and executor.deferred == {"later": 1}
    assert [json.loads(x)["n"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 1, 2, 5, 6, 7]
    error = json.loads((tmp_path / "out.errors.jsonl").read_text())
    assert error["code"] == "exception:ValueError" and "[redacted]" in error["reason"] and "hunter2" not in json.dumps(error)

    async def fatal(row, state):
        if row["n"] == 2:
            raise StageConfigError("the key was refused")
        await asyncio.sleep(0.2)
        return {"id": row["id"]}

    with pytest.raises(StageConfigError, match="refused"):
        run_stage(Stage("t", fatal), inp, tmp_path / "fatal.jsonl", executor=AsyncExecutor(2), progress=False)


def test_every_dataset_runs_through_the_cli(cli, tmp_path):
    inp = write_clips(tmp_path / "clips.jsonl", every_dataset(1))
    assert cli(["instructions", str(inp), "--out", str(tmp_path / "o.jsonl"), "--backend", "template",
                "--families", "captioning", "--no-progress", "--strict", "--executor", "inline"]) == 0
    records = read_records(tmp_path / "o.jsonl")
    assert {r["dataset"] for r in records} == {"musiccaps", "yt8m_musictextclips", "demo", "musicnet"}
    assert all(r["task_family"] == "captioning" for r in records)
