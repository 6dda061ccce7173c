"""Shards of several encoders: every sample carries one array per encoder.

``llark shards --embeddings DIR_A --embeddings DIR_B`` (or ``NAME=DIR``) joins each clip with its
embedding in every directory. Each encoder has a name, the part of the member name before ``.npy``:
the directory's encoder name (``features``, ``mert``, ...) unless given as ``NAME=DIR``, which
two directories of one encoder (two MERT layers, ``mert6=DIR --embeddings mert12=DIR``) need.
Names are letters, digits and ``_``.

A sample is ``<key>.<name>.npy`` for each encoder, in the order given, then ``<key>.json``, whose
``encodings`` holds each encoder's ``{encoder, layer, frame_rate_hz, frames, dim, dtype}`` by name
(instead of the single-encoder ``encoding``). The shards directory's ``encoder.json`` is
``{"manifest_version", "encoders": {name: <that directory's own encoder.json>}}`` (by name) and
``index.json`` has ``encoders`` in place of ``encoder``. The shard names carry the names joined by
``_`` (``llark-train-understanding-demo-features_mert-000000.tar``).

A clip is joined only when every directory has it; the encoders of one clip must give the same
duration (``frames / frame_rate_hz``) within one frame of the coarsest one, else the clip is left
out as ``duration_mismatch``. A single directory writes the single-encoder layout (``<key>.npy``),
byte for byte as before.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.contracts import ENCODER_JSON
from pipeline.encoders import (IDENTITY_FIELDS, MANIFEST_VERSION, describe_differences, manifest_differences,
                               read_manifest, stored_states)
from pipeline.runner import StageConfigError

ENCODER_NAME = re.compile(r"^[A-Za-z0-9_]+$")
DURATION_MISMATCH = "duration_mismatch"
INDEX_FIELDS = ("name", "layer", "frame_rate_hz", "dim", "dtype")


@dataclass(frozen=True)
class EmbeddingSource:
    name: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def member(self) -> str:
        return f"{self.name}.npy"


def parse_embeddings_option(value: str | os.PathLike) -> tuple[str | None, Path]:
    """``DIR`` or ``NAME=DIR`` (a name only where the part before ``=`` is one and the whole is no directory)."""
    text = str(value)
    name, sep, rest = text.partition("=")
    if sep and ENCODER_NAME.match(name) and not Path(text).is_dir():
        return name, Path(rest)
    return None, Path(text)


def embedding_sources(values: list) -> list[EmbeddingSource]:
    """The ``--embeddings`` values as named sources, each directory's ``encoder.json`` read; two with
    one name (one encoder twice, unnamed) are refused before any work."""
    sources, seen = [], {}
    for value in values:
        name, directory = parse_embeddings_option(value) if not isinstance(value, tuple) else value
        if not directory.is_dir():
            raise StageConfigError(f"--embeddings: {directory} is not a directory (the embed stage's --embeddings-dir)")
        manifest = read_manifest(directory)
        name = name or manifest["name"]
        if not ENCODER_NAME.match(name):
            raise StageConfigError(f"--embeddings: encoder name {name!r} must be letters, digits and '_' "
                                   "(give one as NAME=DIR)")
        if name in seen:
            raise StageConfigError(f"--embeddings: {seen[name]} and {directory} are both named {name!r}; name them "
                                   f"apart as NAME=DIR (e.g. --embeddings {name}_a={seen[name]} --embeddings "
                                   f"{name}_b={directory})")
        seen[name] = directory
        sources.append(EmbeddingSource(name, directory, manifest))
    return sources


def resolve_embeddings(value) -> tuple[Path, list[EmbeddingSource] | None]:
    """``--embeddings``: one directory (the single-encoder layout), or several (their sources)."""
    if not isinstance(value, (list, tuple)):
        return Path(value), None
    if not value:
        raise StageConfigError("--embeddings: give at least one embeddings directory")
    if len(value) == 1:
        return parse_embeddings_option(value[0])[1], None
    sources = embedding_sources(list(value))
    return sources[0].directory, sources


def multi_manifest(sources: list[EmbeddingSource]) -> dict[str, Any]:
    return multi_manifest_of({s.name: s.manifest for s in sources})


def multi_manifest_of(encoders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"manifest_version": MANIFEST_VERSION, "encoders": encoders}


def is_multi(manifest: dict[str, Any]) -> bool:
    return "encoders" in manifest and "name" not in manifest


def read_shard_encoders(directory: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """``{name: manifest}`` of a shards directory of several encoders, in their order; None for a
    single-encoder one. Raises StageConfigError naming what is wrong."""
    import json

    path = Path(directory) / ENCODER_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        read_manifest(directory)  # the single-encoder reader says what is wrong
        raise
    if not isinstance(data, dict) or not is_multi(data):
        return None
    encoders = data["encoders"]
    if not isinstance(encoders, dict) or not encoders:
        raise StageConfigError(f"{path}: 'encoders' must map each encoder's name to its manifest")
    for name, manifest in encoders.items():
        missing = [k for k in IDENTITY_FIELDS if not isinstance(manifest, dict) or k not in manifest]
        if not ENCODER_NAME.match(name) or missing:
            raise StageConfigError(f"{path}: encoders.{name} is not an encoder manifest (missing {', '.join(missing)})")
    return dict(encoders)


def check_shards_dir(out_dir: Path, sources: list[EmbeddingSource]) -> dict[str, Any]:
    """The manifest the shards directory gets; one of other encoders already there is refused."""
    manifest = multi_manifest(sources)
    if (out_dir / ENCODER_JSON).exists():
        there = read_shard_encoders(out_dir)
        if there is None or list(there) != list(manifest["encoders"]):
            raise StageConfigError(f"{out_dir / ENCODER_JSON} (--out) holds shards of other encoders "
                                   f"({list(there) if there else read_manifest(out_dir)['name']}) than --embeddings "
                                   f"({list(manifest['encoders'])}); write these shards to another directory")
        for name, found in there.items():
            if differences := manifest_differences(manifest["encoders"][name], found):
                raise StageConfigError(f"{out_dir / ENCODER_JSON} (--out): encoder {name!r} does not match "
                                       f"{dict((s.name, s.directory) for s in sources)[name] / ENCODER_JSON}: "
                                       f"{describe_differences(differences)}; write these shards to another directory")
    return manifest


def settings_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The shard-writing settings a manifest implies (ShardSettings' encoder, dtype, dim, states, encoders)."""
    if not is_multi(manifest):
        return {"encoder": manifest["name"], "dtype": manifest["dtype"], "dim": manifest["dim"],
                "states": stored_states(manifest)}
    encoders = manifest["encoders"]
    first = next(iter(encoders.values()))
    return {"encoder": "_".join(encoders), "dtype": first["dtype"], "dim": first["dim"], "states": stored_states(first),
            "encoders": tuple((name, m["dtype"], m["dim"], stored_states(m)) for name, m in encoders.items())}


