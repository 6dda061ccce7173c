"""Audio encoders: clip audio → a frame-level array ``[frames, dim]``, selected by name.

Every encoder has a ``name``, an output dimension ``dim``, a frame rate ``frame_rate_hz``, the
transformer ``layer`` it reads (``None`` when that means nothing), and
``encode(audio, sr) -> float32 array [frames, dim]``. ``encode_batch`` encodes several clips at
once where the encoder can batch (Jukebox); otherwise it encodes them one after another.
``config()`` returns what, besides the name, layer, rate and dimension, decides the numbers it
produces; it is written into ``encoder.json``.

================  =====  ========  ==========================================================
name              dim    rate      what it is
================  =====  ========  ==========================================================
``features``      128    10 Hz     log-mel bands, chroma, onset strength and a tempogram; no
                                   weights, numpy/scipy only (the embedded default)
``jukebox``       4800   10 Hz     Jukebox-5B's top prior cut after layer 36, mean-pooled in
                                   100 ms windows (the paper's encoder); needs its weights
``mert``          768 /  75 Hz     MERT-v1-95M / 330M (HuBERT modules), 5 s windows at 24 kHz;
                  1024   (10)      ``--layers`` one state, a mean, or all 13 / 25 kept
``whisper``       384 -  50 Hz     Whisper's encoder (tiny ... large-v3), 30 s windows at
                  1280   (10)      16 kHz; frames past the audio's end dropped
``clap``          768 /  3.2 Hz    LAION CLAP's HTSAT audio tower, time-resolved, 10 s windows
                  1024             at 48 kHz (1024 for the larger_clap checkpoints)
================  =====  ========  ==========================================================

The three Hugging Face encoders (``pipeline.encoders.pretrained``) read a local checkpoint in
its published layout and pool to ``--frame-rate`` (10 Hz by default where the encoder is faster;
in brackets above). With ``--layers all`` the arrays are ``[states, frames, dim]``
(:func:`stored_states` says how many states), for a connector that learns its own mix of layers.

``encoder.json`` (see :func:`encoder_manifest`) sits beside the embeddings and beside the shards so
that a consumer can refuse arrays that came from another encoder, layer, rate, dimension or dtype.
"""

from __future__ import annotations

import importlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from pipeline.contracts import ENCODER_JSON
from pipeline.files import write_json
from pipeline.runner import StageConfigError

ENCODER_MODULES = {
    "features": "pipeline.encoders.features",
    "jukebox": "pipeline.encoders.jukebox",
    "mert": "pipeline.encoders.mert",
    "whisper": "pipeline.encoders.whisper",
    "clap": "pipeline.encoders.clap",
}
MANIFEST_VERSION = 1
# The fields a consumer must agree on; package versions are recorded but only informative.
IDENTITY_FIELDS = ("name", "layer", "frame_rate_hz", "dim", "dtype", "config")
OUTPUT_DTYPES = ("float16", "float32")


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int
    frame_rate_hz: float
    layer: int | None

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray: ...

    def encode_batch(self, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]: ...

    def config(self) -> dict[str, Any]: ...


def encoder_module(name: str):
    """The module that implements encoder ``name``; an unknown name fails naming ``--encoder``."""
    if name not in ENCODER_MODULES:
        raise StageConfigError(
            f"--encoder: unknown encoder {name!r} (choose from {', '.join(sorted(ENCODER_MODULES))})"
        )
    return importlib.import_module(ENCODER_MODULES[name])


def check_encoder_options(name: str, options: dict[str, Any], *, devices_here: bool = True) -> dict[str, Any]:
    """Validate an encoder's options before any work; return them completed with defaults.

    Raises ``StageConfigError`` naming the command-line option at fault (an unknown encoder, a
    missing weights directory or file, a device that is not there, ...). ``devices_here=False``
    when the workers run on other machines (Ray): their devices cannot be checked from here.
    """
    return encoder_module(name).check_options(dict(options), devices_here=devices_here)


