"""The ``linear`` connector: the paper's projector, one audio token per frame."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def standardise_linear_(layer: nn.Linear, mean: np.ndarray, std: np.ndarray, out_std: float, seed: int = 0,
                        min_relative_std: float = 0.1) -> None:
    """Set ``layer`` so that inputs with the per-dimension ``mean`` and ``std`` come out centred with
    spread ``out_std``: ``W = N(0, 1) * out_std / sqrt(dim) / std`` (column-wise), ``b = -W @ mean``,
    a random projection of the standardised inputs. A dimension that hardly varies (a silent mel
    band) is scaled as if its spread were ``min_relative_std`` x the median spread, so that its
    noise is not amplified."""
    dim = layer.in_features
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ValueError(f"frame statistics of shape {mean.shape}/{std.shape} for a connector from {dim}")
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(layer.out_features, dim, generator=generator, dtype=torch.float64)
    weight *= out_std / math.sqrt(dim)
    floor = max(float(np.median(std)) * min_relative_std, 1e-8)
    weight /= torch.from_numpy(np.maximum(std, floor).astype(np.float64))[None, :]
    bias = -(weight @ torch.from_numpy(mean.astype(np.float64)))
    layer.weight.copy_(weight.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(bias.to(layer.bias.dtype))


@torch.no_grad()
def scaled_normal_(layer: nn.Linear, out_std: float, input_variance: float = 1.0, seed: int = 0) -> None:
    """Weights N(0, out_std² / (in_features × input_variance)), zero bias: unit-variance-ish inputs
    of that variance come out with spread ``out_std``."""
    generator = torch.Generator().manual_seed(seed)
    std = out_std / math.sqrt(layer.in_features * input_variance)
    layer.weight.copy_((torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64) * std)
                       .to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.zero_()


class TokenPerFrame:
    """The token counts of a connector that maps every frame to one audio token."""

    @staticmethod
    def check(settings: dict) -> None:
        return None

    @staticmethod
    def count_tokens(frames: int, **_) -> int:
        return frames

    def tokens_for(self, frames: int) -> int:
        return frames

    def token_counts(self, audio_frames: torch.Tensor) -> torch.Tensor:
        return audio_frames


class LinearConnector(TokenPerFrame, nn.Linear):
    """``W x + b`` on every frame. A subclass of ``nn.Linear`` so that its weights are named as the
    projector's always were (``weight``, ``bias``): earlier exports load unchanged."""

    DEFAULTS: dict = {}

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None):
        super().__init__(in_features, out_features, dtype=dtype, device=device)

    @property
    def input_layer(self) -> nn.Linear:
        return self

    def initialise(self, mean: np.ndarray, std: np.ndarray, token_std: float, seed: int = 0) -> None:
        standardise_linear_(self, mean, std, token_std, seed)

    def forward(self, audio: torch.Tensor, audio_frames: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(audio)
