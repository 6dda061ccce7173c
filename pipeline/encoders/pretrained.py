"""What the encoders loaded from a Hugging Face directory share (``mert``, ``whisper``, ``clap``).

Each of them reads a local directory in the layout its publisher released (``config.json``,
``preprocessor_config.json``, ``model.safetensors`` or ``pytorch_model.bin``, possibly sharded),
builds the model with transformers' own modules (never ``trust_remote_code``), and turns a clip
into frames the same way:

1. the clip (the crop stage's 44.1 kHz wav) is mixed to mono and resampled (soxr, HQ) to the
   encoder's rate; its level is left as recorded (the encoders' own feature extractors normalise
   what they need);
2. it is cut into consecutive windows of the encoder's length (MERT 5 s by default, Whisper 30 s,
   CLAP 10 s); the last one holds what is left and is padded as the encoder wants, and the frames
   that start past the audio's end are dropped;
3. every hidden state the model returns for a window is kept (``[states, frames, dim]``), the
   windows' frames are concatenated in time, and ``--layers`` picks one state (``6``), the mean of
   a range (``6-12``), or all of them (``all``: stored ``[states, frames, dim]``);
4. frames are mean-pooled to ``--frame-rate`` (10 Hz by default, as the paper): output frame ``k``
   holds the encoder frames that start in ``[k / rate, (k + 1) / rate)`` s, so a 25 s clip gives
   250 frames; ``native`` keeps the encoder's own frames.

Hidden-state numbering is the library's: state 0 is the input to the first transformer layer and
state ``n`` the output of layer ``n`` (MERT-v1-330M has 25 states, "all 25 layers").

A window's padding never depends on the other windows it is batched with: windows are batched
only with windows of the same length (every full window; a clip's last, shorter window goes with
last windows of the same length), so the arrays of a clip are the same at any ``--batch-size``
up to float rounding (batched matrix products may round differently: under 1e-6 on CPU for the
tiny MERT stand-in, bit-identical for Whisper's; more in bfloat16 on a GPU).

The checkpoint's identity recorded in ``encoder.json`` is a hash of its configuration files and
its weights' file names and sizes: embeddings from another checkpoint, or another copy that
differs, are refused downstream. The precision the model ran in is not part of it: frames
computed in bfloat16 on a GPU and in float32 on CPU (``llark ask``) are the same frames to a
projector, within rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.encoders import prepare_audio
from pipeline.encoders.devices import check_device, claim_gpu
from pipeline.runner import StageConfigError

CONFIG_FILES = ("config.json", "preprocessor_config.json")
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin")
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_FRAME_RATE_HZ = 10.0
PACKAGES = ("torch", "transformers", "soxr", "safetensors")


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class LayerChoice:
    """Hidden states ``first``..``last`` (inclusive): one (``first == last``), their mean, or all kept."""

    first: int
    last: int
    keep_all: bool = False

    @property
    def manifest_value(self) -> int | str:
        """How ``encoder.json`` names it: ``6``, ``"6-12"`` or ``"all"``."""
        if self.keep_all:
            return "all"
        return self.first if self.first == self.last else f"{self.first}-{self.last}"

    def relative(self) -> "LayerChoice":
        """The same choice over states that start at ``first`` (what :class:`WindowModel` returns)."""
        return LayerChoice(0, self.last - self.first, self.keep_all)

    def apply(self, states: np.ndarray) -> np.ndarray:
        """``[states, frames, dim]`` → ``[frames, dim]`` (one state or a mean), or all states kept."""
        if self.keep_all:
            return states
        if self.first == self.last:
            return states[self.first]
        return states[self.first : self.last + 1].mean(axis=0, dtype=np.float64).astype(np.float32)


def parse_layers(value: Any, states: int) -> LayerChoice:
    """``--layers``: ``L``, ``A-B``, ``all``, ``mean`` (every state averaged) or ``last``, for a model
    with ``states`` hidden states (numbered 0 .. states - 1); raises naming ``--layers``."""
    text = str(value).strip().lower()
    top = states - 1
    if text == "all":
        return LayerChoice(0, top, keep_all=True)
    if text == "mean":
        return LayerChoice(0, top)
    if text == "last":
        return LayerChoice(top, top)
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not match:
        raise StageConfigError(f"--layers: expected L, A-B, all, mean or last, got {value!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if not 0 <= first <= last <= top:
        raise StageConfigError(f"--layers {value}: this checkpoint has hidden states 0-{top} (0 is the input to "
                               f"the first layer), and a range must go upwards")
    return LayerChoice(first, last)


def parse_frame_rate(value: Any, native_rate_hz: float) -> float | None:
    """``--frame-rate``: a rate in Hz at most the encoder's own, or ``native`` (returned as None)."""
    if value is None:
        return DEFAULT_FRAME_RATE_HZ if native_rate_hz >= DEFAULT_FRAME_RATE_HZ else None
    if str(value).strip().lower() == "native":
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise StageConfigError(f"--frame-rate: a number of frames per second or 'native', got {value!r}") from None
    if not 0 < rate <= native_rate_hz + 1e-9:
        raise StageConfigError(f"--frame-rate {value}: must be above 0 and at most the encoder's own "
                               f"{native_rate_hz:g} Hz (pooling cannot add frames); 'native' keeps its frames")
    return None if math.isclose(rate, native_rate_hz) else rate