def build_encoder(name: str, options: dict[str, Any]) -> Encoder:
    """Build encoder ``name`` (load its model, if any) from options that passed the check."""
    return encoder_module(name).build(dict(options))


def describe_encoder(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``name``, ``layer``, ``frame_rate_hz``, ``dim``, ``config`` and the names of the packages whose
    versions matter (``packages``), without loading any model."""
    return encoder_module(name).describe(dict(options))


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def encoder_manifest(description: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The content of ``encoder.json`` for embeddings written in ``dtype`` by the described encoder."""
    if dtype not in OUTPUT_DTYPES:
        raise StageConfigError(f"--dtype: must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": description["name"],
        "layer": description["layer"],
        "frame_rate_hz": description["frame_rate_hz"],
        "dim": description["dim"],
        "dtype": dtype,
        "config": description["config"],
        "packages": package_versions(("llark", "numpy", *description.get("packages", ()))),
    }


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read an ``encoder.json`` (a file, or the directory holding one); raise naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER_JSON
    if not path.is_file():
        raise StageConfigError(f"{path} does not exist: embeddings and shards carry an {ENCODER_JSON}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageConfigError(f"{path} is not readable JSON: {exc}") from None
    missing = [k for k in IDENTITY_FIELDS if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        raise StageConfigError(f"{path} is not an encoder manifest (missing {', '.join(missing)})")
    if manifest["dtype"] not in OUTPUT_DTYPES or not isinstance(manifest["dim"], int) or manifest["dim"] < 1:
        raise StageConfigError(f"{path}: dtype must be one of {OUTPUT_DTYPES} and dim a positive integer")
    return manifest


class EncoderDifference(NamedTuple):
    """One identity field on which two encoder descriptions disagree."""

    field: str
    expected: Any
    found: Any

    def __str__(self) -> str:
        return f"{self.field}: {json.dumps(self.expected, sort_keys=True)} != {json.dumps(self.found, sort_keys=True)}"


# What a projector cares about: frames stored as float16 or float32 are the same frames to it.
FRAME_FIELDS = tuple(k for k in IDENTITY_FIELDS if k != "dtype")


def manifest_differences(expected: dict[str, Any], found: dict[str, Any],
                         fields: tuple[str, ...] = IDENTITY_FIELDS) -> list[EncoderDifference]:
    """The identity ``fields`` on which two encoder descriptions (``encoder.json``, or a model's
    record of what it was trained on) disagree, in ``IDENTITY_FIELDS`` order."""
    return [EncoderDifference(key, expected.get(key), found.get(key)) for key in fields
            if expected.get(key) != found.get(key)]


def describe_differences(differences: list[EncoderDifference]) -> str:
    """``field: a != b; ...`` for an error message."""
    return "; ".join(map(str, differences))


def stored_states(manifest: dict[str, Any]) -> int | None:
    """How many hidden states each stored array holds (``[states, frames, dim]``) when the
    embeddings keep every layer (``layer: "all"``); None for ``[frames, dim]`` arrays."""
    if manifest.get("layer") != "all":
        return None
    return int(manifest["config"]["hidden_states"])


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``encoder.json`` into ``directory`` atomically; return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_json(directory / ENCODER_JSON, manifest, sort_keys=True)


def prepare_audio(audio: np.ndarray, sr: int, target_sr: int = 44_100, peak_normalise: bool = True) -> np.ndarray:
    """Mono float32 at ``target_sr``, peak-normalised unless told otherwise; raises ValueError on empty
    or non-finite audio."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64).astype(np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty mono (or [samples, channels]) array, got shape {np.shape(audio)}")
    if not np.isfinite(x).all():
        raise ValueError("the audio holds NaN or infinite samples")
    if sr != target_sr:
        import soxr

        x = soxr.resample(x, sr, target_sr, quality="HQ").astype(np.float32)
    peak = float(np.max(np.abs(x)))
    return x / peak if peak > 0 and peak_normalise else x
