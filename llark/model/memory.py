"""Per-GPU memory of a training run, estimated before renting the GPUs (``llark plan``).

Bytes per GPU for ``P`` parameters (``T`` of them trained) on ``N`` data-parallel GPUs, bf16 weights,
as DeepSpeed holds them (ZeRO-0 is DeepSpeed's bf16 optimizer, N = 1 in the sharded terms):

=============  =========================  ===================================================
part           ZeRO-0/1/2                  ZeRO-3
=============  =========================  ===================================================
weights        2P (4-bit: 0.5P)            2P / N        (0 on the GPU with offload_param)
gradients      2T (ZeRO-0/1), 2T / N (2)   2T / N
optimizer      12T / N (fp32 master, m, v; 0 on the GPU with offload_optimizer)
buffers        4T / N: the fp32 gradient partition the optimizer step reads (host memory
               with offload_optimizer); the gradient reduction bucket, 2 · reduce_bucket_size
               (twice with overlap_comm; none for ZeRO-0); ZeRO-3 also gathers one module's
               weights and prefetches the next: 2 · (largest module + stage3_prefetch_bucket_size)
activations    per layer 34·b·s·h (SDPA attention, no s² term; Korthikanti et al. 2022), all
               layers without checkpointing; with it, each layer's input (2·b·s·h) plus one layer;
               plus the connector's own (:func:`connector_activations`)
logits         b·a·V · 10: bf16 logits, their fp32 copy for the loss and its gradient, at the a
               positions per sequence that predict a supervised (answer) token only
overhead       1.5 GB (CUDA context, allocator) + 10 % of the rest
=============  =========================  ===================================================

The optimizer is torch's fused AdamW, as ``llark train`` configures it (the foreach one takes a
further 4T / N at each step). ``benchmarks/plan_memory.py`` sets these terms beside the memory two
DeepSpeed processes really take on CPU. Estimates, not measurements: allow a margin of 10-20 % and
check with a short run. Training runs the output layer only where a token is supervised: with 250
audio frames and a 20-token answer that is about 20 of 300 positions, so ``a`` (``supervised_tokens``,
128 by default: a long answer, or a few turns) rather than ``s`` sizes the term that, at Llama 3's and
Qwen's 128k-152k vocabularies, would otherwise be the largest.

The connector (``model.connector``, :mod:`llark.model.connectors`) is always trained: ``P`` and
``T`` include its exact parameter count, read from the connector itself built on the ``meta``
device (nothing allocated). ``s`` is the language model's sequence, audio tokens included: a
Q-Former's ``ceil(n / window) × queries`` tokens for ``n`` frames, not ``n``
(:func:`lm_sequence` turns a length laid out at one token per frame into it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1024**3
CLIP_FRAMES = 250  # a 25 s clip at 10 Hz, the paper's Jukebox frames
ACTIVATION_BYTES = 2  # bf16


@dataclass(frozen=True)
class ModelShape:
    params: float
    hidden: int
    layers: int
    vocab: int
    ffn: int

    @property
    def lora_params_per_rank(self) -> float:
        """LoRA parameters per unit of rank on q, k, v, o, gate, up and down projections."""
        return self.layers * (8 * self.hidden + 3 * (self.hidden + self.ffn))


# Shapes from each model's published config.json (parameters as shape_from_hf_config counts them).
MODELS = {
    "llama2-7b": ModelShape(6.74e9, 4096, 32, 32_000, 11_008),
    "llama2-13b": ModelShape(13.0e9, 5120, 40, 32_000, 13_824),
    "llama3-8b": ModelShape(8.03e9, 4096, 32, 128_256, 14_336),
    "qwen2.5-7b": ModelShape(7.62e9, 3584, 28, 152_064, 18_944),
    "qwen3-8b": ModelShape(8.19e9, 4096, 36, 151_936, 12_288),
    "gemma2-9b": ModelShape(9.24e9, 3584, 42, 256_000, 14_336),
    "mistral-7b": ModelShape(7.25e9, 4096, 32, 32_768, 14_336),
    "phi3-mini": ModelShape(3.82e9, 3072, 32, 32_064, 8_192),
    "smollm2-135m": ModelShape(1.35e8, 576, 30, 49_152, 1_536),
}


@dataclass(frozen=True)
class ConnectorShape:
    """A connector's settings (defaults filled in) and the sizes the plan reads from the module itself."""

    settings: dict[str, Any]
    params: int
    largest_module: int  # the most parameters one module holds itself (what ZeRO-3 gathers at once)
    width: int  # its input layer's output: the mlp's hidden layer, the qformer's width (linear: the LM's)

    @property
    def name(self) -> str:
        return self.settings["name"]

    def tokens(self, frames: int) -> int:
        from llark.model.connectors import audio_tokens

        return audio_tokens(self.settings, frames)

    def describe(self) -> str:
        # The settings left at None (mlp hidden, qformer width) default to the input layer's width.
        given = [f"{k} {self.width if v is None else v}" for k, v in self.settings.items() if k != "name"]
        return self.name + (f" ({', '.join(given)})" if given else "")