# ---------------------------------------------------------------------------------------------
# Windows and frames


def plan_windows(n_samples: int, window_samples: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, length)`` windows covering ``n_samples``; the last holds what is left."""
    if n_samples < 1:
        raise ValueError("the clip holds no samples")
    return [(start, min(window_samples, n_samples - start)) for start in range(0, n_samples, window_samples)]


def pool_frames(frames: np.ndarray, starts_s: np.ndarray, rate_hz: float | None) -> np.ndarray:
    """Mean-pool ``frames`` (time on axis -2) by their start times into ``rate_hz`` buckets; frame ``k``
    holds the frames that start in ``[k / rate, (k + 1) / rate)`` s. ``None`` keeps them as they are."""
    if rate_hz is None:
        return np.ascontiguousarray(frames, dtype=np.float32)
    # A start time a rounding error below a bucket's edge belongs to that bucket (7 / 75 s at 75 Hz).
    bucket = np.floor(np.asarray(starts_s, dtype=np.float64) * rate_hz + 1e-6).astype(np.int64)
    count = int(bucket[-1]) + 1
    moved = np.moveaxis(np.asarray(frames, dtype=np.float64), -2, 0)
    sums = np.zeros((count, *moved.shape[1:]), dtype=np.float64)
    np.add.at(sums, bucket, moved)
    held = np.bincount(bucket, minlength=count).astype(np.float64)
    # Every bucket up to the last holds a frame when the encoder's rate is at least ``rate_hz``.
    pooled = sums / held.reshape(-1, *([1] * (sums.ndim - 1)))
    return np.ascontiguousarray(np.moveaxis(pooled, 0, -2), dtype=np.float32)


def pooled_frame_count(duration_s: float, native_rate_hz: float, rate_hz: float | None) -> int:
    """Frames a clip of ``duration_s`` gets (for storage estimates: about ``duration × rate``)."""
    return max(1, math.ceil(duration_s * (rate_hz or native_rate_hz)))


# ---------------------------------------------------------------------------------------------
# The checkpoint directory


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors if there are any, else PyTorch ``.bin`` files."""
    for patterns in (WEIGHT_PATTERNS[:2], WEIGHT_PATTERNS[2:]):
        found = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
        if found:
            return found
    return []


def missing_files_message(encoder: str, what: str, directory: Path) -> str:
    return (f"--weights-dir: the {encoder} encoder needs {what} in its published Hugging Face layout "
            f"(config.json, preprocessor_config.json and model.safetensors or pytorch_model.bin), and {directory} "
            f"{'lacks some of them' if directory.is_dir() else 'does not exist'}. Put a local copy of the checkpoint "
            "there, or give the directory that holds it with --weights-dir. Nothing is downloaded.")


def check_checkpoint_dir(encoder: str, what: str, value: Any) -> Path:
    """The resolved checkpoint directory; raises naming ``--weights-dir`` when files are missing."""
    if value is None:
        raise StageConfigError(missing_files_message(encoder, what, Path("(none given)")))
    directory = Path(value).expanduser()
    if not (directory / "config.json").is_file() or not weight_files(directory):
        raise StageConfigError(missing_files_message(encoder, what, directory))
    return directory.resolve()


