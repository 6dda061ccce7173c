"""The ``jukebox`` encoder: Jukebox-5B's top-level prior cut after layer 36 (LLark §5).

What it computes, for one clip (the recipe of Castellon et al. 2021, as LLark used it):

1. the audio, mixed to mono at 44.1 kHz and peak-normalised, goes through the top level of the
   VQ-VAE (its encoder and codebook only): one token per 128 samples, about 344.5 tokens per second;
2. the tokens go through the top prior the way the prior reads them: token embedding shifted right
   by one behind a start vector (the artist/genre embedding), plus the learned position embedding,
   plus the timing signal (total length, absolute and relative position of the window);
3. the first ``layer`` (36) transformer blocks run; the output of the last one, 4800 values per
   token, is mean-pooled in 100 ms windows: frame ``k`` holds the tokens that start in
   ``[k / 10, (k + 1) / 10)`` s, so frames come at exactly 10 Hz and a 25 s clip gives 250 × 4800.

Conditioning: the released 5B prior is conditioned on artist, genre and timing; there is no
unconditioned path. Like jukemirlib (the reference extractor), the encoder passes artist and genre
"unknown" (id 0 in the release's id lists; the other four genre slots empty) and tells the prior
the song is 62 s long (the prior was trained on songs of 60 s or more; longer clips use their own
length, up to 600 s) and the window starts at its offset in the clip.

Context: the prior sees 8192 tokens (23.78 s) at a time. With ``context="cover"`` (the default) a
longer clip is encoded in consecutive 8192-token windows, and its tail by one more window ending at
the clip's end, of which only the tokens not yet encoded are kept; every token then has at least
its window's context and a 25 s clip keeps its full 250 frames (two windows). ``context="truncate"``
keeps the first 8192 tokens only, as jukemirlib does (238 frames for 25 s, half the cost).

Only what is needed is built and loaded: the VQ-VAE's top-level encoder and codebook (no decoders,
no lower levels) and the prior's embeddings and first ``layer`` blocks (no output head). Modules
are created on PyTorch's meta device and receive the checkpoint's tensors directly, so the
72-layer prior is never materialised. The checkpoints are read with ``weights_only=True`` (plain
containers, tensors and numpy scalars only: nothing in them can run code).

Weights: OpenAI's release files ``vqvae.pth.tar`` and ``prior_level_2.pth.tar`` of the ``5b``
model, in ``--weights-dir`` (default ``~/.cache/jukebox/models/5b``, jukebox-infer's cache layout).
Nothing is downloaded.

Precision and devices: on CUDA the transformer runs in float16 (the precision the release stores
its transformer weights in and Jukebox sampled in) or bfloat16; the VQ-VAE, embeddings, layer
norms and softmaxes stay in float32. On CPU it runs in float32. Both use the same modules and the
same code; tests run it on a tiny random-init model of the same architecture
(:data:`JUKEBOX_TINY`, written by :func:`write_random_weights` in the release's file format).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.encoders import prepare_audio
from pipeline.errors import PipelineError
from pipeline.runner import StageConfigError

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


# ---------------------------------------------------------------------------------------------
# The layer cut


def _jukebox_modules():
    try:
        from jukebox_infer.prior.autoregressive import ConditionalAutoregressive2D, roll
        from jukebox_infer.prior.conditioners import LabelConditioner
        from jukebox_infer.transformer.ops import Conv1D
        from jukebox_infer.vqvae.bottleneck import BottleneckBlock
        from jukebox_infer.vqvae.encdec import Encoder
    except ImportError as exc:
        raise StageConfigError(
            f"--encoder jukebox needs the jukebox-infer package ({exc}); install it with "
            "pip install 'jukebox-infer==0.1.2'"
        ) from None
    return ConditionalAutoregressive2D, roll, LabelConditioner, Conv1D, BottleneckBlock, Encoder


def _layer_cut_class():
    import torch

    ConditionalAutoregressive2D, roll, LabelConditioner, Conv1D, BottleneckBlock, Encoder = _jukebox_modules()

    class JukeboxLayerCut(torch.nn.Module):
        """The VQ-VAE's top-level encoder and codebook, and the top prior's first ``layer`` blocks."""

        def __init__(self, arch: JukeboxArchitecture, layer: int):
            super().__init__()
            self.arch, self.layer = arch, layer
            top = arch.vq_levels - 1
            multiplier = arch.vq_multipliers[top]
            self.vq_encoder = Encoder(
                1, arch.vq_emb_width, top + 1, arch.vq_downs_t[: top + 1], arch.vq_strides_t[: top + 1],
                width=arch.vq_width * multiplier, depth=arch.vq_depth * multiplier, m_conv=arch.vq_m_conv,
                dilation_growth_rate=arch.vq_dilation_growth_rate, dilation_cycle=arch.vq_dilation_cycle,
            )
            self.codebook = BottleneckBlock(arch.vq_bins, arch.vq_emb_width, 0.99)
            self.labels = LabelConditioner(
                y_bins=arch.y_bins, t_bins=arch.t_bins, sr=arch.sample_rate,
                min_duration=arch.min_duration_s, max_duration=arch.max_duration_s, n_time=arch.n_ctx,
                out_width=arch.width, init_scale=arch.init_scale,
                max_bow_genre_size=arch.max_bow_genre_size, include_time_signal=True,
            )
            self.prior = ConditionalAutoregressive2D(
                input_shape=(arch.n_ctx,), bins=arch.vq_bins, width=arch.width, depth=layer,
                heads=arch.heads, attn_order=arch.attn_order, blocks=arch.blocks, spread=None,
                init_scale=arch.init_scale, m_attn=arch.m_attn, m_mlp=arch.m_mlp,
                x_cond=True, y_cond=True, encoder_dims=0, merged_decoder=True, only_encode=True,
            )

        def to_inference(self, device, compute_dtype) -> "JukeboxLayerCut":
            """Move to ``device``: transformer matrices in ``compute_dtype``, everything else float32."""
            conv_weights = {id(m.w) for m in self.modules() if isinstance(m, Conv1D)}
            for module in self.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    dtype = compute_dtype if id(param) in conv_weights else torch.float32
                    module._parameters[name] = torch.nn.Parameter(
                        param.detach().to(device=device, dtype=dtype), requires_grad=False
                    )
                for name, buf in list(module._buffers.items()):
                    if buf is not None:
                        module._buffers[name] = buf.to(device=device, dtype=torch.float32)
            return self.eval()

        def tokens(self, audio):
            """Top-level VQ-VAE codes of one clip: float32 audio ``[samples]`` → long ``[samples // hop]``."""
            # [1, samples, 1] permuted, as the VQ-VAE's own preprocess lays it out: a contiguous
            # [1, 1, samples] takes another convolution kernel, whose rounding can flip a near-tie code.
            encoded = self.vq_encoder(audio.view(1, -1, 1).permute(0, 2, 1).float())[-1]
            return self.codebook.encode(encoded)[0]

        def conditioning(self, offsets: list[int], total_lengths: list[int]):
            """Start vectors ``[B, 1, W]`` and timing signals ``[B, n_ctx, W]`` for windows at these
            token offsets (LabelConditioner.forward without its CUDA-only type assertion)."""
            arch, device = self.arch, self.prior.x_emb.weight.device
            genres = [GENRE_UNKNOWN] + [-1] * (arch.max_bow_genre_size - 1)
            y = torch.tensor(
                [[total, off * arch.hop_length, arch.n_ctx * arch.hop_length, ARTIST_UNKNOWN, *genres]
                 for off, total in zip(offsets, total_lengths)],
                dtype=torch.long, device=device,
            )
            total, start = y[:, 0:1].float(), y[:, 1:2].float()
            end = start + y[:, 2:3].float()
            genre = y[:, 4:]
            mask = (genre >= 0).float().unsqueeze(2)
            genre_emb = (self.labels.bow_genre_emb.emb(genre.clamp(0)) * mask).sum(dim=1, keepdim=True)
            start_emb = genre_emb + self.labels.artist_emb.emb(y[:, 3:4])
            timing = (
                self.labels.total_length_emb(total)
                + self.labels.absolute_pos_emb(start, end)
                + self.labels.relative_pos_emb(start / total, end / total)
            )
            return start_emb, timing

        def window_activations(self, tokens, offsets: list[int], total_lengths: list[int], compute_dtype):
            """Output of block ``layer`` for windows of tokens ``[B, L]`` (``L`` a multiple of the
            attention block size, at most ``n_ctx``; positions past a window's real tokens do not
            change the ones before them: the prior is causal)."""
            batch, length = tokens.shape
            start_emb, timing = self.conditioning(offsets, total_lengths)
            x = roll(self.prior.x_emb(tokens), 1)
            x[:, 0] = start_emb[:, 0]
            x = x + self.prior.pos_emb()[:length] + timing[:, :length]
            x = x.to(compute_dtype)
            for block in self.prior.transformer._attn_mods:
                x = block(x, encoder_kv=None, sample=False)
            return x

    return JukeboxLayerCut


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes, which Jukebox's saved hyperparameters hold (under numpy 1 names too)."""
    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    entries: list = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    entries += [type(np.dtype(code)) for code in ("?", "b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d")]
    return entries


def load_state_dict_file(path: Path) -> dict:
    """The ``model`` state dict of a release checkpoint, read without running any pickled code."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise JukeboxWeightsError(
            f"{path}: refusing to unpickle it: it holds objects other than tensors and plain values ({reason})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise JukeboxWeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise JukeboxWeightsError(f"{path} holds no state dict (expected a 'model' entry of tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def select_layer_cut_weights(vq_state: dict, prior_state: dict, arch: JukeboxArchitecture, layer: int) -> dict:
    """The tensors the layer cut needs, under its own names; the rest is left behind."""
    top = arch.vq_levels - 1
    selected = {}
    for key, value in vq_state.items():
        if key.startswith(f"encoders.{top}."):
            selected["vq_encoder." + key[len(f"encoders.{top}."):]] = value
        elif key == f"bottleneck.level_blocks.{top}.k":
            selected["codebook.k"] = value
    depth = 0
    for key, value in prior_state.items():
        if key.startswith("y_emb."):
            selected["labels." + key[len("y_emb."):]] = value
        elif key.startswith(("prior.x_emb.", "prior.pos_emb.")):
            selected[key] = value
        elif key.startswith("prior.transformer._attn_mods."):
            index = int(key.split(".")[3])
            depth = max(depth, index + 1)
            if index < layer:
                selected[key] = value
    if depth < layer:
        raise JukeboxWeightsError(
            f"{PRIOR_FILE} holds {depth} transformer layers; layer {layer} needs at least that many"
        )
    return selected


def load_layer_cut(weights_dir: Path, arch: JukeboxArchitecture, layer: int, device: str, compute_dtype: str):
    """Build the layer cut on the meta device and fill it with the checkpoints' tensors."""
    import torch

    arch.check()
    JukeboxLayerCut = _layer_cut_class()
    vq_state = load_state_dict_file(Path(weights_dir) / VQVAE_FILE)
    prior_state = load_state_dict_file(Path(weights_dir) / PRIOR_FILE)
    selected = select_layer_cut_weights(vq_state, prior_state, arch, layer)
    del vq_state, prior_state  # drops every tensor that was not selected
    with torch.device("meta"):
        model = JukeboxLayerCut(arch, layer)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(selected))
    wrong = [f"{k} {tuple(selected[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in selected and selected[k].shape != v.shape]
    if missing or wrong:
        raise JukeboxWeightsError(
            f"the checkpoints in {weights_dir} do not match the Jukebox {arch.name} architecture: "
            + "; ".join(filter(None, [
                f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"wrong shapes {', '.join(wrong[:5])}" if wrong else "",
            ]))
        )
    model.load_state_dict(selected, strict=True, assign=True)
    del selected
    return model.to_inference(torch.device(device), getattr(torch, compute_dtype))


def write_random_weights(weights_dir: str | os.PathLike, arch: JukeboxArchitecture, seed: int = 0) -> dict[str, Path]:
    """Write random-init checkpoints of ``arch`` in the release's format (for tests and benchmarks).

    The full VQ-VAE and the full ``arch.depth``-layer prior are built by jukebox-infer's own
    ``VQVAE`` and ``SimplePrior`` classes (what the release was saved from), the prior's
    transformer matrices in float16 as in the release, and saved as ``{"hps", "model", "step"}``
    in PyTorch's legacy (pre-zip) serialisation, with numpy scalars in ``hps`` as in the release.
    """
    import torch

    vqvae, prior = build_reference_models(arch, seed)
    out = Path(weights_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for filename, model in ((VQVAE_FILE, vqvae), (PRIOR_FILE, prior)):
        payload = {
            "hps": {"name": arch.name, "sr": arch.sample_rate, "n_ctx": np.int64(arch.n_ctx),
                    "downs_t": arch.vq_downs_t, "init_scale": float(arch.init_scale)},
            "model": {f"module.{k}" if filename == PRIOR_FILE else k: v for k, v in model.state_dict().items()},
            "step": 0,
        }
        torch.save(payload, out / filename, _use_new_zipfile_serialization=False)
        paths[filename] = out / filename
    return paths


def build_reference_models(arch: JukeboxArchitecture, seed: int = 0):
    """jukebox-infer's full ``VQVAE`` and top-level ``SimplePrior`` for ``arch``, random-init."""
    import contextlib
    import io

    import torch
    from jukebox_infer.prior.prior import SimplePrior
    from jukebox_infer.transformer.ops import _convert_conv_weights_to_fp16
    from jukebox_infer.vqvae.vqvae import VQVAE

    torch.manual_seed(seed)
    top = arch.vq_levels - 1
    hop = arch.hop_length
    vqvae = VQVAE(
        input_shape=(arch.n_ctx * hop, 1), levels=arch.vq_levels, downs_t=arch.vq_downs_t,
        strides_t=arch.vq_strides_t, emb_width=arch.vq_emb_width, l_bins=arch.vq_bins, mu=0.99,
        commit=0.02, spectral=0.0, multispectral=1.0, multipliers=arch.vq_multipliers,
        use_bottleneck=True, width=arch.vq_width, depth=arch.vq_depth, m_conv=arch.vq_m_conv,
        dilation_growth_rate=arch.vq_dilation_growth_rate, dilation_cycle=arch.vq_dilation_cycle,
        reverse_decoder_dilation=True,
    )
    with torch.no_grad():  # codebooks drawn from encoder outputs, as Jukebox initialises them
        noise = torch.randn(1, 1, max(arch.n_ctx, 2 * arch.vq_bins) * hop)
        for level, block in enumerate(vqvae.bottleneck.level_blocks):
            vectors = vqvae.encoders[level](noise)[-1][0].T
            picks = torch.randint(0, len(vectors), (arch.vq_bins,))
            block.k.copy_(vectors[picks] + 0.01 * vectors.std() * torch.randn_like(block.k))
    hops = [math.prod(s**d for s, d in zip(arch.vq_strides_t[: i + 1], arch.vq_downs_t[: i + 1]))
            for i in range(arch.vq_levels)]
    with contextlib.redirect_stdout(io.StringIO()):  # SimplePrior prints its shapes and id files
        prior = SimplePrior(
            z_shapes=[(arch.n_ctx * hop // h,) for h in hops], l_bins=arch.vq_bins,
            encoder=vqvae.encode, decoder=vqvae.decode, level=top,
            downs_t=arch.vq_downs_t, strides_t=arch.vq_strides_t, labels=True,
            prior_kwargs=dict(
                input_shape=(arch.n_ctx,), bins=arch.vq_bins, width=arch.width, depth=arch.depth,
                heads=arch.heads, attn_order=arch.attn_order, blocks=arch.blocks, spread=None,
                attn_dropout=0.0, resid_dropout=0.0, emb_dropout=0.0, zero_out=False,
                res_scale=arch.res_scale, pos_init=False, init_scale=arch.init_scale,
                m_attn=arch.m_attn, m_mlp=arch.m_mlp, checkpoint_res=0, checkpoint_attn=0, checkpoint_mlp=0,
            ),
            x_cond_kwargs=dict(out_width=arch.width, init_scale=arch.init_scale, width=arch.width,
                               depth=1, m_conv=1.0, dilation_growth_rate=1, dilation_cycle=None,
                               zero_out=False, res_scale=False, checkpoint_res=0),
            y_cond_kwargs=dict(out_width=arch.width, init_scale=arch.init_scale, y_bins=arch.y_bins,
                               t_bins=arch.t_bins, sr=arch.sample_rate, min_duration=arch.min_duration_s,
                               max_duration=arch.max_duration_s, max_bow_genre_size=arch.max_bow_genre_size),
            prime_kwargs=dict(use_tokens=False, prime_loss_fraction=0.0, n_tokens=0, bins=80),
            copy_input=False, labels_v3=False, merged_decoder=True, single_enc_dec=False,
        )
    if arch.fp16_params:
        prior.apply(_convert_conv_weights_to_fp16)
    return vqvae.eval(), prior.eval()


# ---------------------------------------------------------------------------------------------
# Devices


_CLAIMED_GPU: Any = None  # the open lock file that reserves this process's GPU


def claim_gpu(lock_dir: Path | None = None) -> str:
    """``cuda:i`` for the first GPU no other worker on this machine holds (a lock held until exit).

    Several embed workers (or runs) on one machine thus spread over its GPUs; with more workers
    than GPUs, the extra ones share GPUs round-robin.
    """
    global _CLAIMED_GPU
    import fcntl
    import tempfile

    import torch

    count = torch.cuda.device_count()
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"llark-gpu-locks-{os.getuid()}"
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        # Named by the GPU's UUID, so processes that see it under another index (CUDA_VISIBLE_DEVICES) agree.
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
        handle = open(lock_dir / f"gpu-{uuid}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED_GPU = handle
        return f"cuda:{index}"
    return f"cuda:{os.getpid() % max(count, 1)}"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_compute_dtype(compute_dtype: str, device: str) -> str:
    if compute_dtype != "auto":
        return compute_dtype
    return "float16" if device.startswith("cuda") else "float32"


# ---------------------------------------------------------------------------------------------
# The encoder


@dataclass
class JukeboxEncoder:
    """Encodes clips with a loaded layer cut; see the module docstring for the recipe."""

    model: Any
    arch: JukeboxArchitecture
    layer: int
    device: str
    compute_dtype: str
    context: str = "cover"
    batch_windows: int = 2
    options: dict = field(default_factory=dict)

    name = NAME
    frame_rate_hz = FRAME_RATE_HZ

    @property
    def dim(self) -> int:
        return self.arch.width

    def config(self) -> dict[str, Any]:
        return describe(self.options)["config"]

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray:
        return self.encode_batch([(audio, sr)])[0]

    def encode_batch(self, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Encode several clips, sharing the prior's forward passes between them.

        Each clip's VQ-VAE tokens are computed alone. Its context windows are then pooled with the
        other clips' by length: windows whose length, rounded up to the attention block, is the
        same are stacked ``batch_windows`` at a time into one forward pass on the model's device
        and dtype (a 25 s clip is two full 8192-token windows; only a clip shorter than the
        context has a shorter one, zero-padded to the block). A window's padding therefore never
        depends on which clips it is batched with, and on CPU a clip's numbers are the same bits
        whatever the batch; on a GPU, batched matrix products may round differently.
        """
        import torch

        arch, hop = self.arch, self.arch.hop_length
        dtype = getattr(torch, self.compute_dtype)
        sums, counts, jobs = [], [], []
        with torch.inference_mode():
            for index, (audio, sr) in enumerate(clips):
                samples = prepare_audio(audio, sr, arch.sample_rate)
                if len(samples) < hop:
                    raise ValueError(f"a clip needs at least {hop} samples, got {len(samples)}")
                tokens = self.model.tokens(torch.from_numpy(samples).to(self.device))
                total = max(CONDITIONING_LENGTH_S * arch.sample_rate, len(samples))
                if total >= arch.max_duration_s * arch.sample_rate:
                    raise ValueError(f"clips must be shorter than {arch.max_duration_s:.0f} s for the prior's timing signal")
                total = int(math.ceil(total / hop)) * hop
                windows = plan_windows(len(tokens), arch.n_ctx, self.context)
                frames = int(token_frames(windows[-1].keep_to - 1, hop, arch.sample_rate)) + 1
                sums.append(torch.zeros(frames, arch.width, dtype=torch.float32, device=self.device))
                counts.append(torch.zeros(frames, dtype=torch.float32, device=self.device))
                jobs += [(index, tokens, window, total) for window in windows]
            by_length: dict[int, list] = {}
            for job in jobs:
                by_length.setdefault(-(-job[2].length // arch.block_ctx) * arch.block_ctx, []).append(job)
            for length, group in sorted(by_length.items(), reverse=True):
                for first in range(0, len(group), self.batch_windows):
                    self._run_windows(group[first : first + self.batch_windows], length, dtype, sums, counts)
            return [(s / c[:, None]).cpu().numpy() for s, c in zip(sums, counts)]

    def _run_windows(self, batch: list, length: int, dtype, sums: list, counts: list) -> None:
        """One forward pass over windows padded to ``length``; adds each kept token's activations
        to its clip's frame sums."""
        import torch

        arch, hop = self.arch, self.arch.hop_length
        tokens = torch.zeros(len(batch), length, dtype=torch.long, device=self.device)
        for row, (_, clip_tokens, w, _) in enumerate(batch):
            tokens[row, : w.length] = clip_tokens[w.start : w.start + w.length]
        offsets, totals = [w.start for _, _, w, _ in batch], [total for _, _, _, total in batch]
        acts = self.model.window_activations(tokens, offsets, totals, dtype)
        for row, (index, _, w, _) in enumerate(batch):
            kept = acts[row, w.keep_from - w.start : w.keep_to - w.start].float()
            frames = token_frames(np.arange(w.keep_from, w.keep_to), hop, arch.sample_rate)
            frame_index = torch.from_numpy(frames).to(self.device)
            sums[index].index_add_(0, frame_index, kept)
            counts[index].index_add_(0, frame_index, torch.ones_like(frame_index, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# Memory estimate


def estimate_gpu_memory(arch: JukeboxArchitecture = JUKEBOX_5B, layer: int = DEFAULT_LAYER,
                        compute_bytes: int = 2, batch_windows: int = 1, clip_s: float = 25.0) -> dict[str, float]:
    """Bytes of GPU memory the layer cut needs: exact parameter bytes (counted on the meta device)
    and an upper estimate of the largest activations alive at once while one block runs."""
    import torch

    Conv1D = _jukebox_modules()[3]
    with torch.device("meta"):
        model = _layer_cut_class()(arch, layer)
    conv = {id(m.w) for m in model.modules() if isinstance(m, Conv1D)}
    transformer = sum(p.numel() * compute_bytes for p in model.parameters() if id(p) in conv)
    float32 = sum(p.numel() * 4 for p in model.parameters() if id(p) not in conv)
    float32 += sum(b.numel() * 4 for b in model.buffers())
    n, width = arch.n_ctx, arch.width
    state, mlp = int(arch.m_attn * width), int(arch.m_mlp * width)
    per_window = (
        n * width * 4 * 2             # the float32 embedding sum and timing signal before the cast
        + n * width * compute_bytes * 3  # residual stream, block input kept for the skip, attention output
        + n * width * 4               # a layer norm's float32 copy
        + n * state * 3 * compute_bytes * 2  # q, k, v and their contiguous reshapes
        + arch.heads * n * max(arch.block_ctx, arch.blocks) * (compute_bytes + 4)  # scores, float32 softmax
        + n * mlp * compute_bytes * 2  # MLP hidden and its activation
    )
    audio = int(clip_s * arch.sample_rate)
    vq_width = arch.vq_width * arch.vq_multipliers[-1]
    vq = audio // arch.vq_strides_t[0] * vq_width * 4 * 3 + (audio // arch.hop_length) * arch.vq_bins * 4
    return {
        "transformer_weights": transformer,
        "float32_weights": float32,
        "activations_per_window": per_window,
        "vq_encoder_activations": vq,
        "total": transformer + float32 + max(per_window * batch_windows, vq),
    }


# ---------------------------------------------------------------------------------------------
# The encoder-module interface (see pipeline.encoders)

DEFAULT_OPTIONS = {
    "weights_dir": str(DEFAULT_WEIGHTS_DIR),
    "layer": DEFAULT_LAYER,
    "device": "auto",
    "compute_dtype": "auto",
    "batch_windows": 2,
    "context": "cover",
    "architecture": "5b",
}


def _architecture(value) -> JukeboxArchitecture:
    if isinstance(value, dict):
        return JukeboxArchitecture.from_dict(value)
    return ARCHITECTURES[value]


def missing_weights_message(weights_dir: Path, missing: list[str]) -> str:
    files = "; ".join(f"{name}: {RELEASE_FILES[name]}" for name in missing)
    return (
        f"--weights-dir: the jukebox encoder needs OpenAI's Jukebox-5B checkpoints, and {weights_dir} lacks "
        f"{', '.join(missing)} ({files}). Put the release's files there unchanged (they are at "
        f"{RELEASE_URL}{{{','.join(RELEASE_FILES)}}}), or give the directory that holds them with "
        "--weights-dir. Nothing is downloaded."
    )


def check_options(options: dict[str, Any], devices_here: bool = True) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise StageConfigError(f"unknown jukebox encoder options: {', '.join(unknown)}")
    opts = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    arch_value = opts["architecture"]
    if not isinstance(arch_value, dict) and arch_value not in ARCHITECTURES:
        raise StageConfigError(f"unknown Jukebox architecture {arch_value!r} (choose from {', '.join(ARCHITECTURES)})")
    arch = _architecture(arch_value)
    try:
        arch.check()
    except ValueError as exc:
        raise StageConfigError(f"Jukebox architecture: {exc}") from None
    if not 1 <= int(opts["layer"]) <= arch.depth:
        raise StageConfigError(f"--layer must be between 1 and {arch.depth}, got {opts['layer']}")
    if opts["context"] not in CONTEXTS:
        raise StageConfigError(f"--context must be one of {', '.join(CONTEXTS)}, got {opts['context']!r}")
    if int(opts["batch_windows"]) < 1:
        raise StageConfigError(f"--batch-windows must be at least 1, got {opts['batch_windows']}")
    if opts["compute_dtype"] not in COMPUTE_DTYPES:
        raise StageConfigError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    weights_dir = Path(opts["weights_dir"]).expanduser()
    missing = [name for name in RELEASE_FILES if not (weights_dir / name).is_file()]
    if missing:
        raise StageConfigError(missing_weights_message(weights_dir, missing))
    _jukebox_modules()
    import torch

    if not devices_here and opts["device"] == "auto":
        raise StageConfigError("--device: say cpu or cuda when the workers run on other machines")
    device = resolve_device(opts["device"])
    if not (device == "cpu" or device == "cuda" or re.fullmatch(r"cuda:\d+", device)):
        raise StageConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {opts['device']!r}")
    compute = resolve_compute_dtype(opts["compute_dtype"], device)
    if devices_here and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StageConfigError(f"--device {opts['device']}: CUDA is not available on this machine")
        if compute == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise StageConfigError("--compute-dtype bfloat16: this GPU does not support bfloat16; use float16")
    return {
        **opts, "weights_dir": str(weights_dir.resolve()), "layer": int(opts["layer"]),
        "batch_windows": int(opts["batch_windows"]), "device": device, "compute_dtype": compute,
        "architecture": arch_value if isinstance(arch_value, str) else asdict(arch),
    }


def describe(options: dict[str, Any]) -> dict[str, Any]:
    arch = _architecture(options["architecture"])
    weights_dir = Path(options["weights_dir"])
    return {
        "name": NAME,
        "layer": options["layer"],
        "frame_rate_hz": FRAME_RATE_HZ,
        "dim": arch.width,
        "config": {
            "model": f"jukebox-{arch.name}",
            "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(arch).items()},
            "context": options["context"],
            "compute_dtype": options["compute_dtype"],
            "peak_normalise": True,
            "pooling": "mean over the tokens that start in each 100 ms window",
            "conditioning": {"artist": "unknown", "genre": "unknown",
                             "total_length_s": f"max({CONDITIONING_LENGTH_S:g}, clip duration)"},
            "weights": {name: (weights_dir / name).stat().st_size for name in RELEASE_FILES
                        if (weights_dir / name).is_file()},
        },
        "packages": JUKEBOX_PACKAGES,
    }


def build(options: dict[str, Any]) -> JukeboxEncoder:
    arch = _architecture(options["architecture"])
    device = options["device"]
    if device == "cuda":
        device = claim_gpu()
    model = load_layer_cut(Path(options["weights_dir"]), arch, options["layer"], device, options["compute_dtype"])
    return JukeboxEncoder(
        model=model, arch=arch, layer=options["layer"], device=device, compute_dtype=options["compute_dtype"],
        context=options["context"], batch_windows=options["batch_windows"], options=options,
    )
