"""What the optimizer is given: parameter groups (learning rate per part, weight decay only where it
belongs) and the learning-rate schedule (linear warmup, then cosine decay)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llark.model import LlarkModel
    from llark.train.config import OptimSection


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to the peak over ``warmup`` steps, then cosine decay to ``min_ratio`` x peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: "LlarkModel", o: "OptimSection") -> list[dict[str, Any]]:
    """The trainable parameters in groups: the projector at ``projector_lr`` (else ``lr``), the LM at ``lr``.
    With weight decay, biases, norm weights (every 1-D parameter) and the token embeddings get none, as
    in GPT-2's and LLaMA's recipes: decaying a norm's gain or an embedding row shrinks it towards zero
    rather than regularising a map."""
    embeddings = {id(model.lm.get_input_embeddings().weight)}
    groups = []
    for part, lr in ((model.projector, o.projector_lr or o.lr), (model.lm, o.lr)):
        params = [p for p in part.parameters() if p.requires_grad]
        if not o.weight_decay:
            groups.append({"params": params, "lr": lr})
            continue
        exempt = [p for p in params if p.ndim < 2 or id(p) in embeddings]
        decayed = [p for p in params if not (p.ndim < 2 or id(p) in embeddings)]
        groups += [{"params": decayed, "lr": lr, "weight_decay": o.weight_decay},
                   {"params": exempt, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
