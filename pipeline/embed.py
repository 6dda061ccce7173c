"""The embed stage: one encoder over every clip's audio, one ``.npy`` array per clip.

Input: clip records with ``clip_path`` (the crop stage's 44.1 kHz wavs). Output, all inside the
embeddings directory:

- ``<dataset>/<clip id>.npy``: the clip's encoding, ``[frames, dim]``, in the chosen dtype
  (float16 by default; the encoder computes float32, and a value that float16 cannot hold is an
  error, never an ``inf``), written with numpy's ``.npy`` format, no pickles;
- ``embeddings.jsonl`` (the runner's output, input order): one record per clip, ``{"id",
  "dataset", "split", "embedding_path", "frames", "dim", "dtype", "encoder", "duration_s"}``, and
  ``embeddings.errors.jsonl`` for clips that could not be encoded, with the reason;
- ``encoder.json``: the encoder's name, layer, frame rate, dimension, output dtype, configuration
  and package versions. It is written before any work; a directory whose ``encoder.json``
  describes another encoder configuration is refused, so one directory never mixes two.

The encoder is built once per worker (``Stage.setup``: the Jukebox weights load there), and the
runner gives resume, parallel workers, progress and error records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import TARGET_SAMPLE_RATE, AudioChecks, probe, read_window
from pipeline.encoders import (
    Encoder,
    build_encoder,
    check_encoder_options,
    describe_encoder,
    encoder_manifest,
    manifest_differences,
    read_manifest,
    write_manifest,
)
from pipeline.records import parse_record
from pipeline.runner import ItemError, Stage, StageConfigError

EMBEDDINGS_JSONL = "embeddings.jsonl"


@dataclass(frozen=True)
class EmbedSettings:
    encoder: str
    embeddings_dir: str
    dtype: str = "float16"
    options: dict[str, Any] = field(default_factory=dict)
    checks: AudioChecks = field(default_factory=AudioChecks)


@dataclass
class EmbedState:
    settings: EmbedSettings
    encoder: Encoder


def make_settings(encoder: str, embeddings_dir: str | os.PathLike, dtype: str = "float16",
                  options: dict[str, Any] | None = None, *, devices_here: bool = True) -> EmbedSettings:
    """Settings with the encoder's options checked and completed (fails before any work)."""
    checked = check_encoder_options(encoder, options or {}, devices_here=devices_here)
    return EmbedSettings(encoder=encoder, embeddings_dir=str(Path(embeddings_dir).resolve()), dtype=dtype,
                         options=checked)


def prepare_embeddings_dir(settings: EmbedSettings) -> dict[str, Any]:
    """Write ``encoder.json`` (or check the one there); return the manifest. Raises StageConfigError."""
    manifest = encoder_manifest(describe_encoder(settings.encoder, settings.options), settings.dtype)
    directory = Path(settings.embeddings_dir)
    if (directory / "encoder.json").exists():
        found = read_manifest(directory)
        differences = manifest_differences(manifest, found)
        if differences:
            raise StageConfigError(
                f"--embeddings-dir {directory} holds embeddings of another encoder configuration "
                f"({'; '.join(differences)}); choose another directory, or remove that one"
            )
        return found
    write_manifest(directory, manifest)
    return manifest


def setup_embed(settings: EmbedSettings) -> EmbedState:
    return EmbedState(settings=settings, encoder=build_encoder(settings.encoder, settings.options))


def embedding_path(settings: EmbedSettings, dataset: str, clip_id: str) -> Path:
    return Path(settings.embeddings_dir) / dataset / f"{clip_id}.npy"


def to_output_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast a float32 encoding for storage; NaN/inf, or values beyond float16's range, are errors."""
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ItemError("non_finite_embedding", f"the encoder produced {bad} NaN or infinite values")
    with np.errstate(over="ignore"):
        out = array.astype(dtype)
    if not np.isfinite(out).all():
        peak = float(np.abs(array).max())
        raise ItemError("dtype_overflow", f"values up to {peak:.4g} do not fit in {dtype}; embed with --dtype float32")
    return np.ascontiguousarray(out)


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename: a reader never sees half an array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


def embed_item(row: dict, state: EmbedState) -> dict:
    """Per-item function of the embed stage: one clip record → its ``.npy`` and an embedding record."""
    settings, encoder = state.settings, state.encoder
    record = parse_record(row)
    if not record.clip_path:
        raise ItemError("no_clip", "the record has no clip_path; run `llark crop` on it first")
    info = probe(record.clip_path, settings.checks)
    audio = read_window(info, 0.0, info.duration_s, target_sample_rate=TARGET_SAMPLE_RATE, checks=settings.checks)
    try:
        encoding = encoder.encode_batch([(audio, TARGET_SAMPLE_RATE)])[0]
    except ValueError as exc:
        raise ItemError("encoder_refused", str(exc)) from None
    if encoding.ndim != 2 or encoding.shape[1] != encoder.dim or encoding.shape[0] < 1:
        raise ItemError("bad_shape", f"the encoder returned shape {encoding.shape}, expected [frames, {encoder.dim}]")
    array = to_output_dtype(encoding, settings.dtype)
    path = embedding_path(settings, record.dataset, record.id)
    save_npy(path, array)
    return {
        "id": record.id,
        "dataset": record.dataset,
        "split": record.split,
        "embedding_path": str(path),
        "frames": int(array.shape[0]),
        "dim": int(array.shape[1]),
        "dtype": settings.dtype,
        "encoder": encoder.name,
        "duration_s": round(len(audio) / TARGET_SAMPLE_RATE, 6),
    }


def embed_stage(settings: EmbedSettings) -> Stage:
    return Stage(name="embed", process=embed_item, settings=settings, setup=setup_embed)