def index_encoders(manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``index.json`` says of the encoders: ``encoder`` (one) or ``encoders`` (several)."""
    if not is_multi(manifest):
        return {"encoder": {k: manifest[k] for k in INDEX_FIELDS}}
    return {"encoders": {name: {k: m[k] for k in INDEX_FIELDS} for name, m in manifest["encoders"].items()}}


def encoding_of(manifest: dict[str, Any], frames: int) -> dict[str, Any]:
    return {"encoder": manifest["name"], "layer": manifest["layer"], "frame_rate_hz": manifest["frame_rate_hz"],
            "frames": frames, "dim": manifest["dim"], "dtype": manifest["dtype"]}


class MultiEmbeddings:
    """Every source's embedding records, looked up together by clip id."""

    def __init__(self, sources: list[EmbeddingSource], read_embeddings):
        self.sources = sources
        self.records = [read_embeddings(s.directory) for s in sources]

    def find(self, clip_id: str) -> tuple[tuple[str, str] | None, dict[str, Any] | None]:
        """``(None, found)`` with each encoder's path, frames and encoding, or ``((reason, detail), None)``."""
        found = []
        for source, (records, errors) in zip(self.sources, self.records):
            record = records.get(clip_id)
            if record is None:
                error = errors.get(clip_id)
                if error is not None:
                    return ("embedding_failed", f"{source.name}: {error.get('code')}: {error.get('reason')}"), None
                return ("no_embedding", f"none in {source.directory} ({source.name})"), None
            path = Path(record.get("embedding_path", ""))
            if not path.is_file():
                return ("embedding_file_missing", f"{source.name}: {path}"), None
            found.append((source, path, int(record.get("frames", 0))))
        durations = {s.name: frames / float(s.manifest["frame_rate_hz"]) for s, _, frames in found}
        tolerance = max(1.0 / float(s.manifest["frame_rate_hz"]) for s, _, _ in found) + 1e-6
        if max(durations.values()) - min(durations.values()) > tolerance:
            detail = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in durations.items())
            return (DURATION_MISMATCH, f"the encoders disagree on the clip's duration by more than a frame "
                                       f"({tolerance:.3f} s): {detail}"), None
        return None, {
            "embeddings": [[s.name, str(path), frames] for s, path, frames in found],
            "bytes": sum(path.stat().st_size for _, path, _ in found),
            "encodings": {s.name: encoding_of(s.manifest, frames) for s, _, frames in found},
        }


def sample_arrays(sample: dict[str, Any], encoders: tuple, parse_npy, problem) -> list[tuple[str, bytes]]:
    """Each encoder's member of one planned sample (``(<name>.npy, bytes)``), every array checked;
    raises OSError or ``problem`` (EmbeddingProblem) naming the encoder."""
    members = []
    for (name, path, frames), (_, dtype, dim, states) in zip(sample["embeddings"], encoders, strict=True):
        data = Path(path).read_bytes()
        try:
            array = parse_npy(data, dtype, dim, states)
        except problem as exc:
            raise problem(exc.code, f"{name}: {exc}") from None
        if array.shape[-2] != frames:
            raise problem("frames_mismatch", f"{name}: {array.shape[-2]} frames, the embedding record says {frames}")
        members.append((f"{name}.npy", data))
    return members
