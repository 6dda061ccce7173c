"""The shards stage: clip records + instruction records + embeddings → webdataset tar shards.

Join: each instruction record (one clip, one task family, its Q/A pairs) becomes one sample,
joined by clip id with its clip record and its embedding. Whatever cannot be joined is reported in
``missing.jsonl`` (``clip_id``, ``task_family``, ``split``, ``reason``, ``detail``) and counted in
the summary, never dropped silently:

=======================  ===================================================================
reason                   meaning
=======================  ===================================================================
no_instructions          a clip's ``task_families`` names a family with no instruction record
no_pairs                 an instruction record holds no Q/A pair (all filtered out)
no_clip_record           an instruction record's clip is not in the clip records
no_embedding             the clip has no embedding (not embedded yet)
embedding_failed         the embed stage recorded an error for the clip (``detail`` says why)
embedding_file_missing   the embedding record points to a file that is not there
bad_embedding            the ``.npy`` is unreadable, pickled, of the wrong dtype or shape, or not finite
invalid_instruction      an instruction line that is not a valid instruction record
duration_mismatch        several encoders' frames of the clip disagree on its duration (by more than a frame)
duplicate_instruction    a second instruction record with the same id
=======================  ===================================================================

Samples: one per instruction record, keyed by the instruction id, ``<clip id>-<task family>``
(dot-free and unique across families, so shards of several families can be mixed in one stream).
Each sample is two consecutive tar members: ``<key>.npy``, the embedding exactly as the embed stage
saved it (``[frames, dim]``, float16 or float32, ``.npy`` format, no pickles), and ``<key>.json``::

    {"key", "clip_id", "task_family", "split",
     "clip": <the clip record>, "pairs": [{"question", "answer"}, ...],
     "instructions": {"id", "backend", "model", "prompt_version"},
     "encoding": {"encoder", "layer", "frame_rate_hz", "frames", "dim", "dtype"}}

Shards: one set per split, task family and dataset, named
``{name}-{split}-{family}-{dataset}-{encoder}-{000000}.tar`` (so that training can weigh datasets
and families without reading what it leaves out).
Within a set, samples are shuffled by a seeded generator (the same seed gives the same shards, in
any input order) and cut into shards of at most ``shard_bytes`` (default 1 GB: about 400 Jukebox
samples of 250 × 4800 float16). Tar members have fixed metadata (mtime 0, uid/gid 0, mode 0644), so
the same inputs give byte-identical shards. Writing a shard is the runner's per-item function
(resume, parallel workers, progress, atomic files); ``plan.jsonl`` lists what each shard holds, and
``samples.jsonl`` the samples' JSON, which the plan addresses by byte offset (so that planning a
million samples keeps no million documents in memory).

Beside the shards: ``encoder.json`` (copied from the embeddings; a different one already there
is refused before any work), ``index.json`` (every shard with its split, family, dataset, sample
count and size, and the totals: what training reads to know the dataset's size; written only when every
planned shard was written; a planned shard whose every sample was refused is not written),
``missing.jsonl``, and the runner's ``shards.jsonl`` and ``shards.errors.jsonl``.

Several embedding directories (one per encoder) give samples with one array per encoder; see
:mod:`pipeline.shard_encoders`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import ValidationError

from pipeline.contracts import (EMBEDDINGS_JSONL, ENCODER_JSON, INDEX_JSON, MISSING_JSONL, PLAN_JSONL,
                                SAMPLES_JSONL, SHARDS_JSONL, InstructionRecord, sample_key)
from pipeline.encoders import describe_differences, manifest_differences, read_manifest, write_manifest
from pipeline.errors import PipelineError
from pipeline.files import atomic_write, is_disk_failure, remove_dead_temporaries
from pipeline.records import InvalidRecord, iter_jsonl, parse_record, write_jsonl
from pipeline.runner import ItemError, OutputLock, RunSummary, Stage, StageConfigError, errors_path, run_stage, stopped_by_disk

log = logging.getLogger("llark")

DEFAULT_SHARD_BYTES = 1_000_000_000
SAMPLE_EXTENSIONS = ("npy", "json")
TAR_OVERHEAD = 3 * 512  # two member headers and padding, roughly
NO_INSTRUCTIONS = ("the clip names this task family but no instruction record has it (not generated yet, "
                   "failed, or left out by the instructions stage, e.g. reasoning beyond its per-dataset cap)")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-[a-z]+-[a-z]+-.+-\d{6}\.tar$")
# Files of a shards directory besides the shards; its runs all hold the lock of plan.jsonl.
_DIRECTORY_FILES = {ENCODER_JSON, INDEX_JSON, MISSING_JSONL, PLAN_JSONL, SAMPLES_JSONL}


def shard_stem(name: str, split: str, family: str, dataset: str, encoder: str, index: int) -> str:
    return f"{name}-{split}-{family}-{dataset}-{encoder}-{index:06d}"


# ---------------------------------------------------------------------------------------------
# Reading .npy payloads without pickles


class EmbeddingProblem(PipelineError, ValueError):
    """An embedding that cannot go into a shard; ``code`` says why (validate-shards uses the same codes)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_npy(data: bytes, dtype: str, dim: int, states: int | None = None) -> np.ndarray:
    """Decode ``.npy`` bytes with pickles disallowed and check them against the encoder's dtype and
    dimension; raise EmbeddingProblem with a code (pickled_payload, bad_npy, wrong_dtype,
    wrong_shape, wrong_dim, empty_array, non_finite). The array is a read-only view of ``data``."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, found = header(stream)
    except (ValueError, OSError) as exc:
        raise EmbeddingProblem("bad_npy", f"not a .npy array: {exc}") from None
    if found.hasobject:
        raise EmbeddingProblem("pickled_payload", f"an object array ({found}): its data is a pickle; refused")
    if found != np.dtype(dtype).newbyteorder("<"):
        raise EmbeddingProblem("wrong_dtype", f"dtype {found.str}, expected {dtype}")
    if len(shape) != (3 if states else 2) or (states and shape[0] != states):
        expected = f"[{states}, frames, {dim}]" if states else f"[frames, {dim}]"
        raise EmbeddingProblem("wrong_shape", f"shape {shape}, expected {expected}")
    if shape[-1] != dim:
        raise EmbeddingProblem("wrong_dim", f"shape {shape}: dimension {shape[-1]}, expected {dim}")
    if shape[-2] < 1:
        raise EmbeddingProblem("empty_array", f"shape {shape}: no frames")
    offset, count = stream.tell(), int(np.prod(shape))
    if len(data) - offset != count * found.itemsize:
        raise EmbeddingProblem("bad_npy", f"{len(data) - offset} bytes of data for shape {shape} of {found.str}")
    array = np.frombuffer(data, dtype=found, count=count, offset=offset)
    array = array.reshape(shape, order="F" if fortran_order else "C")
    bad = count_non_finite(array)
    if bad:
        raise EmbeddingProblem("non_finite", f"{bad} NaN or infinite values")
    return array


def count_non_finite(array: np.ndarray) -> int:
    """NaN and inf count; for float16 by its exponent bits (``np.isfinite`` on float16 is slow)."""
    if array.dtype.itemsize == 2:
        return int(np.count_nonzero((array.view("<u2") & 0x7C00) == 0x7C00))
    return int(array.size - np.count_nonzero(np.isfinite(array)))


# ---------------------------------------------------------------------------------------------
# Join and plan


@dataclass
class Missing:
    clip_id: str
    reason: str
    detail: str = ""
    task_family: str | None = None
    split: str | None = None
    dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass
class Join:
    """Samples by (split, family, dataset), and what could not be joined."""

    samples: dict[tuple[str, str, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    missing: list[Missing] = field(default_factory=list)
    clips_without_families: int = 0


def _read_embeddings(embeddings_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    records, errors = {}, {}
    listing = embeddings_dir / EMBEDDINGS_JSONL
    if not listing.is_file():
        raise StageConfigError(f"--embeddings: {listing} does not exist; run `llark embed` first")
    for line in iter_jsonl(listing):
        if line.obj is not None and isinstance(line.obj.get("id"), str):
            records[line.obj["id"]] = line.obj
    error_file = errors_path(listing)
    if error_file.is_file():
        for line in iter_jsonl(error_file):
            if line.obj is not None and isinstance(line.obj.get("id"), str):
                errors[line.obj["id"]] = line.obj
    return records, errors


def join_inputs(clips_path: Path, instructions_path: Path, embeddings_dir: Path, manifest: dict,
                samples_out: BinaryIO, sources: list | None = None) -> Join:
    """Join instruction records with clip records and embeddings; report what does not join.

    Each joined sample's JSON is written to ``samples_out`` as one line; the join keeps only its
    offset, length and hash, so that planning a million samples holds no million JSON documents.
    """
    join = Join()
    clips: dict[str, dict] = {}
    for line in iter_jsonl(clips_path):
        if line.error:
            raise StageConfigError(f"--clips {clips_path}: {line.error}")
        try:
            record = parse_record(line.obj)
        except InvalidRecord as exc:
            raise StageConfigError(f"--clips {clips_path}: line {line.number}: {exc}") from None
        clips[record.id] = record.model_dump(mode="json", exclude_none=True)
    if sources is not None:
        from pipeline.shard_encoders import MultiEmbeddings

        multi, embeddings, embed_errors = MultiEmbeddings(sources, _read_embeddings), {}, {}
    else:
        multi, (embeddings, embed_errors) = None, _read_embeddings(embeddings_dir)

    seen: set[str] = set()
    for line in iter_jsonl(instructions_path):
        raw = line.obj or {}
        clip_id = str(raw.get("clip_id", f"line-{line.number}"))
        try:
            if line.error:
                raise ValueError(line.error)
            instruction = InstructionRecord.model_validate(raw)
            if instruction.id != sample_key(instruction.clip_id, instruction.task_family):
                raise ValueError(f"id {instruction.id!r} is not '<clip_id>-<task_family>'")
            if not _KEY.match(instruction.id):
                raise ValueError(f"id {instruction.id!r} is not a safe sample key (letters, digits, '_', '-')")
        except (ValidationError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:300]
            join.missing.append(Missing(clip_id, "invalid_instruction", f"line {line.number}: {detail}"))
            continue
        family, clip = instruction.task_family, clips.get(instruction.clip_id)
        where = {"task_family": family, "split": clip["split"] if clip else instruction.split,
                 "dataset": clip["dataset"] if clip else instruction.dataset}
        if instruction.id in seen:
            join.missing.append(Missing(clip_id, "duplicate_instruction", f"line {line.number}", **where))
            continue
        seen.add(instruction.id)
        if clip is None:
            join.missing.append(Missing(clip_id, "no_clip_record", "", **where))
            continue
        if not instruction.pairs:
            join.missing.append(Missing(clip_id, "no_pairs", "every pair was filtered out", **where))
            continue
        if multi is not None:
            problem, found = multi.find(clip_id)
            if problem is not None:
                join.missing.append(Missing(clip_id, *problem, **where))
                continue
            embedding = {"frames": found["embeddings"][0][2], "embedding_path": found["embeddings"][0][1]}
        else:
            embedding = embeddings.get(clip_id)
        if embedding is None:
            error = embed_errors.get(clip_id)
            if error is not None:
                join.missing.append(Missing(clip_id, "embedding_failed",
                                            f"{error.get('code')}: {error.get('reason')}", **where))
            else:
                join.missing.append(Missing(clip_id, "no_embedding", "", **where))
            continue
        path = Path(embedding.get("embedding_path", ""))
        if not path.is_file():
            join.missing.append(Missing(clip_id, "embedding_file_missing", str(path), **where))
            continue
        sample_json = {
            "key": instruction.id,
            "clip_id": clip_id,
            "task_family": family,
            "split": clip["split"],
            "clip": clip,
            "pairs": [p.model_dump(mode="json") for p in instruction.pairs],
            "instructions": {"id": instruction.id, "backend": instruction.backend, "model": instruction.model,
                             "prompt_version": instruction.prompt_version},
            "encoding": None if multi else {
                "encoder": manifest["name"], "layer": manifest["layer"], "frame_rate_hz": manifest["frame_rate_hz"],
                "frames": int(embedding.get("frames", 0)), "dim": manifest["dim"], "dtype": manifest["dtype"]},
        }
        if multi is not None:
            del sample_json["encoding"]
            sample_json["encodings"] = found["encodings"]
        payload = json.dumps(sample_json, ensure_ascii=False, sort_keys=True).encode("utf-8")
        offset = samples_out.tell()
        samples_out.write(payload + b"\n")
        join.samples[(clip["split"], family, clip["dataset"])].append({
            "key": instruction.id, "embedding_path": str(path), "frames": int(embedding.get("frames", 0)),
            "bytes": path.stat().st_size + len(payload), "json_offset": offset, "json_length": len(payload),
            "json_sha1": hashlib.sha1(payload).hexdigest(),
            **({"embeddings": found["embeddings"], "bytes": found["bytes"] + len(payload)} if multi else {}),
        })

    for clip_id, clip in clips.items():
        families = clip.get("task_families") or []
        if not families:
            join.clips_without_families += 1
        for family in families:
            if sample_key(clip_id, family) not in seen:
                join.missing.append(Missing(clip_id, "no_instructions", NO_INSTRUCTIONS, family, clip["split"],
                                            clip["dataset"]))
    return join


def plan_shards(join: Join, settings: "ShardSettings") -> list[dict]:
    """Shuffle each (split, family, dataset) set with its own seeded generator and cut it into shards."""
    plan = []
    for (split, family, dataset) in sorted(join.samples):
        samples = sorted(join.samples[(split, family, dataset)], key=lambda s: s["key"])
        digest = hashlib.sha256(f"{settings.seed}:{split}:{family}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(samples)
        shards: list[list[dict]] = [[]]
        size = 0
        for sample in samples:
            sample_bytes = sample["bytes"] + TAR_OVERHEAD
            full = size + sample_bytes > settings.shard_bytes or (
                settings.shard_samples is not None and len(shards[-1]) >= settings.shard_samples)
            if shards[-1] and full:
                shards.append([])
                size = 0
            shards[-1].append(sample)
            size += sample_bytes
        for index, members in enumerate(shards):
            stem = shard_stem(settings.name, split, family, dataset, settings.encoder, index)
            plan.append({
                "id": stem, "path": str(Path(settings.out_dir) / f"{stem}.tar"), "split": split,
                "task_family": family, "dataset": dataset,
                "samples": [{k: s[k] for k in ("key", "embedding_path", "frames", "json_offset", "json_length",
                                               "json_sha1", "embeddings") if k in s} for s in members],
            })
    return plan


# ---------------------------------------------------------------------------------------------
# Writing one shard (the runner's per-item function)


@dataclass(frozen=True)
class ShardSettings:
    out_dir: str
    samples_path: str
    name: str
    encoder: str
    dtype: str
    dim: int
    shard_bytes: int = DEFAULT_SHARD_BYTES
    states: int | None = None  # [states, frames, dim] arrays (embeddings of every layer)
    shard_samples: int | None = None
    seed: int = 0
    plan_digest: str = ""
    encoders: tuple = ()  # several encoders: (name, dtype, dim, states) of each, in member order

    def ledger_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        fields = asdict(self)
        if not self.encoders:
            del fields["encoders"]  # single-encoder runs keep the ledger header of earlier versions
        return fields


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard_item(row: dict, settings: ShardSettings) -> dict:
    """Per-item function of the shards stage: write one planned shard atomically."""
    path = Path(row["path"])
    written, skipped = 0, []
    # A shard whose every sample was refused (they are reported) is not kept: no empty shard for
    # training to open.
    with open(settings.samples_path, "rb") as sample_json, \
            atomic_write(path, keep=lambda: written > 0) as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20) as tar:
            for sample in row["samples"]:
                key = sample["key"]
                try:
                    if settings.encoders:
                        from pipeline.shard_encoders import sample_arrays

                        arrays = sample_arrays(sample, settings.encoders, parse_npy, EmbeddingProblem)
                    else:
                        data = Path(sample["embedding_path"]).read_bytes()
                        array = parse_npy(data, settings.dtype, settings.dim, settings.states)
                        if array.shape[-2] != sample["frames"]:
                            raise EmbeddingProblem("frames_mismatch", f"{array.shape[-2]} frames, the embedding "
                                                   f"record says {sample['frames']}")
                        arrays = [("npy", data)]
                except OSError as exc:
                    skipped.append({"key": key, "reason": "embedding_file_missing", "detail": str(exc)})
                    continue
                except EmbeddingProblem as exc:
                    skipped.append({"key": key, "reason": "bad_embedding", "detail": f"{exc.code}: {exc}"})
                    continue
                sample_json.seek(sample["json_offset"])
                payload = sample_json.read(sample["json_length"])
                if hashlib.sha1(payload).hexdigest() != sample["json_sha1"]:
                    raise ItemError("plan_changed", f"{settings.samples_path} changed under this run; rerun")
                for member, data in arrays:
                    tar.addfile(tar_member(f"{key}.{member}", len(data)), io.BytesIO(data))
                tar.addfile(tar_member(f"{key}.json", len(payload)), io.BytesIO(payload))
                written += 1
    return {
        "id": row["id"], "file": path.name if written else None, "split": row["split"],
        "task_family": row["task_family"], "dataset": row["dataset"], "samples": written,
        "bytes": path.stat().st_size if written else 0,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------
# The whole stage


@dataclass
class ShardsSummary:
    run: RunSummary
    planned_shards: int
    samples: int
    missing: Counter
    complete: bool
    index: Path | None
    clips_without_families: int

    def lines(self) -> list[str]:
        if not self.planned_shards:
            out = ["shards: nothing to write: no instruction record joined with its clip record and embedding"]
        else:
            out = [
                f"shards: {self.samples} samples in {self.planned_shards} planned shards "
                f"({self.run.failed_total} shards failed); "
                + (f"index: {self.index}" if self.complete else "index.json not written: some shards are "
                   "missing; rerun the same command to resume")
            ]
        if self.missing:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.missing.most_common())
            out.append(f"shards: not in any shard, by reason: {reasons}; details in "
                       f"{Path(self.run.output).parent / MISSING_JSONL}")
        if self.clips_without_families:
            out.append(f"shards: {self.clips_without_families} clips name no task family (evaluation clips); "
                       "they are not expected in instruction shards")
        return out


def check_shard_settings(name: str, shard_bytes: int, shard_samples: int | None) -> None:
    if not _NAME.match(name):
        raise StageConfigError(f"--name must be letters, digits and '_', got {name!r}")
    if shard_bytes < 1:
        raise StageConfigError(f"--shard-bytes must be positive, got {shard_bytes}")
    if shard_samples is not None and shard_samples < 1:
        raise StageConfigError(f"--shard-samples must be at least 1, got {shard_samples}")


def prepare_shards_dir(out_dir: Path, embeddings_dir: Path) -> dict[str, Any]:
    """The embeddings' manifest, checked against (or copied to) the shards directory."""
    manifest = read_manifest(embeddings_dir)
    if (out_dir / ENCODER_JSON).exists():
        differences = manifest_differences(manifest, read_manifest(out_dir))
        if differences:
            raise StageConfigError(
                f"{out_dir / ENCODER_JSON} (--out) does not match {embeddings_dir / ENCODER_JSON} (--embeddings): "
                f"{describe_differences(differences)}; write these shards to another directory"
            )
    return manifest


