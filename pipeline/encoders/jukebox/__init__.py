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

The code is split by job: ``architecture`` (the release's constants and numbers, windows and
frames), ``layer_cut`` (the model and its memory estimate) and ``weights`` (the checkpoints), with the
device choice shared with the other encoders in ``pipeline.encoders.devices``; this module holds
the encoder and the encoder-module interface.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.encoders import prepare_audio

# Every module's names are imported here too: ``pipeline.encoders.jukebox.X`` is the package's public API.
from pipeline.encoders.jukebox.architecture import (
    ARCHITECTURES,
    ARTIST_UNKNOWN,
    COMPUTE_DTYPES,
    CONDITIONING_LENGTH_S,
    CONTEXTS,
    DEFAULT_LAYER,
    DEFAULT_WEIGHTS_DIR,
    FRAME_RATE_HZ,
    GENRE_UNKNOWN,
    JUKEBOX_5B,
    JUKEBOX_PACKAGES,
    JUKEBOX_TINY,
    NAME,
    PRIOR_FILE,
    RELEASE_FILES,
    RELEASE_URL,
    SAMPLE_RATE,
    VQVAE_FILE,
    JukeboxArchitecture,
    JukeboxWeightsError,
    Window,
    plan_windows,
    token_frames,
)
from pipeline.encoders.devices import check_device, claim_gpu, resolve_compute_dtype, resolve_device
from pipeline.encoders.jukebox.layer_cut import _jukebox_modules, estimate_gpu_memory
from pipeline.encoders.jukebox.weights import (
    build_reference_models,
    load_layer_cut,
    load_state_dict_file,
    select_layer_cut_weights,
    write_random_weights,
)
from pipeline.runner import StageConfigError


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
    device, compute = check_device(opts["device"], opts["compute_dtype"], devices_here)
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
