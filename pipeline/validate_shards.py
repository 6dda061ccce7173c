"""Validate webdataset shards: read every sample and check it against ``encoder.json`` and the schema.

``validate_shards(DIR)`` reads ``DIR/encoder.json`` and ``DIR/index.json`` (both written by the
shards stage) and every shard the index lists, member by member, and reports each problem with
its shard, byte offset and sample key:

==================  ==============================================================================
code                problem
==================  ==============================================================================
truncated           the file ends inside a member, or without the end-of-archive blocks
bad_header          a member header that does not parse (bad checksum): the archive is corrupt there
not_a_file          a directory, link or device member
bad_name            a member name with a directory part, or without ``<key>.<extension>``
pickled_payload     a ``.pyd``/``.pickle``/``.pkl``/``.pth``/``.pt`` member, or a ``.npy`` object
                    array: refused, never decoded
unexpected_member   any other extension than ``npy`` and ``json`` (``<name>.npy`` per encoder and
                    ``json`` in shards of several encoders)
incomplete_sample   a sample without its ``npy`` or its ``json``
duplicate_key       a key seen before (in this shard or another): duplicated, or its files are
                    not consecutive
duplicate_member    the same extension twice in one sample
bad_npy, wrong_dtype, wrong_shape, wrong_dim, empty_array, non_finite
                    the array is unreadable, not ``[frames, dim]`` in the manifest's dtype, or holds
                    NaN/inf
bad_json            not UTF-8 JSON
bad_schema          the JSON is not a shard sample (see ``pipeline.contracts.SampleJson``), or its clip
                    is not a valid clip record
mismatch            the JSON disagrees with its array, its key, its shard's split/family or the
                    manifest
count_mismatch      a shard holds another number of samples than the index says
missing_shard       the index lists a file that is not there
unindexed_shard     a ``.tar`` in the directory that the index does not list
==================  ==============================================================================

Shards of several encoders (``pipeline.shard_encoders``) are checked the same way, each encoder's
``<name>.npy`` against its own manifest and its entry of the JSON's ``encodings``.

Nothing is unpickled: arrays are read with ``allow_pickle=False`` and pickle-typed members are
refused by name. The tar structure is read by ``pipeline.shard_reader.iter_members``, which checks
every header, padding and the end-of-archive blocks by offset (Python's tarfile silently stops at
a corrupt or truncated header as if the archive had ended there).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import ValidationError

from pipeline.encoders import read_manifest, stored_states
from pipeline.records import InvalidRecord, parse_record
from pipeline.runner import StageConfigError, default_workers
from pipeline.shard_reader import ShardReadError, is_pickle_extension, iter_members, open_file
from pipeline.contracts import INDEX_JSON, SampleJson
from pipeline.shards import EmbeddingProblem, parse_npy
from pipeline.worker_lifetime import exit_with_parent



@dataclass
class Problem:
    shard: str
    code: str
    message: str
    offset: int | None = None
    key: str | None = None

    def line(self) -> str:
        where = self.shard + (f" @ byte {self.offset}" if self.offset is not None else "")
        return f"{where}{f' [{self.key}]' if self.key else ''}: {self.code}: {self.message}"


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class ValidationReport:
    shards: int = 0
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, listed: int = 20) -> list[str]:
        out = [f"validate-shards: {self.shards} shards, {self.samples} samples read: "
               + ("no problems" if self.ok else f"{len(self.problems)} problems")]
        if self.problems:
            counts = Counter(p.code for p in self.problems)
            out.append("validate-shards: by kind: " + ", ".join(f"{c}: {n}" for c, n in counts.most_common()))
            out += ["  " + p.line() for p in self.problems[:listed]]
            if len(self.problems) > listed:
                out.append(f"  ... and {len(self.problems) - listed} more")
        return out


def member_layout(manifest: dict) -> dict[str, dict]:
    """``{array member extension: its encoder's manifest}``: ``{"npy": m}`` for one encoder, or a
    ``{"<name>.npy": m}`` per encoder of a shards directory of several (its ``encoders``)."""
    if "encoders" in manifest and "name" not in manifest:
        return {f"{name}.npy": m for name, m in manifest["encoders"].items()}
    return {"npy": manifest}


def _check_sample(shard: str, key: str, members: dict[str, tuple[int, bytes]], manifest: dict,
                  expected: dict, report: ShardReport) -> None:
    """One sample's arrays and ``json`` against the manifest, the schema and each other."""
    layout = member_layout(manifest)
    def problem(code: str, message: str, ext: str | None = None) -> None:
        offset = members[ext][0] if ext in members else min(o for o, _ in members.values())
        report.problems.append(Problem(shard, code, message, offset, key))

    for ext in (*layout, "json"):
        if ext not in members:
            problem("incomplete_sample", f"no {key}.{ext} (members: {sorted(members)})")
    frames = {}
    for ext, m in layout.items():
        if ext in members:
            try:
                frames[ext] = parse_npy(members[ext][1], m["dtype"], m["dim"], stored_states(m)).shape[-2]
            except EmbeddingProblem as exc:
                problem(exc.code, str(exc) if ext == "npy" else f"{ext}: {exc}", ext)
    if "json" not in members:
        return
    try:
        obj = json.loads(members["json"][1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        problem("bad_json", str(exc), "json")
        return
    try:
        sample = SampleJson.model_validate(obj)
        parse_record(sample.clip)
    except (ValidationError, InvalidRecord) as exc:
        problem("bad_schema", " ".join(str(exc).split())[:300], "json")
        return
    mismatches = []
    if sample.key != key:
        mismatches.append(f"json key {sample.key!r} != tar key {key!r}")
    if sample.clip.get("id") != sample.clip_id:
        mismatches.append(f"clip.id {sample.clip.get('id')!r} != clip_id {sample.clip_id!r}")
    if sample.clip.get("split") != sample.split:
        mismatches.append(f"clip.split {sample.clip.get('split')!r} != split {sample.split!r}")
    for field_name in ("split", "task_family"):
        if expected.get(field_name) and getattr(sample, field_name) != expected[field_name]:
            mismatches.append(f"{field_name} {getattr(sample, field_name)!r} in a {expected[field_name]!r} shard")
    if expected.get("dataset") and sample.clip.get("dataset") != expected["dataset"]:
        mismatches.append(f"clip.dataset {sample.clip.get('dataset')!r} in a {expected['dataset']!r} shard")
    if list(layout) == ["npy"]:
        encodings = {"npy": ("encoding", sample.encoding)}
    else:
        given = sample.encodings or {}
        encodings = {f"{name}.npy": (f"encodings.{name}", e) for name, e in given.items()}
        if sorted(encodings) != sorted(layout):
            mismatches.append(f"encodings of {sorted(given)} in shards of {sorted(e[:-4] for e in layout)}")
    for ext, (where, encoding) in encodings.items():
        m = layout.get(ext)
        if m is None:
            continue
        if encoding is None:
            mismatches.append(f"no {where} (a sample of several encoders has 'encodings')")
            continue
        for field_name, manifest_key in (("encoder", "name"), ("layer", "layer"), ("dim", "dim"), ("dtype", "dtype"),
                                         ("frame_rate_hz", "frame_rate_hz")):
            if getattr(encoding, field_name) != m[manifest_key]:
                mismatches.append(f"{where}.{field_name} {getattr(encoding, field_name)!r} != encoder.json "
                                  f"{manifest_key} {m[manifest_key]!r}")
        if ext in frames and encoding.frames != frames[ext]:
            mismatches.append(f"{where}.frames {encoding.frames} != the array's {frames[ext]} frames")
    if mismatches:
        problem("mismatch", "; ".join(mismatches), "json")


def validate_shard(path: str | os.PathLike, manifest: dict, expected: dict | None = None) -> ShardReport:
    """Read one shard member by member; ``expected`` may give its ``split``, ``task_family``, ``samples``."""
    path, expected = Path(path), expected or {}
    report = ShardReport(shard=path.name)
    seen: set[str] = set()
    key, members = None, {}
    extensions = (*member_layout(manifest), "json")

    def finish() -> None:
        if key is not None:
            _check_sample(path.name, key, members, manifest, expected, report)
            report.samples += 1
            report.keys.append(key)

    with open_file(path) as fh:
        try:
            for member in iter_members(fh, path.name):
                name = member.name
                base, dot, ext = name.partition(".")
                if not member.isreg():
                    report.problems.append(Problem(path.name, "not_a_file", f"{name!r} is not a regular file",
                                                   member.offset))
                    continue
                if "/" in name or not dot or not base:
                    report.problems.append(Problem(path.name, "bad_name", f"member name {name!r} is not "
                                                   "<key>.<extension>", member.offset))
                    continue
                if is_pickle_extension(ext):
                    report.problems.append(Problem(path.name, "pickled_payload", f"{name!r} is a pickle; refused "
                                                   "without decoding it", member.offset, base))
                    continue
                if ext not in extensions:
                    report.problems.append(Problem(path.name, "unexpected_member", f"{name!r}: only "
                                                   f"{' and '.join('.' + e for e in extensions)} belong in a sample",
                                                   member.offset, base))
                    continue
                if base != key:
                    finish()
                    if base in seen:
                        report.problems.append(Problem(path.name, "duplicate_key", f"key {base!r} appears again "
                                                       "(repeated, or its files are not consecutive)", member.offset,
                                                       base))
                    seen.add(base)
                    key, members = base, {}
                if ext in members:
                    report.problems.append(Problem(path.name, "duplicate_member", f"{name!r} twice in one sample",
                                                   member.offset, base))
                    continue
                members[ext] = (member.offset, member.data)
        except ShardReadError as exc:
            report.problems.append(Problem(path.name, exc.code, exc.reason, exc.offset, exc.key))
        finish()
    if "samples" in expected and report.samples != expected["samples"]:
        report.problems.append(Problem(path.name, "count_mismatch",
                                       f"{report.samples} samples read, the index says {expected['samples']}"))
    return report


def _validate_one(args: tuple[str, dict, dict]) -> ShardReport:
    return validate_shard(*args)


def validate_shards(shards_dir: str | os.PathLike, workers: int | None = None) -> ValidationReport:
    """Validate every shard of a shards directory; see the module docstring for what is checked."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise StageConfigError(f"{shards_dir} is not a directory of shards")
    from pipeline.shard_encoders import index_encoders, read_shard_encoders, multi_manifest_of

    encoders = read_shard_encoders(shards_dir)
    manifest = multi_manifest_of(encoders) if encoders else read_manifest(shards_dir)
    index_path = shards_dir / INDEX_JSON
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        listed = index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageConfigError(f"{index_path} is missing or not a shard index ({exc}); run `llark shards` first") from None
    report = ValidationReport()
    expected_index = index_encoders(manifest)
    field_name = next(iter(expected_index))
    encoder, wanted = index.get(field_name, {}), expected_index[field_name]
    if encoders:
        differences = [f"encoders: {sorted(encoder)} != {sorted(wanted)}"] if sorted(encoder) != sorted(wanted) else []
        differences += [f"{n}.{k}: {encoder[n].get(k)!r} != {wanted[n][k]!r}" for n in wanted if n in encoder
                        for k in wanted[n] if encoder[n].get(k) != wanted[n][k]]
    else:
        differences = [f"{k}: {encoder.get(k)!r} != {manifest[k]!r}" for k in encoder
                       if encoder.get(k) != manifest.get(k)]
    if differences:
        report.problems.append(Problem(INDEX_JSON, "mismatch", "index.json's encoder disagrees with encoder.json: "
                                       + "; ".join(differences)))
    jobs = []
    for entry in listed:
        path = shards_dir / entry["file"]
        if not path.is_file():
            report.problems.append(Problem(entry["file"], "missing_shard", "listed in index.json but not there"))
            continue
        jobs.append((str(path), manifest, {k: entry[k] for k in ("split", "task_family", "dataset", "samples") if k in entry}))
    names = {entry["file"] for entry in listed}
    for path in sorted(shards_dir.glob("*.tar")):
        if path.name not in names:
            report.problems.append(Problem(path.name, "unindexed_shard", "a shard that index.json does not list"))

    workers = max(1, min(workers or default_workers(), len(jobs) or 1))
    if workers == 1:
        results = map(_validate_one, jobs)
    else:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=exit_with_parent)
        results = pool.map(_validate_one, jobs)
    first_seen: dict[str, str] = {}
    try:
        for shard in results:
            report.shards += 1
            report.samples += shard.samples
            report.problems += shard.problems
            for key in shard.keys:
                if key in first_seen and first_seen[key] != shard.shard:
                    report.problems.append(Problem(shard.shard, "duplicate_key", f"key {key!r} is also in "
                                                   f"{first_seen[key]}", key=key))
                first_seen.setdefault(key, shard.shard)
    finally:
        if workers > 1:
            pool.shutdown()
    return report


def write_report(report: ValidationReport, path: str | os.PathLike) -> None:
    """Every problem as one JSON line (shard, code, message, offset, key)."""
    with open(path, "w", encoding="utf-8") as fh:
        for problem in report.problems:
            fh.write(json.dumps(asdict(problem)) + "\n")