def connector_shape(settings: dict[str, Any] | None, encoder_dim: int, hidden: int) -> ConnectorShape:
    """The connector from ``encoder_dim`` to ``hidden`` built on the ``meta`` device: its exact
    parameter count with nothing allocated. Raises ValueError (ConnectorConfigError) naming
    ``model.connector.<field>`` for settings that cannot work."""
    import torch

    from llark.model.connectors import build_connector, check_connector

    checked = check_connector(settings)
    module = build_connector(checked, encoder_dim, hidden, dtype=torch.bfloat16, device="meta")
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()]
    return ConnectorShape(settings=checked, params=sum(p.numel() for p in module.parameters()),
                          largest_module=max(own), width=module.input_layer.out_features)


def connector_activations(connector: ConnectorShape, encoder_dim: int, micro_batch: int, frames: int) -> float:
    """Bytes (bf16) the connector's forward pass keeps for its backward, for ``b`` clips of ``n``
    frames of dimension ``d``: the tensors autograd saves inside the connector, its parameters
    excluded (no gradient checkpointing applies to it). Per clip, in values:

    - ``linear``: ``n·d``, the frames its weight gradient reads;
    - ``mlp`` (hidden ``m``): ``n·(d + 2m)``, the frames and the hidden layer before and after GELU;
    - ``qformer`` (window ``w``, ``q`` queries, ``L`` blocks, ``h`` heads, width ``W``), with
      ``t = ceil(n / w)·q`` audio tokens and ``n' = ceil(n / w)·w`` frames padded to whole windows:
      ``n'·d + L·(20·t·W + 3·n'·W + h·t·(w + 2) + 6·t) + t·(W + 2)``. Per block, 20 values per
      query token: its three norms' outputs and three residual sums, the self-attention's q, k, v
      and output, the cross-attention's q and output, and the 4W feed-forward's input and GELU
      output; 3 per padded frame: the frames as the cross-attention reads them and their keys and
      values; the cross-attention's mask over the window and both attentions' log-sum-exp; the
      norms' means and inverse deviations. Then the final norm's output and statistics.

    The audio tokens it returns are the LM's input embeddings, counted with the LM's activations.
    Checked against the saved tensors of the real connectors (tests/test_plan_connectors.py)."""
    n, d, b = frames, encoder_dim, micro_batch
    if connector.name == "linear":
        per_clip = n * d
    elif connector.name == "mlp":
        per_clip = n * (d + 2 * connector.width)
    elif connector.name == "qformer":
        s, width = connector.settings, connector.width
        windows = max(1, math.ceil(n / s["window"]))
        t, padded = windows * s["queries"], windows * s["window"]
        block = 20 * t * width + 3 * padded * width + s["heads"] * t * (s["window"] + 2) + 6 * t
        per_clip = padded * d + s["layers"] * block + t * (width + 2)
    else:
        raise ValueError(f"model.connector.name: no activation formula for {connector.name!r}")
    return float(ACTIVATION_BYTES * b * per_clip)


def lm_sequence(seq_len: int, connector: dict[str, Any] | None, audio_frames: int = CLIP_FRAMES) -> int:
    """The language model's sequence for ``seq_len`` tokens laid out at one audio token per frame
    (a 25 s clip: 250 of them): the connector's audio tokens for the ``audio_frames`` frames replace
    those 250. The same for ``linear`` and ``mlp``; shorter for a ``qformer``."""
    from llark.model.connectors import audio_tokens

    if not 0 < audio_frames <= seq_len:
        raise ValueError(f"--audio-frames must be in [1, --seq-len {seq_len}], got {audio_frames}")
    return seq_len - audio_frames + audio_tokens(connector, audio_frames)


