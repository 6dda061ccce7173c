"""The embed stage: one encoder over every clip's audio, one ``.npy`` array per clip.

Input: clip records with ``clip_path`` (the crop stage's 44.1 kHz wavs). Output, all inside the
embeddings directory:

- ``<dataset>/<clip id>.npy``: the clip's encoding, ``[frames, dim]`` (``[states, frames, dim]``
  with ``--layers all``), in the chosen dtype
  (float16 by default; the encoder computes float32, and a value that float16 cannot hold is an
  error, never an ``inf``), written with numpy's ``.npy`` format, no pickles;
- ``embeddings.jsonl`` (the runner's output, input order): one record per clip, ``{"id",
  "dataset", "split", "embedding_path", "frames", "dim", "dtype", "encoder", "duration_s"}``, and
  ``embeddings.errors.jsonl`` for clips that could not be encoded, with the reason;
- ``encoder.json``: the encoder's name, layer, frame rate, dimension, output dtype, configuration
  and package versions. It is written before any work; a directory whose ``encoder.json``
  describes another encoder configuration is refused, so one directory never mixes two.

The encoder is built once per worker (``Stage.setup``: the Jukebox weights load there), and the
runner gives resume, parallel workers, progress and error records. With ``batch_size`` > 1 the
runner hands a worker that many clips at once (``embed_batch``): each is read alone, and the
readable ones go through one ``encode_batch`` call (Jukebox stacks their context windows into
shared forward passes). If that call fails as a whole (a clip the encoder refuses, the GPU out of
memory), the runner encodes the batch's clips one at a time, so only a clip at fault fails.
Batching does not change the arrays: the same clips give byte-identical ``.npy`` files whatever
the batch size, on CPU (on a GPU, batched matrix products may round differently).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
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
    describe_differences,
    manifest_differences,
    read_manifest,
    stored_states,
    write_manifest,
)
from pipeline.contracts import EMBEDDINGS_JSONL, ENCODER_JSON
from pipeline.files import atomic_write
from pipeline.records import ClipRecord, parse_record
from pipeline.runner import ItemError, Stage, StageConfigError



# Encoder options that decide how work is grouped, not what is computed: a rerun may change them.
SCHEDULING_OPTIONS = ("batch_windows",)


@dataclass(frozen=True)
class EmbedSettings:
    encoder: str
    embeddings_dir: str
    dtype: str = "float16"
    options: dict[str, Any] = field(default_factory=dict)
    checks: AudioChecks = field(default_factory=AudioChecks)

    def ledger_json(self) -> dict[str, Any]:
        """The settings the ledger records: all but the scheduling options."""
        recorded = json.loads(json.dumps(asdict(self), default=str))
        recorded["options"] = {k: v for k, v in recorded["options"].items() if k not in SCHEDULING_OPTIONS}
        return recorded


@dataclass
class EmbedState:
    settings: EmbedSettings
    encoder: Encoder
    states: int | None = None  # hidden states per array when every layer is kept


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
    if (directory / ENCODER_JSON).exists():
        found = read_manifest(directory)
        differences = manifest_differences(manifest, found)
        if differences:
            raise StageConfigError(
                f"--embeddings-dir {directory} holds embeddings of another encoder configuration "
                f"({describe_differences(differences)}); choose another directory, or remove that one"
            )
        return found
    write_manifest(directory, manifest)
    return manifest


def storage_estimate(manifest: dict[str, Any], durations: list[float]) -> dict[str, Any]:
    """What the embeddings of clips of ``durations`` seconds will take on disk: ``per_clip`` (bytes, at
    the median duration) and ``total``, from the frame rate, dimension, stored states and dtype
    (.npy headers of 128 bytes included)."""
    states = stored_states(manifest) or 1
    per_second = manifest["frame_rate_hz"] * manifest["dim"] * states * np.dtype(manifest["dtype"]).itemsize

    def size(seconds: float) -> int:
        frames = max(1, int(np.ceil(seconds * manifest["frame_rate_hz"] - 1e-9)))
        return 128 + frames * manifest["dim"] * states * np.dtype(manifest["dtype"]).itemsize

    median = float(np.median(durations)) if durations else 0.0
    return {"clips": len(durations), "median_s": median, "per_clip": size(median) if durations else 0,
            "total": sum(size(d) for d in durations), "per_second": per_second, "states": states}


def setup_embed(settings: EmbedSettings) -> EmbedState:
    description = describe_encoder(settings.encoder, settings.options)
    return EmbedState(settings=settings, encoder=build_encoder(settings.encoder, settings.options),
                      states=stored_states(description))


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
    with atomic_write(path) as fh:
        np.save(fh, array, allow_pickle=False)


def read_clip(row: dict, settings: EmbedSettings) -> tuple[ClipRecord, np.ndarray]:
    """The clip record and its audio at 44.1 kHz (ItemError when there is no usable clip)."""
    record = parse_record(row)
    if not record.clip_path:
        raise ItemError("no_clip", "the record has no clip_path; run `llark crop` on it first")
    info = probe(record.clip_path, settings.checks)
    audio = read_window(info, 0.0, info.duration_s, target_sample_rate=TARGET_SAMPLE_RATE, checks=settings.checks)
    return record, audio


def save_encoding(record: ClipRecord, audio: np.ndarray, encoding: np.ndarray, state: EmbedState) -> dict:
    """Check and store one clip's encoding; return its embedding record."""
    settings, encoder = state.settings, state.encoder
    states = state.states
    expected = (states, encoder.dim) if states else (encoder.dim,)
    if encoding.shape[:-2] != expected[:-1] or encoding.shape[-1] != encoder.dim or encoding.ndim != len(expected) + 1 \
            or encoding.shape[-2] < 1:
        shape = f"[{states}, frames, {encoder.dim}]" if states else f"[frames, {encoder.dim}]"
        raise ItemError("bad_shape", f"the encoder returned shape {encoding.shape}, expected {shape}")
    array = to_output_dtype(encoding, settings.dtype)
    path = embedding_path(settings, record.dataset, record.id)
    save_npy(path, array)
    return {
        "id": record.id,
        "dataset": record.dataset,
        "split": record.split,
        "embedding_path": str(path),
        "frames": int(array.shape[-2]),
        "dim": int(array.shape[-1]),
        "dtype": settings.dtype,
        "encoder": encoder.name,
        "duration_s": round(len(audio) / TARGET_SAMPLE_RATE, 6),
    }


