"""The ``qformer`` connector: a window-level Q-Former (SALMONN's), a fixed number of tokens per second.

The frames are cut into windows of ``window`` frames (at 10 Hz, 3 frames = 0.3 s, SALMONN's
0.33 s); each window gets ``queries`` learned query vectors that pass through ``layers`` pre-norm
blocks of self-attention among the queries, cross-attention to the window's frames (projected to
``width`` and given a learned position within the window; frames past the clip's end are masked)
and a feed-forward layer. The queries' outputs, projected to the LM's width, are the window's audio
tokens: a clip of ``n`` frames becomes ``ceil(n / window) × queries`` tokens, in time order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llark.model.connectors.linear import scaled_normal_, standardise_linear_


class QFormerBlock(nn.Module):
    def __init__(self, width: int, heads: int, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.self_norm = nn.LayerNorm(width, **kw)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True, **kw)
        self.cross_norm = nn.LayerNorm(width, **kw)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True, **kw)
        self.ffn_norm = nn.LayerNorm(width, **kw)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width, **kw), nn.GELU(), nn.Linear(4 * width, width, **kw))

    def forward(self, queries: torch.Tensor, frames: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.self_norm(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.cross_norm(queries)
        queries = queries + self.cross_attn(x, frames, frames, key_padding_mask=padding, need_weights=False)[0]
        return queries + self.ffn(self.ffn_norm(queries))


def add_query_stack(module: nn.Module, queries: int, width: int, heads: int, layers: int, out_features: int,
                    **kw) -> None:
    """The learned ``queries``, their ``blocks``, ``out_norm`` and ``output_proj`` (to the LM's width),
    set on ``module`` under those names (the state-dict keys of every export)."""
    module.queries = nn.Parameter(torch.randn(queries, width, **kw) * 0.02)
    module.blocks = nn.ModuleList(QFormerBlock(width, heads, **kw) for _ in range(layers))
    module.out_norm = nn.LayerNorm(width, **kw)
    module.output_proj = nn.Linear(width, out_features, **kw)


class QFormerConnector(nn.Module):
    DEFAULTS = {"window": 3, "queries": 1, "layers": 2, "heads": 4, "width": None}

    def __init__(self, in_features: int, out_features: int, window: int = 3, queries: int = 1, layers: int = 2,
                 heads: int = 4, width: int | None = None, dtype=None, device=None):
        super().__init__()
        width = width or min(out_features, 768)
        if width % heads:
            raise ValueError(f"model.connector.width ({width}) must be a multiple of model.connector.heads ({heads})")
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        self.window, self.queries_per_window = window, queries
        self.input_proj = nn.Linear(in_features, width, **kw)
        self.position = nn.Parameter(torch.randn(window, width, **kw) * 0.02)
        add_query_stack(self, queries, width, heads, layers, out_features, **kw)

    @staticmethod
    def check(settings: dict) -> None:
        width, heads = settings.get("width"), settings["heads"]
        if width is not None and width % heads:
            raise ValueError(f"model.connector.width ({width}) must be a multiple of model.connector.heads ({heads})")

    @staticmethod
    def count_tokens(frames: int, window: int = 3, queries: int = 1, **_) -> int:
        return math.ceil(frames / window) * queries

    def tokens_for(self, frames: int) -> int:
        return self.count_tokens(frames, self.window, self.queries_per_window)

    def token_counts(self, audio_frames: torch.Tensor) -> torch.Tensor:
        return (audio_frames + self.window - 1) // self.window * self.queries_per_window

    @property
    def input_layer(self) -> nn.Linear:
        return self.input_proj

    def initialise(self, mean: np.ndarray, std: np.ndarray, token_std: float, seed: int = 0) -> None:
        """Standardised frames into the blocks, tokens out (after the final norm) at the LM's spread."""
        standardise_linear_(self.input_proj, mean, std, 1.0, seed)
        scaled_normal_(self.output_proj, token_std, 1.0, seed + 1)

    def forward(self, audio: torch.Tensor, audio_frames: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = audio.shape
        w = self.window
        windows = max(1, math.ceil(frames / w))
        x = self.input_proj(F.pad(audio, (0, 0, 0, windows * w - frames)))
        x = x.reshape(batch * windows, w, -1) + self.position
        valid = torch.arange(windows * w, device=audio.device)[None, :] < audio_frames[:, None]
        padding = ~valid.reshape(batch * windows, w)
        # A window wholly past the clip's end still needs one key for the softmax; its tokens are dropped.
        padding[:, 0] &= ~padding.all(dim=1)
        queries = self.queries.expand(batch * windows, -1, -1)
        for block in self.blocks:
            queries = block(queries, x, padding)
        return self.output_proj(self.out_norm(queries)).reshape(batch, windows * self.queries_per_window, -1)