@dataclass
class Plan:
    parts: dict[str, float]  # bytes per GPU
    cpu_bytes: float  # offloaded to host memory, per GPU
    trained_params: float
    connector: ConnectorShape | None = None
    connector_activations: float = 0.0  # bytes per micro-batch, included in parts["activations"]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def plan_memory(shape: ModelShape, zero_stage: int = 2, micro_batch: int = 4, seq_len: int = 2048, gpus: int = 8,
                mode: str = "full", lora_rank: int = 64, encoder_dim: int = 4800, quantization: str | None = None,
                gradient_checkpointing: bool = True, offload_optimizer: bool = False,
                offload_params: bool = False, reduce_bucket_size: float = 5e8, overlap_comm: bool = False,
                prefetch_bucket_size: float = 5e7, supervised_tokens: int = 128,
                connector: dict[str, Any] | None = None, audio_frames: int = CLIP_FRAMES) -> Plan:
    """``seq_len`` is the LM's sequence, audio tokens included (see :func:`lm_sequence`);
    ``connector`` the ``model.connector`` settings (None: linear) and ``audio_frames`` the frames
    each sequence gives it."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0-3, got {zero_stage}")
    if mode not in ("full", "projector", "lora"):
        raise ValueError(f"mode must be full, projector or lora, got {mode!r}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO-3")
    if audio_frames < 1:
        raise ValueError(f"audio frames per sequence must be positive, got {audio_frames}")
    conn = connector_shape(connector, encoder_dim, shape.hidden)
    projector = conn.params
    trained = projector + {"full": shape.params, "projector": 0.0, "lora": lora_rank * shape.lora_params_per_rank}[mode]
    bytes_per_weight = {None: 2.0, "8bit": 1.0, "4bit": 0.5}[quantization]
    weights = shape.params * bytes_per_weight + projector * 2
    if zero_stage == 3:
        weights /= gpus
    cpu = 0.0
    if offload_params:
        cpu += weights
        weights = 0.0
    grads = 2 * trained / (gpus if zero_stage >= 2 else 1)
    optimizer = 12 * trained / (gpus if zero_stage >= 1 else 1)
    fp32_gradients = 4 * trained / (gpus if zero_stage >= 1 else 1)
    if offload_optimizer:
        cpu += optimizer + fp32_gradients
        optimizer = fp32_gradients = 0.0
    buffers = fp32_gradients
    if zero_stage >= 1:
        buffers += 2 * reduce_bucket_size * (2 if overlap_comm else 1)
    if zero_stage == 3:
        largest_module = max(shape.vocab * shape.hidden, shape.hidden * shape.ffn, conn.largest_module)
        buffers += 2 * (largest_module + prefetch_bucket_size)
    b, s, h = micro_batch, seq_len, shape.hidden
    layer = 34 * b * s * h
    connector_bytes = connector_activations(conn, encoder_dim, b, audio_frames)
    activations = (shape.layers * 2 * b * s * h + layer) if gradient_checkpointing else shape.layers * layer
    activations += connector_bytes
    logits = 10 * b * min(s, supervised_tokens) * shape.vocab
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "buffers": buffers,
             "activations": activations, "logits": logits}
    parts["overhead"] = 1.5 * GB + 0.1 * sum(parts.values())
    return Plan(parts=parts, cpu_bytes=cpu, trained_params=trained, connector=conn,
                connector_activations=connector_bytes)


def shape_from_hf_config(config: dict) -> ModelShape:
    """The shape of a Llama-architecture language model from its Hugging Face ``config.json``."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    layer = attention + 3 * hidden * config["intermediate_size"] + 2 * hidden
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return ModelShape(params=float(embeddings + config["num_hidden_layers"] * layer + hidden), hidden=hidden,
                      layers=config["num_hidden_layers"], vocab=config["vocab_size"], ffn=config["intermediate_size"])


def deepspeed_settings(path: str | Path) -> dict:
    """``plan_memory``'s ZeRO arguments from a DeepSpeed JSON (DeepSpeed's defaults where it is silent)."""
    return zero_settings(json.loads(Path(path).read_text(encoding="utf-8")))


def zero_settings(config: dict) -> dict:
    """``plan_memory``'s ZeRO arguments from a DeepSpeed config (DeepSpeed's defaults where it is silent)."""
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)

    return {"zero_stage": stage, "offload_optimizer": offloaded("offload_optimizer"),
            "offload_params": offloaded("offload_param"),
            "reduce_bucket_size": float(zero.get("reduce_bucket_size", 5e8)),
            "overlap_comm": bool(zero.get("overlap_comm", stage == 3)),
            "prefetch_bucket_size": float(zero.get("stage3_prefetch_bucket_size", 5e7))}


def format_plan(plan: Plan, gpu_memory_gb: float | None = None) -> str:
    lines = [f"{name:<12} {value / GB:8.2f} GB" for name, value in plan.parts.items()]
    lines.append(f"{'total':<12} {plan.total / GB:8.2f} GB per GPU")
    if plan.cpu_bytes:
        lines.append(f"{'offloaded':<12} {plan.cpu_bytes / GB:8.2f} GB of host memory per GPU")
    lines.append(f"trained parameters: {plan.trained_params:,.0f}")
    if plan.connector is not None:
        c = plan.connector
        lines.append(f"connector {c.describe()}: {c.params:,} parameters (trained), {c.tokens(CLIP_FRAMES)} audio "
                     f"tokens per 25 s clip at 10 Hz, {plan.connector_activations / GB:.3f} GB of its activations")
    if gpu_memory_gb is not None:
        verdict = "fits" if plan.total / GB <= 0.9 * gpu_memory_gb else "does NOT fit"
        lines.append(f"{verdict} in {gpu_memory_gb:g} GB (with a 10 % margin)")
    return "\n".join(lines)
