"""The training config: pydantic sections with the paper's defaults, loaded from YAML plus ``--set``
overrides; an invalid field is refused with its dotted name."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llark.errors import LlarkConfigError


class TrainConfigError(LlarkConfigError):
    """A config that cannot train; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(_Section):
    r: int = Field(64, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="the LM's linear layers that get adapters (names as in its modeling code), or 'all-linear'")


class ConnectorSection(_Section):
    """``model.connector``: what turns encoder frames into audio tokens (llark.model.connectors)."""

    name: Literal["linear", "mlp", "qformer", "attention_fusion"] = Field(
        "linear", description="linear: the paper's projector; mlp: Linear-GELU-Linear; qformer: window-level Q-Former; "
        "attention_fusion: queries per time span attending to several encoders' frames")
    encoders: list[str] | None = Field(None, description="the shards' encoders it reads (names as in their "
                                       "encoder.json); attention_fusion: default all, the others: the one there is")
    span_s: float | None = Field(None, gt=0, description="attention_fusion: seconds per span (default 0.5)")
    hidden: int | None = Field(None, ge=1, description="mlp: hidden width (default: the LM's)")
    window: int | None = Field(None, ge=1, description="qformer: frames per window (default 3: 0.3 s at 10 Hz)")
    queries: int | None = Field(None, ge=1, description="qformer, attention_fusion: learned queries (audio tokens) per "
                                "window or span (default 1)")
    layers: int | None = Field(None, ge=1, description="qformer: blocks (default 2)")
    heads: int | None = Field(None, ge=1, description="qformer: attention heads (default 4)")
    width: int | None = Field(None, ge=1, description="qformer: width of its blocks (default: the LM's, at most 768)")

    def settings(self) -> dict:
        """The connector's settings as ``llark_config.json`` keeps them (defaults filled in)."""
        from llark.model.connectors import check_connector

        from llark.model.connectors import MULTI_ENCODER, ConnectorConfigError

        values = {k: v for k, v in self.model_dump().items() if v is not None}
        if self.name not in MULTI_ENCODER:
            # One encoder: which one is a matter of the data (llark/multi_encoder.py), not of the connector.
            if len(values.pop("encoders", None) or []) > 1:
                raise ConnectorConfigError(f"model.connector.encoders: the {self.name} connector reads one encoder, "
                                           f"got {self.encoders}; model.connector.name: attention_fusion reads several")
        return check_connector(values)


class ModelSection(_Section):
    lm_path: str = Field("smollm2", description="local HF directory of the chat LM, or 'smollm2' (embedded default)")
    encoder_dim: int | None = Field(None, ge=1, description="projector input; None: the shards' encoder.json dim")
    init_from: str | None = Field(None, description="an exported LLark model to continue from (LM + projector)")
    mode: Literal["full", "projector", "lora"] = "full"
    lora: LoraSection = LoraSection()
    quantization: Literal["4bit", "8bit"] | None = None
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = Field(
        "sdpa", description="the LM's attention kernel; flash_attention_2/3 need the flash-attn package and a GPU")
    gradient_checkpointing: bool = True
    connector: ConnectorSection = ConnectorSection()
    compile: bool = Field(False, description="torch.compile each of the LM's decoder layers on its own (as "
                          "torchtune does; the llark wrapper stays eager): faster steps once the first ones have "
                          "compiled; not with model.quantization")
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
    on_too_long: Literal["skip", "error"] = Field("skip", description="a sample whose one Q/A pair is longer than "
                                                  "max_seq_len: skipped and counted (too_long_samples), or an error")
    pad_to_multiple_of: int = Field(8, ge=1)
    questions: str | None = Field(None, description="a regular expression: train only on Q/A pairs whose "
                                  "question matches it (case-insensitive); None: all pairs")
    mixture: dict[Literal["understanding", "captioning", "reasoning"], float] | None = Field(
        None, description="sampling weight per task family, whatever its size (e.g. {understanding: 2, "
        "reasoning: 0.5}): each example is drawn from a family with probability weight / sum; None: the shards "
        "as they come")

    dataset_weights: dict[str, float] | None = Field(
        None, description="sampling weight per dataset, whatever its size (e.g. {musiccaps: 1, fma: 2}); datasets "
        "the shards hold but this leaves out are not trained on; with data.mixture too, a (dataset, family) "
        "weighs the product of the two")

    @field_validator("mixture", "dataset_weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one family's weight, or leave it unset")
            bad = {k: w for k, w in value.items() if not w > 0}
            if bad:
                raise ValueError(f"weights must be > 0, got {bad}")
        return value

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
    extend_schedule: bool = Field(False, description="on resume, allow another max_steps: the warmup and cosine "
                                  "schedule are recomputed for the new length from the step reached")


