"""Train LLark: a chat LM and a linear audio projector on webdataset shards, with DeepSpeed.

One process (CPU, DeepSpeed on gloo; the demo)::

    llark train --config launch/demo.yaml --set data.shards='["runs/demo/shards"]'

One node with 4 GPUs, or several nodes (see launch/README.md for the hostfile, SLURM and NCCL)::

    deepspeed --num_gpus 4 --module llark.train --config launch/llama2_7b_chat.yaml
    deepspeed --hostfile launch/hostfile --num_nodes 2 --num_gpus 4 --module llark.train --config launch/llama2_7b_chat.yaml

The defaults are the paper's (section 5 and appendix J): AdamW (0.9, 0.999), eps 1e-6, no weight
decay, cosine schedule with 3,000 warmup steps to 5e-5, 100k steps, global batch 32
(= micro_batch x grad_accum x world size), bf16 + TF32, loss on the answers only; the projector
and the whole LM are trained (``model.mode``: ``projector`` freezes the LM, ``lora`` trains PEFT
adapters, with ``model.quantization: 4bit`` for QLoRA on one GPU).

The recipe: ``__init__`` validates the config, ``setup`` builds the parts in dependency order,
``train`` runs the loop, ``save_checkpoint`` writes an exactly resumable checkpoint (weights,
optimizer, schedule, data position and RNG of every rank), ``export`` writes the final model as a
Hugging Face directory that ``llark ask`` loads, ``cleanup`` closes what was opened.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llark.host_memory import RetainedHeap
from pipeline.files import check_same_settings, write_json

log = logging.getLogger("llark")

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint without it is incomplete
METRICS = "metrics.jsonl"
# Settings that may change when resuming (the rest must match the checkpoint's).
RESUMABLE_CHANGES = {"optim.max_steps", "save_every", "keep_checkpoints", "log_every", "tensorboard",
                     "wandb_project", "export", "resume", "output_dir", "deepspeed", "data.num_workers",
                     "model.projector_init", "model.projector_init_samples"}  # the last two: a new run only


class TrainConfigError(ValueError):
    """A config that cannot train; the message names the field."""


# ---------------------------------------------------------------------------------------------
# Config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(_Section):
    r: int = Field(64, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelSection(_Section):
    lm_path: str = Field("smollm2", description="local HF directory of the chat LM, or 'smollm2' (embedded default)")
    encoder_dim: int | None = Field(None, ge=1, description="projector input; None: the shards' encoder.json dim")
    init_from: str | None = Field(None, description="an exported LLark model to continue from (LM + projector)")
    mode: Literal["full", "projector", "lora"] = "full"
    lora: LoraSection = LoraSection()
    quantization: Literal["4bit", "8bit"] | None = None
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    attn_implementation: str | None = "sdpa"
    gradient_checkpointing: bool = True
    system_prompt: str | None = None
    end_of_turn: str | None = None
    frame_pool: int | None = Field(None, ge=1, description="encoder frames averaged into one audio token; "
                                   "None: 1 for a new model, model.init_from's otherwise")
    projector_init: Literal["standardise", "default"] = Field(
        "standardise", description="a new projector: 'standardise' centres and scales the training frames to the "
        "spread of the LM's token embeddings (statistics from the first projector_init_samples samples); "
        "'default': PyTorch's nn.Linear init")
    projector_init_samples: int = Field(512, ge=1)


class DataSection(_Section):
    shards: list[str] = Field(default_factory=list, description="shard directories (each with index.json, encoder.json)")
    split: str = "train"
    task_families: list[Literal["understanding", "captioning", "reasoning"]] | None = None
    conversation: Literal["pair", "multi_turn"] = "pair"
    max_seq_len: int = Field(2048, ge=16)
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(256, ge=1)
    group_shards: int = Field(4, ge=1)
    on_bad_sample: Literal["error", "skip"] = "error"
    pad_to_multiple_of: int = Field(8, ge=1)
    questions: str | None = Field(None, description="a regular expression: train only on Q/A pairs whose "
                                  "question matches it (case-insensitive); None: all pairs")

    @field_validator("questions")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return value


class OptimSection(_Section):
    lr: float = Field(5e-5, gt=0)
    projector_lr: float | None = Field(None, gt=0, description="the projector's peak LR (a new projector "
                                       "starts from random weights); None: optim.lr")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(3000, ge=0)
    max_steps: int = Field(100_000, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0: no clipping")


class TrainConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    global_batch: int = Field(32, ge=1)
    micro_batch: int = Field(4, ge=1)
    grad_accum: int | None = Field(None, ge=1, description="None: global_batch / (micro_batch x world size)")
    deepspeed: str = Field("launch/zero2.json", description="DeepSpeed JSON (ZeRO stage, offload, precision)")
    output_dir: str = "runs/train"
    save_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    tf32: bool = True
    retain_freed_cpu_memory: bool = Field(True, description="on CPU: keep freed buffers in the process's heap "
                                          "(glibc) so that DeepSpeed's per-step gradient buffers are not "
                                          "page-faulted back in every step; faster steps, higher resident peak")
    tensorboard: bool = True
    wandb_project: str | None = None
    resume: str = Field("auto", description="auto: latest complete checkpoint in output_dir; never; or a checkpoint dir")
    export: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.optim.warmup_steps > self.optim.max_steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) > optim.max_steps ({self.optim.max_steps})")
        if self.model.quantization and self.model.mode != "lora":
            raise ValueError("model.quantization needs model.mode: lora (QLoRA); a quantized LM cannot be trained in full")
        return self

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step such that micro_batch x grad_accum x world_size == global_batch."""
        per_step = self.micro_batch * world_size
        accum = self.grad_accum if self.grad_accum is not None else self.global_batch // per_step
        if accum < 1 or self.micro_batch * accum * world_size != self.global_batch:
            raise TrainConfigError(
                f"global_batch ({self.global_batch}) != micro_batch ({self.micro_batch}) x grad_accum "
                f"({self.grad_accum if self.grad_accum is not None else 'derived'}) x world size ({world_size}); "
                "choose micro_batch and grad_accum so that the product is global_batch"
            )
        return accum


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file (optional) plus ``dotted.key: value`` overrides, validated; a bad field is named."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: expected a mapping of settings")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise TrainConfigError(f"invalid training config ({path or 'defaults'}): {problems}") from None


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to the peak over ``warmup`` steps, then cosine decay to ``min_ratio`` x peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