def embed_item(row: dict, state: EmbedState) -> dict:
    """Per-item function of the embed stage: one clip record → its ``.npy`` and an embedding record."""
    record, audio = read_clip(row, state.settings)
    try:
        encoding = state.encoder.encode_batch([(audio, TARGET_SAMPLE_RATE)])[0]
    except ValueError as exc:
        raise ItemError("encoder_refused", str(exc)) from None
    return save_encoding(record, audio, encoding, state)


def embed_batch(rows: list[dict], state: EmbedState) -> list[dict | Exception]:
    """Batch function of the embed stage: the clips that can be read are encoded in one
    ``encode_batch`` call; a clip that cannot be read or stored is that row's error. An encoder
    failure is raised, and the runner then embeds the rows one at a time."""
    results: list[dict | Exception | None] = [None] * len(rows)
    loaded = []
    for position, row in enumerate(rows):
        try:
            loaded.append((position, *read_clip(row, state.settings)))
        except Exception as exc:
            results[position] = exc
    if loaded:
        encodings = state.encoder.encode_batch([(audio, TARGET_SAMPLE_RATE) for _, _, audio in loaded])
        for (position, record, audio), encoding in zip(loaded, encodings, strict=True):
            try:
                results[position] = save_encoding(record, audio, encoding, state)
            except Exception as exc:
                results[position] = exc
    return results


def embed_stage(settings: EmbedSettings, batch_size: int = 1) -> Stage:
    return Stage(name="embed", process=embed_item, settings=settings, setup=setup_embed,
                 process_batch=embed_batch, batch_size=batch_size)
