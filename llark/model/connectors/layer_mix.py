"""A learned softmax-weighted sum over an encoder's stored hidden states, in front of any connector.

Embeddings written with ``llark embed --layers all`` keep every hidden state of the encoder; the
model sees them as ``[batch, frames, states, dim]`` and mixes them with one weight per state
(``softmax(logits)``, the mix MusiLingo fixes as a mean and MU-LLaMA learns), starting from the
mean of all states. The mix is a submodule of the connector (``layer_mix.logits`` in
``projector.safetensors``), so it is trained, checkpointed and exported with it.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerMix(nn.Module):
    def __init__(self, states: int, dtype=None, device=None):
        super().__init__()
        if states < 2:
            raise ValueError(f"a layer mix needs at least 2 stored states, got {states}")
        self.states = states
        self.logits = nn.Parameter(torch.zeros(states, dtype=dtype, device=device))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=0)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``[batch, frames, states, dim]`` → ``[batch, frames, dim]``."""
        if audio.ndim != 4 or audio.shape[2] != self.states:
            raise ValueError(f"audio of shape {tuple(audio.shape)}; the layer mix takes "
                             f"[batch, frames, {self.states}, dim]")
        return torch.einsum("btsd,s->btd", audio, self.weights().to(audio.dtype))