def read_json_file(path: Path, field: str = "--weights-dir") -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageConfigError(f"{field}: {path} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StageConfigError(f"{field}: {path} does not hold a JSON object")
    return value


def checkpoint_identity(directory: Path) -> dict[str, Any]:
    """A hash of the configuration files' bytes and of the weights' file names and sizes."""
    digest = hashlib.sha256()
    configs = {}
    for name in CONFIG_FILES:
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            configs[name] = hashlib.sha256(data).hexdigest()
            digest.update(name.encode() + b"\0" + data + b"\0")
    weights = {p.name: p.stat().st_size for p in weight_files(directory)}
    digest.update(json.dumps(weights, sort_keys=True).encode())
    return {"sha256": digest.hexdigest(), "config_sha256": configs, "weights": weights}


def read_state_dict(directory: Path, rename: Callable[[str], str | None]) -> dict[str, Any]:
    """The checkpoint's tensors, keyed by ``rename(key)``; keys it maps to None are not read.

    safetensors files are read lazily (only the tensors kept); ``.bin`` files with
    ``torch.load(weights_only=True)`` (tensors and plain containers only: nothing in them runs code).
    """
    import torch

    tensors: dict[str, Any] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    name = rename(key)
                    if name is not None:
                        tensors[name] = handle.get_tensor(key)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise StageConfigError(f"--weights-dir: {path} is not a PyTorch state dict this loader can read "
                                       f"safely ({type(exc).__name__}: {exc})") from None
            for key, value in state.items():
                name = rename(key)
                if name is not None:
                    tensors[name] = value
    return tensors


def load_weights(model, tensors: dict[str, Any], directory: Path, optional: tuple[str, ...] = ()) -> None:
    """Copy ``tensors`` into ``model``; refuse (naming the directory) weights that are missing, left
    over, or of another shape, so nothing is ever left at its random initialisation."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in tensors and not k.endswith(optional))
    unexpected = sorted(k for k in tensors if k not in expected)
    wrong = sorted(k for k in tensors if k in expected and tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        def some(keys):
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        problems = [f"missing {some(missing)}" if missing else "", f"not in the model {some(unexpected)}" if unexpected
                    else "", f"of another shape {some(wrong)}" if wrong else ""]
        raise StageConfigError(f"--weights-dir {directory}: the weights do not match the configuration "
                               f"({'; '.join(p for p in problems if p)})")
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------
# Options shared by the three encoders


COMMON_OPTIONS = {"weights_dir": None, "layers": None, "frame_rate": None, "device": "auto",
                  "compute_dtype": "auto", "batch_windows": 8}


def check_common_options(name: str, options: dict[str, Any], defaults: dict[str, Any],
                         devices_here: bool) -> dict[str, Any]:
    """Unknown options, device and precision checked; the encoder's own defaults filled in."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise StageConfigError(f"{flags}: not an option of the {name} encoder")
    opts = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    if int(opts["batch_windows"]) < 1:
        raise StageConfigError(f"--batch-windows must be at least 1, got {opts['batch_windows']}")
    if opts["compute_dtype"] not in COMPUTE_DTYPES:
        raise StageConfigError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    device, compute = check_device(opts["device"], opts["compute_dtype"], devices_here)
    if device == "cpu" and compute != "float32":
        raise StageConfigError(f"--compute-dtype {compute}: on CPU the encoders run in float32")
    return {**opts, "batch_windows": int(opts["batch_windows"]), "device": device, "compute_dtype": compute}


def model_device(options: dict[str, Any]) -> str:
    """The device a worker's model goes to: ``cuda`` gives each worker a GPU of its own."""
    return claim_gpu() if options["device"] == "cuda" else options["device"]


def load_for_build(options: dict[str, Any], describe, load_model) -> tuple[Path, dict[str, Any], str, Any]:
    """What every encoder's ``build`` starts from: its checkpoint directory, its description, the
    worker's device and the model loaded onto it."""
    directory, description = Path(options["weights_dir"]), describe(options)
    device = model_device(options)
    return directory, description, device, load_model(directory, device, options["compute_dtype"])


# ---------------------------------------------------------------------------------------------
# The encoder


@dataclass
class WindowModel:
    """What differs between the encoders: how a batch of same-length windows becomes hidden states."""

    sample_rate: int
    window_samples: int
    frame_period_s: float
    # (windows [batch, samples] float32 at sample_rate, first, last, frames) -> hidden states first..last of
    # each window's first ``frames`` frames, [batch, last - first + 1, frames, dim] (cut on the device,
    # so a batch of Whisper large-v3 windows never copies 33 states of 1500 frames when one is kept)
    hidden_states: Callable[[np.ndarray, int, int, int], np.ndarray]
    # valid samples in a window -> how many of its frames start inside the audio
    valid_frames: Callable[[int], int]
    # a window shorter than this many samples is zero-padded to it (the model's minimum input)
    min_samples: int = 1


@dataclass
class PretrainedEncoder:
    """Encodes clips window by window with a :class:`WindowModel`; see the module docstring."""

    name: str
    dim: int
    layer: int | str
    window_model: WindowModel
    layers: LayerChoice
    rate_hz: float | None
    native_rate_hz: float
    batch_windows: int
    description: dict[str, Any]

    @property
    def frame_rate_hz(self) -> float:
        return self.rate_hz or self.native_rate_hz

    def config(self) -> dict[str, Any]:
        return self.description["config"]

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray:
        return self.encode_batch([(audio, sr)])[0]

    def encode_batch(self, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        wm = self.window_model
        jobs = []  # (clip index, window index, start, length)
        per_clip: list[list[np.ndarray | None]] = []
        samples = []
        for index, (audio, sr) in enumerate(clips):
            x = prepare_audio(audio, sr, wm.sample_rate, peak_normalise=False)
            windows = plan_windows(len(x), wm.window_samples)
            samples.append(x)
            per_clip.append([None] * len(windows))
            jobs += [(index, w, start, length) for w, (start, length) in enumerate(windows)]
        by_length: dict[int, list] = {}
        for job in jobs:
            by_length.setdefault(job[3], []).append(job)
        for length, group in sorted(by_length.items(), reverse=True):
            padded = max(length, wm.min_samples)
            for first in range(0, len(group), self.batch_windows):
                batch = group[first : first + self.batch_windows]
                stacked = np.zeros((len(batch), padded), dtype=np.float32)
                for row, (index, _, start, n) in enumerate(batch):
                    stacked[row, :n] = samples[index][start : start + n]
                keep = wm.valid_frames(length)
                states = np.asarray(wm.hidden_states(stacked, self.layers.first, self.layers.last, keep),
                                    dtype=np.float32)
                if keep < 1 or states.shape[2] != keep:
                    raise ValueError(f"a window of {length} samples gave {states.shape[2]} frames, expected {keep}")
                for row, (index, w, _, _) in enumerate(batch):
                    per_clip[index][w] = self.layers.relative().apply(states[row])
        out = []
        for index, parts in enumerate(per_clip):
            starts = np.concatenate([w * wm.window_samples / wm.sample_rate + np.arange(p.shape[-2]) * wm.frame_period_s
                                     for w, p in enumerate(parts)])
            out.append(pool_frames(np.concatenate(parts, axis=-2), starts, self.rate_hz))
        return out


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_module(module_class, config, directory: Path, rename: Callable[[str], str | None], device: str,
                compute_dtype: str, optional: tuple[str, ...] = (), computed: Callable | None = None):
    """``module_class(config)`` built on the meta device (no random initialisation of a large model),
    given the checkpoint's tensors, in eval mode on ``device`` and ``compute_dtype``. ``computed(model)``
    gives the buffers a model computes rather than learns (index tables), used where the checkpoint
    lacks them: after ``to_empty`` anything not loaded would be uninitialised memory."""
    import torch

    with torch.device("meta"):
        model = module_class(config)
    model.to_empty(device="cpu")
    tensors = read_state_dict(directory, rename)
    for key, value in (computed(model) if computed else {}).items():
        tensors.setdefault(key, value)
    load_weights(model, tensors, directory, optional=optional)
    return model.to(device=device, dtype=torch_dtype(compute_dtype)).eval()


def stacked_states(states, first: int, last: int, frames: int) -> np.ndarray:
    """A model's tuple of hidden states ``[batch, frames, dim]`` → states ``first..last`` of the first
    ``frames`` frames as float32 numpy ``[batch, states, frames, dim]`` (cut before leaving the device)."""
    import torch

    return torch.stack(states[first : last + 1], dim=1)[:, :, :frames].float().cpu().numpy()


def make_encoder(options: dict[str, Any], description: dict[str, Any], window_model: WindowModel) -> PretrainedEncoder:
    """The encoder of checked ``options`` over ``window_model``, as ``description`` describes it."""
    layers = parse_layers(options["layers"], description["config"]["hidden_states"])
    return PretrainedEncoder(
        name=description["name"], dim=description["dim"], layer=layers.manifest_value, window_model=window_model,
        layers=layers, rate_hz=None if options["frame_rate"] == "native" else float(options["frame_rate"]),
        native_rate_hz=description["config"]["native_frame_rate_hz"], batch_windows=options["batch_windows"],
        description=description,
    )