def _remove_stale_shards(out_dir: Path, settings: ShardSettings, planned: set[str]) -> None:
    # Shards of this name and encoder, with a dataset in the name (this version) or without (earlier ones).
    pattern = re.compile(rf"^{re.escape(settings.name)}-[a-z]+-[a-z]+(-[A-Za-z0-9_-]+)?-{re.escape(settings.encoder)}"
                         r"-\d{6}\.tar$")
    for path in out_dir.glob("*.tar"):
        if pattern.match(path.name) and path.name not in planned:
            log.info("shards: removing %s, which this plan no longer has", path)
            path.unlink()


def build_shards(
    clips_path: str | os.PathLike,
    instructions_path: str | os.PathLike,
    embeddings_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "llark",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_samples: int | None = None,
    seed: int = 0,
    executor=None,
    overwrite: bool = False,
    retry_failed: bool = True,
    limit: int | None = None,
    progress: bool = True,
) -> ShardsSummary:
    """Join, plan and write the shards, then ``index.json`` and ``missing.jsonl`` (see module doc).
    ``embeddings_dir`` may be a list: more than one directory writes samples of several encoders."""
    from pipeline.shard_encoders import check_shards_dir, resolve_embeddings

    embeddings_dir, sources = resolve_embeddings(embeddings_dir)
    clips_path, instructions_path = Path(clips_path), Path(instructions_path)
    embeddings_dir, out_dir = Path(embeddings_dir), Path(out_dir)
    check_shard_settings(name, shard_bytes, shard_samples)
    for option, path in (("--clips", clips_path), ("--instructions", instructions_path)):
        if not path.is_file():
            raise StageConfigError(f"{option}: {path} does not exist")
    if not embeddings_dir.is_dir():
        raise StageConfigError(f"--embeddings: {embeddings_dir} is not a directory (the embed stage's --embeddings-dir)")
    manifest = check_shards_dir(out_dir, sources) if sources else prepare_shards_dir(out_dir, embeddings_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out_dir / PLAN_JSONL, "shards")
        with lock:  # plan.jsonl and samples.jsonl belong to one run
            remove_dead_temporaries(out_dir, lambda name: (name in _DIRECTORY_FILES or bool(_SHARD_FILE.match(name))
                                                           or lock.owns_temporary(name)))
            return _build_shards(clips_path, instructions_path, embeddings_dir, out_dir, manifest, sources, name=name,
                                 shard_bytes=shard_bytes, shard_samples=shard_samples, seed=seed, executor=executor,
                                 overwrite=overwrite, retry_failed=retry_failed, limit=limit, progress=progress)
    except OSError as exc:
        if not is_disk_failure(exc):
            raise
        raise stopped_by_disk("shards", exc, f"The shards written so far are kept in {out_dir}") from None