# ---------------------------------------------------------------------------------------------
# Distributed environment


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


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


# ---------------------------------------------------------------------------------------------
# The recipe


class TrainRecipe:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = distributed_env()
        self.is_main = self.rank == 0  # logs, metrics, shared files
        self.retained_heap: RetainedHeap | None = None
        self.grad_accum = cfg.grad_accum_for(self.world_size)
        self.ds_config = deepspeed_config(cfg, self.grad_accum, self.world_size,
                                          os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        if self.zero_stage == 3 and cfg.model.mode == "lora":
            raise TrainConfigError("model.mode: lora with ZeRO-3 is not supported here; LoRA trains few parameters: "
                                   "use launch/zero2.json")
        if cfg.model.quantization and self.world_size > 1 and self.zero_stage == 3:
            raise TrainConfigError("model.quantization (QLoRA) with ZeRO-3 is not supported; use launch/zero2.json")
        if not cfg.data.shards:
            raise TrainConfigError("data.shards: give the shards directory (the output of `llark shards`)")
        if cfg.model.dtype == "bfloat16" and not torch.cuda.is_available():
            log.warning("bf16 on CPU is slow; the CPU demo config uses model.dtype: float32")
        self._check_data()
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.writer = None
        self.wandb = None

    def gpu_memory_warning(self, encoder_dim: int, gpu_bytes: float) -> str | None:
        """Before any weight loads: what ``llark plan`` says of this run when it will not fit a GPU of
        ``gpu_bytes`` (an estimate, so a warning, not a refusal)."""
        from llark.model.llark import resolve_lm_path
        from llark.model.memory import GB, plan_memory, shape_from_hf_config, zero_settings

        cfg = self.cfg
        lm_dir = Path(cfg.model.init_from) if cfg.model.init_from else resolve_lm_path(cfg.model.lm_path)
        try:
            shape = shape_from_hf_config(json.loads((lm_dir / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError):
            return None  # not a Llama-like config.json: loading it says what is wrong
        plan = plan_memory(shape, micro_batch=cfg.micro_batch, seq_len=cfg.data.max_seq_len, gpus=self.world_size,
                           mode=cfg.model.mode, lora_rank=cfg.model.lora.r, encoder_dim=encoder_dim,
                           quantization=cfg.model.quantization,
                           gradient_checkpointing=cfg.model.gradient_checkpointing, **zero_settings(self.ds_config))
        if plan.total <= 0.95 * gpu_bytes:
            return None
        parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in plan.parts.items())
        return (f"estimated {plan.total / GB:.1f} GB per GPU ({parts}), and this GPU has {gpu_bytes / GB:.1f} GB: "
                f"expect out-of-memory. `llark plan` compares settings: ZeRO-3 or offload (deepspeed=launch/"
                f"zero3.json, *_offload.json), more GPUs, a smaller micro_batch or data.max_seq_len, model.mode: lora")

    def _check_data(self) -> None:
        """The shards exist and their encoder fits the projector: refused here, before any weight loads."""
        from llark.data import check_encoder, open_shards
        from llark.model import LlarkConfig

        cfg = self.cfg
        self.shards = open_shards(cfg.data.shards, cfg.data.split, cfg.data.task_families)
        if cfg.model.init_from:
            trained = LlarkConfig.from_file(Path(cfg.model.init_from) / "llark_config.json")
            if cfg.model.frame_pool and cfg.model.frame_pool != trained.frame_pool:
                raise TrainConfigError(f"model.frame_pool ({cfg.model.frame_pool}) differs from model.init_from's "
                                       f"({trained.frame_pool}); leave it unset to continue with the trained one")
            if cfg.model.encoder_dim and cfg.model.encoder_dim != trained.encoder_dim:
                raise TrainConfigError(f"model.encoder_dim ({cfg.model.encoder_dim}) differs from the projector of "
                                       f"model.init_from ({trained.encoder_dim})")
            check_encoder(self.shards.manifest, trained.encoder_dim, trained.encoder)
        elif cfg.model.encoder_dim:
            check_encoder(self.shards.manifest, cfg.model.encoder_dim)

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed

        from llark.data import ExampleEncoder, LoaderState, ShardStream, StreamSettings, check_encoder, make_loader
        from llark.model import ChatFormatter, LlarkConfig, build_llark, configure_training, load_pretrained
        from llark.model.llark import LoraSettings

        cfg = self.cfg
        # 1. Processes: everything after this may use collectives.
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            if cfg.tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        elif cfg.retain_freed_cpu_memory:
            self.retained_heap = RetainedHeap.enable()
            self._print("train: on CPU, freed buffers stay in this process's heap (retain_freed_cpu_memory), so "
                        "DeepSpeed's per-step gradient buffers are not page-faulted back in at every step"
                        if self.retained_heap else
                        "train: on CPU, this C library returns freed buffers to the OS whatever it is told "
                        "(retain_freed_cpu_memory had no effect), so DeepSpeed's per-step gradient buffers are "
                        "page-faulted back in at every step")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        check_shared_directory(self.output_dir)
        self._seed(cfg.seed)  # the same on every rank while the model is built

        # 2. The shards (opened and checked in __init__) before the model: the projector's input
        # dimension comes from encoder.json.
        manifest = self.shards.manifest
        encoder_dim = cfg.model.encoder_dim or manifest["dim"]
        if torch.cuda.is_available() and self.is_main:
            warning = self.gpu_memory_warning(encoder_dim, torch.cuda.get_device_properties(self.local_rank).total_memory)
            if warning:
                log.warning(warning)

        # 3. Model and tokenizer; the encoder check runs before any weight is trained. A run that
        # resumes loads its projector from the checkpoint, so only a new one is initialised here.
        checkpoint = self._checkpoint_to_resume()
        model_kwargs = dict(dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
        if cfg.model.init_from:
            model, tokenizer, _ = load_pretrained(cfg.model.init_from, **model_kwargs)
            check_encoder(manifest, model.projector.in_features, model.config.encoder)
        else:
            check_encoder(manifest, encoder_dim)
            llark_cfg = LlarkConfig(lm_path=cfg.model.lm_path, encoder_dim=encoder_dim,
                                    system_prompt=cfg.model.system_prompt, end_of_turn=cfg.model.end_of_turn,
                                    frame_pool=cfg.model.frame_pool or 1)
            model, tokenizer = build_llark(llark_cfg, quantization=cfg.model.quantization, **model_kwargs)
            if cfg.model.projector_init == "standardise" and checkpoint is None:
                self._standardise_projector(model)
        model.config.encoder = {k: manifest[k] for k in ("name", "layer", "frame_rate_hz", "dim", "dtype", "config")}
        configure_training(model, cfg.model.mode, LoraSettings(**cfg.model.lora.model_dump()),
                           cfg.model.gradient_checkpointing)
        self.model, self.tokenizer = model, tokenizer
        self.formatter = ChatFormatter(tokenizer, model.config.end_of_turn, model.config.audio_token)

        self._seed(cfg.seed + self.rank)  # dropout differs across ranks

        # 4. Engine: optimizer over the trainable parameters only, our warmup + cosine schedule.
        o = cfg.optim
        projector = [p for p in model.projector.parameters() if p.requires_grad]
        lm = [p for p in model.lm.parameters() if p.requires_grad]
        trainable = [{"params": projector, "lr": o.projector_lr or o.lr}] + ([{"params": lm, "lr": o.lr}] if lm else [])
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_multiplier(s, o.warmup_steps, o.max_steps, o.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config, lr_scheduler=schedule)

        # 5. Resume (weights, optimizer, schedule, data position, RNG) before the loader starts reading.
        positions = None
        if checkpoint is not None:
            positions = self._load_checkpoint(checkpoint)

        # 6. Data: this rank's share of the shards, from the resumed position.
        d = cfg.data
        stream = ShardStream(self.shards.urls, ExampleEncoder(self.formatter, model.projector.in_features,
                                                              d.max_seq_len, model.config.system_prompt,
                                                              model.config.frame_pool),
                             StreamSettings(
                                 micro_batch=cfg.micro_batch, pad_id=tokenizer.pad_token_id, seed=cfg.seed,
                                 rank=self.rank, world_size=self.world_size, num_workers=d.num_workers,
                                 group_shards=d.group_shards, buffer_size=d.shuffle_buffer,
                                 conversation=d.conversation, on_bad_sample=d.on_bad_sample,
                                 pad_to_multiple_of=d.pad_to_multiple_of, questions=d.questions,
                                 start=positions.positions if positions else {},
                                 rotation=positions.rotation if positions else 0))
        self.loader_state = positions or LoaderState(d.num_workers)
        self.loader = make_loader(stream)

        # 7. Logging, on rank 0.
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "config.json", cfg.model_dump(mode="json"))
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            if cfg.wandb_project:
                try:
                    import wandb
                except ImportError:
                    raise TrainConfigError("wandb_project is set but wandb is not installed: pip install wandb") from None
                self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.model_dump(mode="json"),
                                        dir=str(self.output_dir), resume="allow")
            counts = model.trainable_counts()
            mode = cfg.model.mode + (f" (LM in {cfg.model.quantization})" if cfg.model.quantization else "")
            self._print(
                f"train: {self.world_size} processes, global batch {cfg.global_batch} = micro-batch "
                f"{cfg.micro_batch} x grad-accum {self.grad_accum} x world size {self.world_size}; "
                f"ZeRO-{self.zero_stage}, {cfg.model.dtype}, mode {mode}; peak LR {cfg.optim.lr:g}"
                f" (projector {cfg.optim.projector_lr or cfg.optim.lr:g}); {model.config.frame_pool} encoder "
                f"frame(s) per audio token\n"
                f"train: trainable parameters: projector {counts['projector']:,}, LM {counts['lm']:,}; "
                f"data: {self.shards.samples:,} samples in {len(self.shards.urls)} shards "
                f"({manifest['name']}, dim {manifest['dim']}, {manifest['frame_rate_hz']} Hz); "
                f"{cfg.optim.max_steps * cfg.global_batch / max(1, self.shards.samples):.2f} passes over the samples "
                f"in {cfg.optim.max_steps:,} steps" + (f"; resuming at step {self.step}" if checkpoint else ""))

    def _standardise_projector(self, model) -> None:
        """Every rank reads the same first samples and seeds the same generator: identical weights."""
        from llark.data import frame_statistics
        from llark.model.llark import standardise_projector, token_embedding_std

        m = self.cfg.model
        mean, std, samples = frame_statistics(self.shards.urls, model.projector.in_features, model.config.frame_pool,
                                              m.projector_init_samples)
        token_std = token_embedding_std(model.lm)
        standardise_projector(model.projector, mean, std, token_std, seed=self.cfg.seed)
        self._print(f"train: projector initialised from the frame statistics of {samples} samples (frames: mean "
                    f"|mean| {np.abs(mean).mean():.3g}, mean std {std.mean():.3g}; audio tokens scaled to the token "
                    f"embeddings' std {token_std:.3g})")

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # -- training -------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, engine = self.cfg, self.engine
        batches = iter(self.loader)
        window = _new_window()
        t_last = time.perf_counter()
        engine.train()
        while self.step < cfg.optim.max_steps:
            micro_batches = [next(batches) for _ in range(self.grad_accum)]
            # The loss of a step is the mean over every supervised token of the global batch (all
            # micro-batches on all ranks): each token weighs the same, whichever micro-batch holds it.
            n_tokens = self._all_ranks_sum(sum(b["supervised"] for b in micro_batches))
            step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
            for batch in micro_batches:
                self.loader_state.update(batch)
                inputs = {k: batch[k].to(engine.device, non_blocking=True)
                          for k in ("input_ids", "attention_mask", "audio", "audio_frames", "labels")}
                _, loss = engine(**inputs, loss_denominator=n_tokens)
                # The data-parallel reduction averages gradients over ranks; scaling by the world size
                # (and not letting DeepSpeed divide by the accumulation steps) makes the step's gradient
                # that of the summed token losses over n_tokens.
                engine.backward(loss * self.world_size, scale_wrt_gas=False)
                engine.step()
                step_loss += loss.detach()
                window["tokens"] += batch["tokens"]
                window["samples"] += len(batch["keys"])
                window["skipped"] += batch["skipped"]
            self.step += 1
            if self.retained_heap and self.retained_heap.after_step():
                print(f"train: rank {self.rank}: the heap grew at each of the last {self.retained_heap.patience} "
                      "steps, so freed buffers were not being reused; returned them to the OS and went back to "
                      "the C library's defaults (retain_freed_cpu_memory)", flush=True)
                self.retained_heap = None
            window["loss"] += step_loss  # this rank's share of the step's mean; _log sums over ranks
            window["steps"] += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.optim.max_steps:
                self._log(window, time.perf_counter() - t_last)
                window = _new_window()
                t_last = time.perf_counter()
            if self.step % cfg.save_every == 0 or self.step == cfg.optim.max_steps:
                self.save_checkpoint()
                t_last = time.perf_counter()

    def _all_ranks_sum(self, count: int) -> int:
        import torch.distributed as dist

        total = torch.tensor([count], dtype=torch.int64, device=self.engine.device)
        dist.all_reduce(total)
        return max(1, int(total.item()))

    def _log(self, window: dict[str, Any], seconds: float) -> None:
        import torch.distributed as dist

        # One all-reduce: the per-token mean loss (each rank holds its share of it) and summed
        # tokens/samples over ranks.
        totals = torch.tensor([float(window["loss"]) / window["steps"], window["tokens"], window["samples"],
                               window["skipped"]], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(totals)
        loss = totals[0].item()
        o = self.cfg.optim
        multiplier = lr_multiplier(self.step - 1, o.warmup_steps, o.max_steps, o.min_lr_ratio)
        metrics = {
            "step": self.step, "loss": loss, "lr": o.lr * multiplier, "projector_lr": (o.projector_lr or o.lr) * multiplier,
            "grad_norm": _float(self.engine.get_global_grad_norm()),
            "tokens_per_s": totals[1].item() / seconds, "samples_per_s": totals[2].item() / seconds,
            "skipped_samples": int(totals[3].item()),
        }
        if not self.is_main:
            return
        with open(self.output_dir / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "projector_lr", "grad_norm", "tokens_per_s", "samples_per_s"):
                if metrics[key] is not None:
                    self.writer.add_scalar(f"train/{key}", metrics[key], self.step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=self.step)
        gn = metrics["grad_norm"]
        lr = (f"lr {metrics['lr']:.3e}" if self.cfg.model.mode != "projector" else "")
        if self.cfg.model.mode == "projector" or o.projector_lr:
            lr = f"{lr} projector lr {metrics['projector_lr']:.3e}".strip()
        self._print(f"step {self.step}/{o.max_steps} loss {loss:.4f} {lr} "
                    f"grad-norm {gn if gn is None else f'{gn:.3f}'} {metrics['tokens_per_s']:.0f} tokens/s "
                    f"{metrics['samples_per_s']:.2f} samples/s")

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Every rank writes its part; rank 0 writes trainer_state.json last, after a barrier."""
        import torch.distributed as dist

        from llark.model.llark import LLARK_CONFIG, PROJECTOR_FILE, save_projector

        tag = f"step_{self.step:08d}"
        root = self.output_dir / CHECKPOINTS
        path = root / tag
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=self._saves_trained_weights_only)
        write_json(path / f"rank_{self.rank:05d}.json",
                   {"loader": self.loader_state.to_dict(), "rng": rng_state()})
        projector = self._gathered_projector()
        if self.is_main:
            save_projector(projector, path / PROJECTOR_FILE)
            (path / LLARK_CONFIG).write_text(self.model.config.to_json(), encoding="utf-8")
        dist.barrier()
        if self.is_main:
            write_json(path / TRAINER_STATE, {
                "step": self.step, "world_size": self.world_size, "config": self.cfg.model_dump(mode="json"),
            })
            for old in complete_checkpoints(self.output_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self._print(f"checkpoint: {path}")
        dist.barrier()
        return path

    @property
    def _saves_trained_weights_only(self) -> bool:
        """With the LM frozen (projector or LoRA mode) its weights are read from model.lm_path again on resume,
        so checkpoints hold only what is trained: for a 7B LM, megabytes instead of 13 GB each. A 4-bit or
        8-bit LM could not be loaded back from its own state dict anyway. ZeRO-3 keeps DeepSpeed's own format."""
        return self.cfg.model.mode != "full" and self.zero_stage < 3

    def _gathered_projector(self) -> dict[str, torch.Tensor]:
        from llark.model.llark import projector_state

        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.projector.parameters()), modifier_rank=None):
                return projector_state(self.model)
        return projector_state(self.model)

    def _checkpoint_to_resume(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.output_dir)
            return found[-1] if found else None
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file():
            raise TrainConfigError(f"resume: {path} is not a complete checkpoint (no {TRAINER_STATE})")
        return path

    def _load_checkpoint(self, path: Path):
        from llark.data import LoaderState

        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        if state["world_size"] != self.world_size:
            raise TrainConfigError(f"resume: {path} was written by {state['world_size']} processes, this run has "
                                   f"{self.world_size}; resume with the same number of processes")
        check_same_settings(f"resume: {path}", state["config"], self.cfg.model_dump(mode="json"),
                            "use resume: never (or another output_dir) to start over", TrainConfigError,
                            may_change=RESUMABLE_CHANGES, keep_whole=("lora",))
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True,
            custom_load_fn=load_trained_weights if self._saves_trained_weights_only else None)
        if load_path is None:
            raise TrainConfigError(f"resume: DeepSpeed could not load {path}")
        mine = json.loads((path / f"rank_{self.rank:05d}.json").read_text(encoding="utf-8"))
        set_rng_state(mine["rng"])
        self.step = state["step"]
        return LoaderState.from_dict(mine["loader"], self.cfg.data.num_workers)

    # -- export ---------------------------------------------------------------------------------

    def export(self) -> Path | None:
        """The final model as a Hugging Face directory (safetensors) with the projector and llark_config.json."""
        from llark.model import export_pretrained

        out = self.output_dir / "final"
        lm_state = None
        if self.zero_stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()  # on rank 0; needs the gather flag
            if self.is_main:
                lm_state = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
        projector = self._gathered_projector()
        if self.is_main:
            lm = self.model.lm
            if self.cfg.model.quantization:
                from llark.model.llark import merge_adapters_into_full_precision, resolve_lm_path

                self._print(f"export: merging the LoRA adapters into {self.cfg.model.lm_path} read again "
                            f"in {self.cfg.model.dtype} (not into its {self.cfg.model.quantization} copy)")
                lm = merge_adapters_into_full_precision(lm, resolve_lm_path(self.cfg.model.lm_path),
                                                        self.cfg.model.dtype)
            elif self.cfg.model.mode == "lora":
                lm = lm.merge_and_unload()
            export_pretrained(out, lm, self.tokenizer, self.model.config, projector, lm_state=lm_state)
            self._print(f"export: {out} (load it with llark.model.load_pretrained, or `llark ask`)")
        import torch.distributed as dist

        dist.barrier()
        return out if self.is_main else None

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def load_trained_weights(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module loader for checkpoints that hold the trained parameters only: every one of them
    must be there; the frozen ones stay as built from model.lm_path."""
    trained = [name for name, p in dst.named_parameters() if p.requires_grad]
    missing = [name for name in trained if name not in src]
    if missing:
        raise TrainConfigError(f"resume: the checkpoint lacks {len(missing)} trained weights, e.g. {missing[:3]}; "
                               "was it written with another model.mode or LoRA setting?")
    dst.load_state_dict({name: src[name] for name in trained}, strict=False)


def _new_window() -> dict[str, Any]:
    return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "skipped": 0}


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def main(cfg: TrainConfig) -> None:
    recipe = TrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    if cfg.export:
        recipe.export()
    recipe.cleanup()


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    from llark.commands.common import parse_key_values

    p = argparse.ArgumentParser(prog="python -m llark.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML training config (launch/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.lr=1e-4 (values are JSON when they parse as JSON)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    return load_config(args.config, parse_key_values(args.set)), args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        config, _ = parse_args()
    except TrainConfigError as exc:
        print(f"llark train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    main(config)
