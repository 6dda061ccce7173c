"""The Jukebox release's constants and architecture, and how its tokens map to the prior's context
windows and to 100 ms frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

NAME = "jukebox"
SAMPLE_RATE = 44_100
FRAME_RATE_HZ = 10.0
DEFAULT_LAYER = 36
DEFAULT_WEIGHTS_DIR = Path("~/.cache/jukebox/models/5b")
VQVAE_FILE = "vqvae.pth.tar"
PRIOR_FILE = "prior_level_2.pth.tar"
RELEASE_FILES = {
    VQVAE_FILE: "the VQ-VAE (about 7.4 MB)",
    PRIOR_FILE: "the 5B top-level prior (about 10 GB)",
}
RELEASE_URL = "https://openaipublic.azureedge.net/jukebox/models/5b/"
ARTIST_UNKNOWN = 0
GENRE_UNKNOWN = 0
CONDITIONING_LENGTH_S = 62.0
CONTEXTS = ("cover", "truncate")
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
JUKEBOX_PACKAGES = ("torch", "jukebox-infer")


class JukeboxWeightsError(PipelineError, RuntimeError):
    """The weights are absent, unreadable, or do not match the architecture."""


@dataclass(frozen=True)
class JukeboxArchitecture:
    """The numbers that define the VQ-VAE's top level and the top prior (jukebox-infer's hparams)."""

    name: str = "5b"
    sample_rate: int = SAMPLE_RATE
    vq_levels: int = 3
    vq_downs_t: tuple[int, ...] = (3, 2, 2)
    vq_strides_t: tuple[int, ...] = (2, 2, 2)
    vq_emb_width: int = 64
    vq_bins: int = 2048
    vq_width: int = 32
    vq_depth: int = 4
    vq_m_conv: float = 1.0
    vq_dilation_growth_rate: int = 3
    vq_dilation_cycle: int | None = None
    vq_multipliers: tuple[int, ...] = (2, 1, 1)
    n_ctx: int = 8192
    width: int = 4800
    depth: int = 72
    heads: int = 8
    attn_order: int = 2
    blocks: int = 128
    init_scale: float = 0.1
    m_attn: float = 0.25
    m_mlp: float = 1.0
    res_scale: bool = False
    y_bins: tuple[int, int] = (120, 4111)
    t_bins: int = 128
    max_bow_genre_size: int = 5
    min_duration_s: float = 60.0
    max_duration_s: float = 600.0
    fp16_params: bool = True

    @property
    def hop_length(self) -> int:
        """Audio samples per top-level token (128 for Jukebox)."""
        return math.prod(s**d for s, d in zip(self.vq_strides_t, self.vq_downs_t))

    @property
    def block_ctx(self) -> int:
        return self.n_ctx // self.blocks

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JukeboxArchitecture":
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})

    def check(self) -> None:
        if self.n_ctx % self.blocks:
            raise ValueError(f"n_ctx ({self.n_ctx}) must be a multiple of blocks ({self.blocks})")
        if self.res_scale:
            raise ValueError("a prior with res_scale scales every block by 1/depth, so it cannot be cut")
        if len(self.vq_downs_t) != self.vq_levels or len(self.vq_multipliers) != self.vq_levels:
            raise ValueError("vq_downs_t and vq_multipliers need one entry per VQ-VAE level")


JUKEBOX_5B = JukeboxArchitecture()
# A random-init stand-in of the same architecture for tests and benchmarks: the real VQ-VAE
# strides (128 samples per token), a prior of width 32 with 4 layers, 16-token blocks.
JUKEBOX_TINY = replace(
    JUKEBOX_5B, name="tiny", vq_emb_width=16, vq_bins=64, vq_width=8, vq_depth=1,
    n_ctx=128, width=32, depth=4, heads=2, blocks=8, init_scale=1.0,
    y_bins=(8, 16), t_bins=16,
)
ARCHITECTURES = {"5b": JUKEBOX_5B, "tiny": JUKEBOX_TINY}


# ---------------------------------------------------------------------------------------------
# Windows and frames


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, start + length)`` go through the prior; ``[keep_from, keep_to)`` are kept."""

    start: int
    length: int
    keep_from: int
    keep_to: int


def plan_windows(n_tokens: int, n_ctx: int, context: str = "cover") -> list[Window]:
    if n_tokens <= n_ctx:
        return [Window(0, n_tokens, 0, n_tokens)]
    if context == "truncate":
        return [Window(0, n_ctx, 0, n_ctx)]
    windows, start = [], 0
    while start + n_ctx <= n_tokens:
        windows.append(Window(start, n_ctx, start, start + n_ctx))
        start += n_ctx
    if start < n_tokens:
        windows.append(Window(n_tokens - n_ctx, n_ctx, start, n_tokens))
    return windows


def token_frames(token_index: np.ndarray | int, hop_length: int, sample_rate: int = SAMPLE_RATE):
    """The 100 ms frame in which each token starts: ``floor(index * hop * 10 / sample_rate)``."""
    return (np.asarray(token_index, dtype=np.int64) * hop_length * 10) // sample_rate

