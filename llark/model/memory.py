"""Per-GPU memory of a training run, estimated before renting the GPUs (``llark plan``).

Bytes per GPU for ``P`` parameters (``T`` of them trained) on ``N`` data-parallel GPUs, bf16 weights:

=============  =========================  ===================================================
part           no ZeRO / ZeRO-2            ZeRO-3
=============  =========================  ===================================================
weights        2P (4-bit: 0.5P)            2P / N        (0 on the GPU with offload_param)
gradients      2T / N (ZeRO-2)             2T / N
optimizer      12T / N (fp32 master, m, v; 0 on the GPU with offload_optimizer)
activations    per layer 34·b·s·h (SDPA attention, no s² term; Korthikanti et al. 2022), all
               layers without checkpointing; with it, each layer's input (2·b·s·h) plus one layer
logits         b·s·V · 10 (bf16 logits, their fp32 copy for the loss and its gradient)
overhead       1.5 GB (CUDA context, allocator) + 10 % of the rest
=============  =========================  ===================================================

Estimates, not measurements: allow a margin of 10-20 % and check with a short run.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3


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


MODELS = {
    "llama2-7b": ModelShape(6.74e9, 4096, 32, 32_000, 11_008),
    "llama2-13b": ModelShape(13.0e9, 5120, 40, 32_000, 13_824),
    "smollm2-135m": ModelShape(1.35e8, 576, 30, 49_152, 1_536),
}


@dataclass
class Plan:
    parts: dict[str, float]  # bytes per GPU
    cpu_bytes: float  # offloaded to host memory, per GPU
    trained_params: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def plan_memory(shape: ModelShape, zero_stage: int = 2, micro_batch: int = 4, seq_len: int = 2048, gpus: int = 8,
                mode: str = "full", lora_rank: int = 64, encoder_dim: int = 4800, quantization: str | None = None,
                gradient_checkpointing: bool = True, offload_optimizer: bool = False,
                offload_params: bool = False) -> Plan:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0-3, got {zero_stage}")
    if mode not in ("full", "projector", "lora"):
        raise ValueError(f"mode must be full, projector or lora, got {mode!r}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO-3")
    projector = encoder_dim * shape.hidden + shape.hidden
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
    if offload_optimizer:
        cpu += optimizer
        optimizer = 0.0
    b, s, h = micro_batch, seq_len, shape.hidden
    layer = 34 * b * s * h
    activations = (shape.layers * 2 * b * s * h + layer) if gradient_checkpointing else shape.layers * layer
    logits = 10 * b * s * shape.vocab
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
             "logits": logits}
    parts["overhead"] = 1.5 * GB + 0.1 * sum(parts.values())
    return Plan(parts=parts, cpu_bytes=cpu, trained_params=trained)


def format_plan(plan: Plan, gpu_memory_gb: float | None = None) -> str:
    lines = [f"{name:<12} {value / GB:8.2f} GB" for name, value in plan.parts.items()]
    lines.append(f"{'total':<12} {plan.total / GB:8.2f} GB per GPU")
    if plan.cpu_bytes:
        lines.append(f"{'offloaded':<12} {plan.cpu_bytes / GB:8.2f} GB of host memory per GPU")
    lines.append(f"trained parameters: {plan.trained_params:,.0f}")
    if gpu_memory_gb is not None:
        verdict = "fits" if plan.total / GB <= 0.9 * gpu_memory_gb else "does NOT fit"
        lines.append(f"{verdict} in {gpu_memory_gb:g} GB (with a 10 % margin)")
    return "\n".join(lines)
