"""The ``mlp`` connector: Linear-GELU-Linear on every frame (LLaVA-1.5, Audio Flamingo 3)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from llark.model.connectors.linear import TokenPerFrame, scaled_normal_, standardise_linear_

GELU_SECOND_MOMENT = 0.425  # E[gelu(x)²] for x ~ N(0, 1)


class MlpConnector(TokenPerFrame, nn.Module):
    """``fc2(gelu(fc1(x)))``, one token per frame; ``hidden`` defaults to the LM's width."""

    DEFAULTS = {"hidden": None}

    def __init__(self, in_features: int, out_features: int, hidden: int | None = None, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        hidden = hidden or out_features
        self.fc1 = nn.Linear(in_features, hidden, dtype=dtype, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features, dtype=dtype, device=device)

    @property
    def input_layer(self) -> nn.Linear:
        return self.fc1

    def initialise(self, mean: np.ndarray, std: np.ndarray, token_std: float, seed: int = 0) -> None:
        """Standardised frames into the hidden layer, tokens out at the spread of the LM's embeddings."""
        standardise_linear_(self.fc1, mean, std, 1.0, seed)
        scaled_normal_(self.fc2, token_std, GELU_SECOND_MOMENT, seed + 1)

    def forward(self, audio: torch.Tensor, audio_frames: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(audio)))