class ValidationSection(_Section):
    every: int = Field(0, ge=0, description="the loss on held-out shards every this many steps (and at the last); "
                       "0: never")
    split: str = Field("valid", description="the split of the shards to validate on")
    shards: list[str] | None = Field(None, description="shard directories; None: data.shards")
    max_examples: int = Field(256, ge=1, description="examples per validation (the same ones each time)")
    export_best: bool = Field(False, description="export the best model by validation.best to output_dir/best")
    tasks: list[str] = Field(default_factory=list, description="evaluation tasks whose questions are answered and "
                             "scored at each validation (e.g. [key, tempo]); needs validation.clips and .embeddings")
    clips: str | None = Field(None, description="clip records with labels (augmented.jsonl), for validation.tasks")
    embeddings: str | None = Field(None, description="their embeddings directory (llark embed's output)")
    max_clips: int = Field(64, ge=1, description="held-out clips asked about at each validation")
    best: str = Field("val_loss", description="what validation.export_best ranks by: val_loss (lower is better) or "
                      "a task metric such as tempo/demo/acc2 (higher is better)")

    @model_validator(mode="after")
    def _tasks_need_inputs(self) -> "ValidationSection":
        if self.tasks and not (self.clips and self.embeddings):
            raise ValueError("validation.tasks needs validation.clips and validation.embeddings")
        if self.best != "val_loss" and not self.tasks:
            raise ValueError(f"validation.best {self.best!r} is a task metric: set validation.tasks")
        return self


class TrainConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    validation: ValidationSection = ValidationSection()
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
    export_dir: str | None = Field(None, description="where the final model is written; None: output_dir/final")
    stages: list[dict[str, Any]] = Field(default_factory=list, description="training stages run in order, each "
                                         "a part of this config written over it (llark/train/stages.py)")
    stage: str | None = Field(None, description="the stage a config trains: set by the stages driver, kept in "
                              "its checkpoints")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.optim.warmup_steps > self.optim.max_steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) > optim.max_steps ({self.optim.max_steps})")
        if self.model.attn_implementation in ("flash_attention_2", "flash_attention_3"):
            import importlib.util

            package = "flash_attn" if self.model.attn_implementation == "flash_attention_2" else "flash_attn_interface"
            if importlib.util.find_spec(package) is None:
                raise ValueError(f"model.attn_implementation: {self.model.attn_implementation} needs the {package} "
                                 "package (pip install flash-attn --no-build-isolation, on a CUDA machine); "
                                 "sdpa needs nothing")
        if self.model.quantization and self.model.mode != "lora":
            raise ValueError("model.quantization needs model.mode: lora (QLoRA); a quantized LM cannot be trained in full")
        try:
            self.model.connector.settings()
        except ValueError as exc:  # ConnectorConfigError names model.connector.<field>
            raise ValueError(str(exc)) from None
        if self.model.compile and self.model.quantization:
            raise ValueError(f"model.compile: torch.compile cannot compile the bitsandbytes layers of a "
                             f"{self.model.quantization} LM (model.quantization); set model.compile: false")
        d = self.data
        if d.mixture and d.task_families and not set(d.mixture) <= set(d.task_families):
            raise ValueError(f"data.mixture weighs {sorted(set(d.mixture) - set(d.task_families))}, which "
                             f"data.task_families ({d.task_families}) leaves out")
        if self.stages:
            from llark.train.stages import stage_configs

            stage_configs(self)  # each stage's settings are checked now, before the first one starts
        return self

    @property
    def final_dir(self) -> Path:
        """Where the trained model is exported."""
        return Path(self.export_dir) if self.export_dir else Path(self.output_dir) / "final"

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


def check_run_settings(cfg: TrainConfig, world_size: int, zero_stage: int) -> None:
    """What the config alone cannot tell: combinations refused for this many processes and this ZeRO stage."""
    if zero_stage == 3 and cfg.model.mode == "lora":
        raise TrainConfigError("model.mode: lora with ZeRO-3 is not supported here; LoRA trains few parameters: "
                               "use launch/zero2.json")
    if cfg.model.compile and zero_stage == 3:
        raise TrainConfigError("model.compile with ZeRO-3 is not supported: ZeRO-3 gathers each module's parameters "
                               "in hooks that break every compiled decoder layer into dozens of small graphs and "
                               "recompiles; use launch/zero2.json, or set model.compile: false")
    if cfg.model.quantization and world_size > 1 and zero_stage == 3:
        raise TrainConfigError("model.quantization (QLoRA) with ZeRO-3 is not supported; use launch/zero2.json")
    if not cfg.data.shards:
        raise TrainConfigError("data.shards: give the shards directory (the output of `llark shards`)")
