"""The ``attention_fusion`` connector: several encoders' frames, at their own frame rates, into one
sequence of audio tokens.

Each encoder ``e`` has its own input layer, ``H_e = X_e W_e + b_e`` (width ``width``), and every
projected frame gets a learned embedding of its encoder's type and a time signal: Fourier
features of where the frame's centre lies in its span, through a learned linear map. No common
frame grid is needed: the clip is cut into spans of ``span_s`` seconds, and a frame belongs to
every span its own interval ``[k / rate_e, (k + 1) / rate_e)`` overlaps (a CLAP frame of 0.31 s
may serve two 0.25 s spans). Each span's ``queries`` learned queries cross-attend, through
``layers`` pre-norm blocks (as the ``qformer``'s), to the concatenation of every encoder's frames
in that span; frames outside it and padding are masked. The queries' outputs, projected to the LM's
width, are the span's audio tokens, in time order.

The token count is a function of the clip's duration, known before the forward pass: the duration
is ``max_e frames_e / rate_e`` (the encoders of one clip agree within a frame), and a clip becomes
``max(1, ceil(duration / span_s)) x queries`` tokens: a 25 s clip with 0.5 s spans and one query
takes 50 tokens.

Settings: ``encoders`` (the names of the encoders it reads, in order), ``inputs`` (each one's
``dim`` and ``frame_rate_hz``; filled in from the shards' ``encoder.json`` by training, kept in
``llark_config.json``), ``span_s``, ``queries``, ``layers``, ``heads``, ``width``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from llark.model.connectors.linear import scaled_normal_, standardise_linear_
from llark.model.connectors.qformer import add_query_stack

TIME_FREQUENCIES = 8
_TOLERANCE = 1e-9  # frame boundaries computed in float64 that should be integers


def clip_duration(frames: dict[str, int], rates: dict[str, float]) -> float:
    return max(frames[name] / float(rates[name]) for name in rates)


def count_spans(frames: dict[str, int], rates: dict[str, float], span_s: float) -> int:
    return max(1, math.ceil(clip_duration(frames, rates) / span_s - 1e-6))


def span_frames(span: int, rate: float, span_s: float) -> tuple[int, int]:
    """The frames ``[first, end)`` of an encoder at ``rate`` whose interval overlaps span ``span``."""
    first = math.floor(span * span_s * rate + _TOLERANCE)
    end = math.ceil((span + 1) * span_s * rate - _TOLERANCE)
    return first, end


def check_inputs(inputs: Any, encoders: list[str] | None) -> None:
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError("model.connector.inputs: {encoder: {dim, frame_rate_hz}} for each encoder")
    for name, spec in inputs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("dim"), int) or spec["dim"] < 1 or \
                not isinstance(spec.get("frame_rate_hz"), (int, float)) or spec["frame_rate_hz"] <= 0:
            raise ValueError(f"model.connector.inputs.{name}: needs a positive integer dim and a positive "
                             f"frame_rate_hz, got {spec!r}")
    if encoders is not None and list(encoders) != list(inputs):
        raise ValueError(f"model.connector.encoders {list(encoders)} do not match model.connector.inputs "
                         f"{list(inputs)}")


class AttentionFusionConnector(nn.Module):
    DEFAULTS = {"encoders": None, "inputs": None, "span_s": 0.5, "queries": 1, "layers": 2, "heads": 4, "width": None}
    INTEGER_SETTINGS = ("queries", "layers", "heads", "width")

    def __init__(self, in_features: Any, out_features: int, encoders: list[str] | None = None,
                 inputs: dict[str, dict] | None = None, span_s: float = 0.5, queries: int = 1, layers: int = 2,
                 heads: int = 4, width: int | None = None, dtype=None, device=None):
        super().__init__()
        if inputs is None:
            raise ValueError("model.connector.inputs: the attention_fusion connector needs each encoder's dim and "
                             "frame rate (training fills them in from the shards' encoder.json)")
        check_inputs(inputs, encoders)
        width = width or min(out_features, 768)
        if width % heads:
            raise ValueError(f"model.connector.width ({width}) must be a multiple of model.connector.heads ({heads})")
        kw = {"dtype": dtype, "device": device}
        self.names = list(inputs)
        self.in_features = {name: int(spec["dim"]) for name, spec in inputs.items()}
        self.rates = {name: float(spec["frame_rate_hz"]) for name, spec in inputs.items()}
        self.out_features, self.span_s, self.queries_per_span = out_features, float(span_s), queries
        self.input_proj = nn.ModuleDict({name: nn.Linear(dim, width, **kw) for name, dim in self.in_features.items()})
        self.encoder_type = nn.Parameter(torch.randn(len(self.names), width, **kw) * 0.02)
        self.time_proj = nn.Linear(2 * TIME_FREQUENCIES, width, **kw)
        nn.init.normal_(self.time_proj.weight, std=0.02)
        nn.init.zeros_(self.time_proj.bias)
        self.frame_norm = nn.LayerNorm(width, **kw)
        add_query_stack(self, queries, width, heads, layers, out_features, **kw)

    @staticmethod
    def check(settings: dict) -> None:
        span = settings.get("span_s")
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not 0 < span <= 60:
            raise ValueError(f"model.connector.span_s: seconds per span, more than 0 and at most 60, got {span!r}")
        encoders = settings.get("encoders")
        if encoders is not None and (not isinstance(encoders, list) or not encoders
                                     or not all(isinstance(e, str) and e for e in encoders)
                                     or len(set(encoders)) != len(encoders)):
            raise ValueError(f"model.connector.encoders: a list of distinct encoder names, got {encoders!r}")
        if settings.get("inputs") is not None:
            check_inputs(settings["inputs"], encoders)
        width, heads = settings.get("width"), settings["heads"]
        if width is not None and width % heads:
            raise ValueError(f"model.connector.width ({width}) must be a multiple of model.connector.heads ({heads})")

    @staticmethod
    def count_tokens(frames: dict[str, int], inputs: dict[str, dict] | None = None, span_s: float = 0.5,
                     queries: int = 1, **_) -> int:
        if not isinstance(frames, dict):
            raise ValueError("the attention_fusion connector counts tokens from each encoder's frames "
                             "({encoder: frames}), not from one frame count")
        if inputs is None:
            raise ValueError("model.connector.inputs: unknown, so the token count of a clip is too")
        rates = {name: float(spec["frame_rate_hz"]) for name, spec in inputs.items()}
        missing = sorted(set(rates) - set(frames))
        if missing:
            raise ValueError(f"no frames of encoder {missing[0]!r}, which the attention_fusion connector reads")
        return count_spans(frames, rates, span_s) * queries

    def tokens_for(self, frames: dict[str, int]) -> int:
        return count_spans(frames, self.rates, self.span_s) * self.queries_per_span

    def span_counts(self, audio_frames: dict[str, torch.Tensor]) -> torch.Tensor:
        duration = torch.stack([audio_frames[name].to(torch.float64) / self.rates[name] for name in self.names]).amax(0)
        return torch.ceil(duration / self.span_s - 1e-6).clamp(min=1).long()

    def token_counts(self, audio_frames: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.span_counts(audio_frames) * self.queries_per_span

    @property
    def input_layer(self) -> nn.ModuleDict:
        return self.input_proj

    def initialise(self, mean: dict[str, np.ndarray], std: dict[str, np.ndarray], token_std: float,
                   seed: int = 0) -> None:
        """Each encoder's standardised frames into the shared width; tokens out at the LM's spread."""
        missing = [name for name in self.names if name not in mean or name not in std]
        if missing:
            raise ValueError(f"no frame statistics of encoder {missing[0]!r}")
        for k, name in enumerate(self.names):
            standardise_linear_(self.input_proj[name], mean[name], std[name], 1.0, seed + 2 + k)
        scaled_normal_(self.output_proj, token_std, 1.0, seed + 1)

    def _time_signal(self, offsets: torch.Tensor) -> torch.Tensor:
        frequencies = torch.arange(1, TIME_FREQUENCIES + 1, dtype=torch.float64, device=offsets.device) * math.pi
        angles = offsets[..., None] * frequencies
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(self.time_proj.weight.dtype)
        return self.time_proj(features)

    def forward(self, audio: dict[str, torch.Tensor], audio_frames: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [name for name in self.names if name not in audio or name not in audio_frames]
        if missing:
            raise ValueError(f"no frames of encoder {missing[0]!r}, which this attention_fusion connector reads")
        spans_per_row = self.span_counts(audio_frames)
        batch, spans = spans_per_row.shape[0], int(spans_per_row.max())
        keys, valid = [], []
        for k, name in enumerate(self.names):
            x, frames, rate = audio[name], audio_frames[name].to(audio[name].device), self.rates[name]
            bounds = [span_frames(j, rate, self.span_s) for j in range(spans)]
            width = max(1, max(end - first for first, end in bounds))
            first = torch.tensor([b[0] for b in bounds], device=x.device)
            end = torch.tensor([b[1] for b in bounds], device=x.device)
            index = first[:, None] + torch.arange(width, device=x.device)[None, :]  # [spans, width]
            inside = index < end[:, None]
            real = inside[None] & (index[None] < frames[:, None, None])  # [batch, spans, width]
            projected = self.input_proj[name](x)
            gathered = projected[:, index.clamp(max=x.shape[1] - 1).reshape(-1)]
            centre = (index.to(torch.float64) + 0.5) / rate
            offset = (centre - torch.arange(spans, device=x.device, dtype=torch.float64)[:, None] * self.span_s) / self.span_s
            signal = self._time_signal(offset) + self.encoder_type[k]
            keys.append(gathered.reshape(batch, spans, width, -1) + signal)
            valid.append(real)
        keys_all = self.frame_norm(torch.cat(keys, dim=2)).reshape(batch * spans, -1, keys[0].shape[-1])
        padding = ~torch.cat(valid, dim=2).reshape(batch * spans, -1)
        # A span past a clip's end (a shorter clip of the batch) still needs one key for the softmax;
        # its tokens are beyond the clip's count and dropped.
        padding[:, 0] &= ~padding.all(dim=1)
        queries = self.queries.expand(batch * spans, -1, -1)
        for block in self.blocks:
            queries = block(queries, keys_all, padding)
        return self.output_proj(self.out_norm(queries)).reshape(batch, spans * self.queries_per_span, -1)
