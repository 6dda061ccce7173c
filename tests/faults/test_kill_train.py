"""SIGKILL `llark train` right after a checkpoint and between two checkpoints, rerun the same
command: the exported model and the loss curve equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures_train import tiny_lm_dir, write_shards
from tests.faults.killing import REPO, kill_when, llark, run_ok

STEPS, SAVE_EVERY = 12, 4  # checkpoints at steps 4, 8 and 12


def train_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    return env


def train_command(out: Path, shards: Path) -> list[str]:
    settings = {
        "model.lm_path": str(tiny_lm_dir()), "data.shards": [str(shards)], "model.dtype": "float32",
        "model.attn_implementation": "eager", "model.gradient_checkpointing": False,
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "optim.max_steps": STEPS, "global_batch": 4, "micro_batch": 2,
        "save_every": SAVE_EVERY, "log_every": 1, "output_dir": str(out), "data.num_workers": 2,
        "data.shuffle_buffer": 8, "data.group_shards": 2, "tensorboard": False,
    }
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return llark("train", *args)


def logged(out: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a line being written is not one yet)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def checkpoint_done(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()


def tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_train_killed_after_a_checkpoint_and_between_checkpoints_ends_like_an_uninterrupted_run(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, n_samples=32, n_shards=4, dim=16, frames=(3, 6), pairs=(1, 2))
    env = train_env()
    straight = tmp_path / "straight"
    run_ok(train_command(straight, shards), env=env)

    out = tmp_path / "killed"
    cmd = train_command(out, shards)
    after_checkpoint = kill_when(cmd, lambda: checkpoint_done(out, SAVE_EVERY), env=env, timeout=240,
                                 log=tmp_path / "first.log")
    between = kill_when(cmd, lambda: max((m["step"] for m in logged(out)), default=0) >= 2 * SAVE_EVERY + 1,
                        env=env, timeout=240, log=tmp_path / "second.log")
    assert after_checkpoint and between, "training ended before a kill; the test proves nothing"
    assert f"resuming at step {SAVE_EVERY}" in (tmp_path / "second.log").read_text()
    assert not checkpoint_done(out, 3 * SAVE_EVERY), "the second kill came after the next checkpoint"
    result = run_ok(cmd, env=env)
    assert f"resuming at step {2 * SAVE_EVERY}" in result.stdout

    reference = {m["step"]: m["loss"] for m in logged(straight)}
    assert sorted(reference) == list(range(1, STEPS + 1))
    curve: dict[int, list[float]] = {}
    for m in logged(out):
        curve.setdefault(m["step"], []).append(m["loss"])
    assert sorted(curve) == sorted(reference)
    # A step replayed after a resume gives the same loss as the first time, and as the straight run.
    assert {step: set(losses) for step, losses in curve.items()} == {step: {loss} for step, loss in reference.items()}
    assert any(len(losses) > 1 for losses in curve.values()), "no step was replayed; the kill was not between checkpoints"

    for name in ("model.safetensors", "projector.safetensors"):
        exported, expected = tensors(out / "final" / name), tensors(straight / "final" / name)
        assert exported.keys() == expected.keys()
        for key in expected:
            assert (exported[key] == expected[key]).all(), f"final/{name}: {key} differs from the uninterrupted run's"
    for name in ("config.json", "llark_config.json"):
        assert json.loads((out / "final" / name).read_text()) == json.loads((straight / "final" / name).read_text())
