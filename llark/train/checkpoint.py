"""Checkpoints that resume exactly: each rank's RNG state and data position beside DeepSpeed's own
states, ``trainer_state.json`` written last (a checkpoint without it is incomplete and never resumed
from), which checkpoint a run resumes from and whether its settings allow it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llark.train.config import TrainConfig, TrainConfigError
from llark.train.optimizer import lr_multiplier
from pipeline.files import check_same_settings, write_json

if TYPE_CHECKING:
    from llark.data import LoaderState

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint without it is incomplete
# Settings that may change when resuming (the rest must match the checkpoint's). data.num_workers may not:
# each loader worker's position is saved, and another count would replay or skip samples.
RESUMABLE_CHANGES = {"save_every", "keep_checkpoints", "log_every", "tensorboard", "wandb_project", "export",
                     "resume", "output_dir", "export_dir", "deepspeed", "optim.extend_schedule",
                     "model.projector_init", "model.projector_init_samples",  # these two: a new run only
                     "model.compile",  # the same weights and math, compiled or not
                     "validation.every", "validation.max_examples", "validation.export_best", "validation.tasks",
                     "validation.clips", "validation.embeddings", "validation.max_clips"}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step_{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


def remove_old_checkpoints(output_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_to_resume(resume: str, output_dir: Path) -> Path | None:
    """``resume``: never; auto (the latest complete checkpoint in ``output_dir``, if any); or a checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise TrainConfigError(f"resume: {path} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.json"


def save_rank_state(path: Path, rank: int, loader_state: LoaderState) -> None:
    """This rank's data position and RNG state."""
    write_json(_rank_file(path, rank), {"loader": loader_state.to_dict(), "rng": rng_state()})


def restore_rank_state(path: Path, rank: int, num_workers: int) -> LoaderState:
    """Puts this rank's RNG state back and returns its data position."""
    from llark.data import LoaderState

    mine = json.loads(_rank_file(path, rank).read_text(encoding="utf-8"))
    set_rng_state(mine["rng"])
    return LoaderState.from_dict(mine["loader"], num_workers)


def save_trainer_state(path: Path, step: int, world_size: int, cfg: TrainConfig, **more: Any) -> None:
    write_json(path / TRAINER_STATE, {"step": step, "world_size": world_size, "config": cfg.model_dump(mode="json"),
                                      **more})


def read_trainer_state(path: Path, world_size: int, cfg: TrainConfig) -> dict[str, Any]:
    """The checkpoint's trainer state, refused unless it was written by as many processes and with the same
    settings (but for RESUMABLE_CHANGES)."""
    state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    if state["world_size"] != world_size:
        raise TrainConfigError(f"resume: {path} was written by {state['world_size']} processes, this run has "
                               f"{world_size}; resume with the same number of processes")
    before = state["config"]["optim"]["max_steps"]
    if before != cfg.optim.max_steps and not cfg.optim.extend_schedule:
        o = cfg.optim
        was = lr_multiplier(state["step"], o.warmup_steps, before, o.min_lr_ratio)
        would = lr_multiplier(state["step"], o.warmup_steps, o.max_steps, o.min_lr_ratio)
        raise TrainConfigError(
            f"resume: {path} was trained towards optim.max_steps={before}, this run says {o.max_steps}: at step "
            f"{state['step']} the learning-rate multiplier would jump from {was:.2f} to {would:.2f} (the cosine "
            "schedule is stretched over the new length); to do that on purpose add --set optim.extend_schedule=true")
    try:
        # A setting that a checkpoint written by an earlier version lacks had its default there.
        before_settings = TrainConfig.model_validate(state["config"]).model_dump(mode="json")
    except ValueError:
        before_settings = state["config"]
    check_same_settings(f"resume: {path}", before_settings, cfg.model_dump(mode="json"),
                        "use resume: never (or another output_dir) to start over", TrainConfigError,
                        may_change=RESUMABLE_CHANGES | {"optim.max_steps"}, keep_whole=("lora",))
    return state


def load_trained_weights(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module loader for checkpoints that hold the trained parameters only: every one of them
    must be there; the frozen ones stay as built from model.lm_path."""
    trained = [name for name, p in dst.named_parameters() if p.requires_grad]
    missing = [name for name in trained if name not in src]
    if missing:
        raise TrainConfigError(f"resume: the checkpoint lacks {len(missing)} trained weights, e.g. {missing[:3]}; "
                               "was it written with another model.mode or LoRA setting?")
    dst.load_state_dict({name: src[name] for name in trained}, strict=False)