def _build_shards(clips_path, instructions_path, embeddings_dir, out_dir, manifest, sources, *, name, shard_bytes,
                  shard_samples, seed, executor, overwrite, retry_failed, limit, progress) -> ShardsSummary:
    samples_path = out_dir / SAMPLES_JSONL
    with atomic_write(samples_path) as samples_out:
        join = join_inputs(clips_path, instructions_path, embeddings_dir, manifest, samples_out, sources)
    from pipeline.shard_encoders import index_encoders, settings_fields

    settings = ShardSettings(out_dir=str(out_dir.resolve()), samples_path=str(samples_path.resolve()), name=name,
                             shard_bytes=shard_bytes, shard_samples=shard_samples, seed=seed,
                             **settings_fields(manifest))
    plan = plan_shards(join, settings)
    # What the shards will hold, whatever the byte offsets of samples.jsonl: a rerun on the same
    # inputs resumes; other inputs or settings make the runner refuse to mix old and new shards.
    content = [[row["id"], [[x["key"], x["embedding_path"], x["json_sha1"]] + ([x["embeddings"]] if "embeddings" in x
                                                                             else []) for x in row["samples"]]]
               for row in plan]
    digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    settings = ShardSettings(**{**settings.__dict__, "plan_digest": digest})

    write_manifest(out_dir, manifest)
    plan_path = out_dir / PLAN_JSONL
    write_jsonl(plan_path, plan)
    if overwrite:
        _remove_stale_shards(out_dir, settings, set())
    run = run_stage(Stage(name="shards", process=write_shard_item, settings=settings), plan_path,
                    out_dir / SHARDS_JSONL, executor=executor, overwrite=overwrite, retry_failed=retry_failed,
                    limit=limit, progress=progress)

    written = {}
    for line in iter_jsonl(out_dir / SHARDS_JSONL):
        if line.obj is not None:
            written[line.obj["id"]] = line.obj
    missing = list(join.missing)
    for row in plan:
        for skipped in written.get(row["id"], {}).get("skipped", []):
            missing.append(Missing(skipped["key"].rsplit("-", 1)[0], skipped["reason"], skipped["detail"],
                                   row["task_family"], row["split"]))
    write_jsonl(out_dir / MISSING_JSONL, [m.to_dict() for m in missing])

    complete = bool(plan) and all(row["id"] in written for row in plan)
    index_path = out_dir / INDEX_JSON
    if complete:
        _remove_stale_shards(out_dir, settings, {w["file"] for w in written.values() if w["file"]})
        shards = [{k: written[row["id"]][k] for k in ("file", "split", "task_family", "dataset", "samples", "bytes")}
                  for row in plan if written[row["id"]]["samples"]]
        totals: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
        for shard in shards:
            entry = totals[shard["split"]].setdefault(shard["task_family"], {"shards": 0, "samples": 0})
            entry["shards"] += 1
            entry["samples"] += shard["samples"]
        index = {
            "name": name, "seed": seed,
            **index_encoders(manifest),
            "total_samples": sum(s["samples"] for s in shards), "splits": totals, "shards": shards,
            "missing": dict(Counter(m.reason for m in missing)),
        }
        with atomic_write(index_path, "w") as fh:
            fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        index_path.unlink(missing_ok=True)
    summary = ShardsSummary(
        run=run, planned_shards=len(plan), samples=sum(w["samples"] for w in written.values()),
        missing=Counter(m.reason for m in missing), complete=complete, index=index_path if complete else None,
        clips_without_families=join.clips_without_families,
    )
    for line in summary.lines():
        log.info(line)
    return summary
