"""The processes of a run: rank and world size from the launcher's environment (deepspeed, torchrun,
accelerate, SLURM's srun, or none for one process), the check that every rank sees the same
output directory, and the DeepSpeed JSON with the fields the training config owns filled in."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from llark.train.config import TrainConfig, TrainConfigError

log = logging.getLogger("llark")

REPO_ROOT = Path(__file__).resolve().parents[2]


def deepspeed_config(cfg: TrainConfig, grad_accum: int, world_size: int, path: str | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON with the fields the recipe owns filled in; an explicit value there that
    disagrees with the training config is refused (one source of truth for batch, precision, optimizer)."""
    path = path or cfg.deepspeed
    candidates = [Path(path), REPO_ROOT / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise TrainConfigError(f"deepspeed: {path} does not exist (try launch/zero2.json or launch/zero3.json)")
    ds = {k: v for k, v in json.loads(found.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    owned = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in owned.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise TrainConfigError(f"{found}: {key} is {ds[key]}, the training config gives {value}; set it to \"auto\"")
        ds[key] = value
    bf16 = cfg.model.dtype == "bfloat16"
    for key, enabled in (("bf16", bf16), ("fp16", False)):
        section = ds.setdefault(key, {"enabled": "auto"})
        if section.get("enabled", "auto") not in ("auto", enabled):
            raise TrainConfigError(f"{found}: {key}.enabled is {section['enabled']}, model.dtype is {cfg.model.dtype}")
        section["enabled"] = enabled
    if "optimizer" in ds or "scheduler" in ds:
        raise TrainConfigError(f"{found}: remove 'optimizer' and 'scheduler'; they come from the optim section")
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
        # torch's AdamW needs no compiled op; CPU offload needs DeepSpeed's CPU Adam. Fused, it updates
        # in place: the default (foreach) takes another fp32 copy of the optimizer's partition at each step.
        **({} if offload else {"torch_adam": True, "fused": True}),
    }}
    ds.setdefault("steps_per_print", 10**9)
    if world_size > 1 and zero.get("stage") == 2 and zero.get("overlap_comm"):
        log.warning("ZeRO-2 with overlap_comm: true has produced zero losses / NaN grad norms on some DeepSpeed "
                    "versions; launch/zero2.json keeps it off")
    return ds


def launcher_deepspeed_config() -> str | None:
    """The DeepSpeed JSON that ``accelerate launch`` names (its deepspeed_config_file), if it started this run."""
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's variables; one process when there are none."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "RANK" not in os.environ:
        # DeepSpeed looks for MPI unless these are set.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def check_shared_directory(directory: Path, patience_s: float = 10.0) -> None:
    """Every rank writes its part of a checkpoint into ``directory`` and every rank resumes from it, so on
    several nodes it must be one directory that all of them see. Rank 0 leaves a marker; a rank that
    cannot see it (within ``patience_s``, for network filesystems' caches) fails the run on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    token = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = directory / f".shared-check-{token[0]}"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        marker.touch()
    dist.barrier()
    deadline = time.monotonic() + patience_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (socket.gethostname(), marker.exists()))
    dist.barrier()
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, (host, ok) in enumerate(seen) if not ok]
    if blind:
        raise TrainConfigError(f"output_dir {directory} is not shared by all processes ({', '.join(blind)} cannot "
                               "see what rank 0 writes there): put it on a filesystem every node mounts at the "
                               "same path, or checkpoints cannot be resumed")
