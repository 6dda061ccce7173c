"""A researcher's own music: a folder of audio files, with optional metadata beside them.

Layout (Hugging Face's audiofolder convention)::

    ROOT/**/*.{wav,flac,ogg,oga,opus,mp3,aiff,aif,caf,w64,...}   any nesting
    ROOT/metadata.csv | metadata.jsonl | metadata.parquet         optional, at most one

Hidden files and folders (a name starting with ``.``) are skipped. A track's identity is its path
relative to the root, POSIX style and NFC-normalised: the record id is ``make_id("folder", relpath)``
and ``annotations["file_name"]`` keeps the path, so ids are the same on every run and machine.

The metadata file has a ``file_name`` column (relative to the root) and any of these, which become
the record's ``labels``: ``genre`` (one value → ``genre``; several → ``genres``), ``genres``,
``tags``, ``moods``/``mood``, ``instruments``, ``caption``, ``key``, ``tempo``/``bpm`` (→
``tempo_bpm``), ``beats_per_bar`` or ``time_signature`` (``"3/4"`` → 3), ``language``/
``lyrics_language``. List values may be JSON lists, or text separated by ``;`` (else ``,``). A
``split`` column (train, valid, test; validation/val/dev → valid) decides the split; every other
column is kept in ``annotations``. Files without a row are ingested with no labels.

Without a ``split`` value a file's split is drawn from a hash of ``(seed, relpath)``
(``--set split=80/10/10 --set seed=0``, the defaults), so it does not depend on the listing order.

A metadata file that cannot be read as a whole (two of them, no ``file_name`` column, an unreadable
header) stops ingest before any output. A bad row (its file missing, a ``file_name`` given twice,
an unreadable value) becomes an error record naming the metadata file and line, its file is left
out, and the run goes on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from pipeline.ingest import Adapter, DatasetLayoutError, Prepared
from pipeline.labels import Labels, normalise_key
from pipeline.records import ClipRecord, make_id
from pipeline.runner import StageConfigError

DATASET = "folder"
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# What libsndfile (soundfile >= 0.12, libsndfile >= 1.1) decodes, by file extension.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
})
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
               "test": "test"}
LIST_COLUMNS = {"genres": "genres", "tags": "tags", "moods": "moods", "mood": "moods", "instruments": "instruments"}
LABEL_COLUMNS = frozenset({"genre", *LIST_COLUMNS, "caption", "key", "tempo", "bpm", "tempo_bpm", "beats_per_bar",
                           "time_signature", "language", "lyrics_language", "split"})

LAYOUT = """\
ROOT/**/*.wav|flac|ogg|mp3|aiff|opus|...   audio files, any nesting (hidden ones skipped)
ROOT/metadata.csv|.jsonl|.parquet          optional: file_name (relative to ROOT), split, genre,
                                           genres, tags, moods, instruments, caption, key, tempo|bpm,
                                           beats_per_bar|time_signature, language; others kept"""


class RowError(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def prepare(root: str | Path, split: str | list = "80/10/10", seed: int = 0) -> Prepared:
    """Every audio file under ``root``, with the labels of its metadata row."""
    root = Path(root)
    fractions = _split_fractions(split)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise StageConfigError(f"--set seed: expected an integer, got {seed!r}")
    audio = {rel: path for rel, path in _audio_files(root)}
    metadata = _metadata_file(root)
    rows: dict[str, tuple[int, dict[str, Any]]] = {}
    lines: dict[str, list[int]] = {}
    errors: list[dict] = []
    where = str(metadata) if metadata else ""
    for line, row in (_read_rows(metadata) if metadata else ()):
        try:
            if isinstance(row, RowError):
                raise row
            rel = _file_name(row.get("file_name"))
            lines.setdefault(rel, []).append(line)
            if len(lines[rel]) > 1:
                continue
            if rel not in audio:
                raise RowError("missing_audio", f"audio file not found: {root / rel}")
            rows[rel] = (line, row)
        except RowError as exc:
            errors.append(_error(where, line, None if isinstance(row, RowError) else row.get("file_name"), exc))
    for rel, at in lines.items():
        if len(at) > 1:
            rows.pop(rel, None)
            errors.append(_error(where, at[0], rel, RowError(
                "duplicate_file_name", f"file_name {rel!r} is on lines {', '.join(map(str, at))}")))
    records = []
    left_out = {e["file_name"] for e in errors if e.get("file_name")}
    for rel in sorted(audio):
        if rel in left_out:
            continue
        line, row = rows.get(rel, (None, {}))
        try:
            records.append(_record(rel, audio[rel], row, fractions, seed))
        except RowError as exc:
            errors.append(_error(where, line, rel, exc))
    return Prepared(records=records, errors=errors)


def _audio_files(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS:
                continue
            path = base / name
            yield unicodedata.normalize("NFC", path.relative_to(root).as_posix()), path


def _metadata_file(root: Path) -> Path | None:
    found = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise DatasetLayoutError(f"{root} has {' and '.join(p.name for p in found)}: keep exactly one metadata file")
    return found[0] if found else None


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """(line or row number, row) for every row of the metadata file; a RowError for an unreadable one."""
    if path.suffix == ".csv":
        yield from _csv_rows(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _parquet_rows(path)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader, [])]
        except csv.Error as exc:
            raise DatasetLayoutError(f"{path}: line 1: the header cannot be read: {exc}") from None
        _check_columns(path, header)
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DatasetLayoutError(f"{path}: line {start}: cannot be read as CSV: {exc}") from None
            line, start = start, reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(header):
                yield line, RowError("bad_row", f"{len(fields)} fields where the header has {len(header)}")
                continue
            yield line, {h: v.strip() for h, v in zip(header, fields)}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    any_row = any_file_name = False
    with open(path, "rb") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield line, RowError("bad_row", f"not valid JSON: {exc}")
                continue
            if not isinstance(row, dict):
                yield line, RowError("bad_row", f"a JSON {type(row).__name__}, not an object")
                continue
            any_row, any_file_name = True, any_file_name or "file_name" in row
            yield line, row
    if any_row and not any_file_name:
        raise DatasetLayoutError(f"{path} has no file_name field on any line")


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetLayoutError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise DatasetLayoutError(f"{path} cannot be read as parquet: {exc}") from None
    _check_columns(path, table.column_names)
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, row


def _check_columns(path: Path, header: list[str]) -> None:
    if "file_name" not in header:
        raise DatasetLayoutError(f"{path} has no file_name column (its columns: {', '.join(header) or 'none'})")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or "" in header:
        what = f"the column {dupes[0]!r} twice" if dupes else "an empty column name"
        raise DatasetLayoutError(f"{path}: the header has {what}")


def _file_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowError("bad_row", f"no file_name (got {value!r})")
    rel = posixpath.normpath(value.strip().replace("\\", "/"))
    if rel.startswith(("/", "../")) or rel in ("..", "."):
        raise RowError("bad_row", f"file_name {value!r} is not a path inside the folder")
    return unicodedata.normalize("NFC", rel)


def _error(where: str, line: int | None, file_name: str | None, exc: RowError) -> dict:
    ident = make_id(DATASET, file_name) if file_name else make_id(DATASET, Path(where).name, f"line{line}")
    at = f"{where} line {line}" + (f" ({file_name})" if file_name else "")
    error = {"id": ident, "stage": "ingest", "code": exc.code, "reason": f"{at}: {exc}", "metadata_file": where,
             "line": line}
    if file_name:
        error["file_name"] = file_name
    return error


def _record(rel: str, path: Path, row: dict[str, Any], fractions: tuple[float, float], seed: int) -> ClipRecord:
    labels = _labels(row)
    split = _split_value(row.get("split")) or _seeded_split(rel, fractions, seed)
    annotations = {k: v for k, v in row.items() if k not in LABEL_COLUMNS and not _empty(v)}
    annotations["file_name"] = rel
    families = ["understanding", "reasoning"] + (["captioning"] if labels.caption else [])
    return ClipRecord(
        id=make_id(DATASET, rel),
        dataset=DATASET,
        split=split,
        audio_path=str(path.absolute()),
        task_families=families,
        crop_policy="paper",
        annotations=annotations,
        labels=labels.to_dict() or None,
    )


def _labels(row: dict[str, Any]) -> Labels:
    fields: dict[str, Any] = {}
    genre = _list(row.get("genre"), "genre")
    if len(genre) == 1:
        fields["genre"] = genre[0]
    genres = genre + _list(row.get("genres"), "genres")
    for column, field in LIST_COLUMNS.items():
        if field != "genres" and not _empty(row.get(column)):
            fields[field] = fields.get(field, []) + _list(row[column], column)
    if genres:
        fields["genres"] = genres
    if not _empty(row.get("caption")):
        fields["caption"] = str(row["caption"])
    if not _empty(row.get("key")):
        try:
            fields["key"] = normalise_key(str(row["key"]))
        except ValueError as exc:
            raise RowError("bad_row", f"key: {exc}") from None
    tempo = next((row[c] for c in ("tempo_bpm", "tempo", "bpm") if not _empty(row.get(c))), None)
    if tempo is not None:
        fields["tempo_bpm"] = _positive(tempo, "tempo")
    if not _empty(row.get("beats_per_bar")):
        fields["beats_per_bar"] = _beats_per_bar(row["beats_per_bar"], "beats_per_bar")
    elif not _empty(row.get("time_signature")):
        fields["beats_per_bar"] = _beats_per_bar(row["time_signature"], "time_signature")
    language = next((row[c] for c in ("lyrics_language", "language") if not _empty(row.get(c))), None)
    if language is not None:
        fields["lyrics_language"] = str(language)
    try:
        return Labels(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RowError("bad_row", problems) from None


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def _list(value: Any, column: str) -> list[str]:
    if _empty(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise RowError("bad_row", f"{column}: {text!r} is not a JSON list") from None
        else:
            return [v.strip() for v in text.split(";" if ";" in text else ",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise RowError("bad_row", f"{column}: expected a list of words, got {value!r}")
    return [str(v).strip() for v in value if str(v).strip()]


def _positive(value: Any, column: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 < number < 1000:  # also false for NaN
        raise RowError("bad_row", f"{column}: {value!r} is not a positive number of beats per minute")
    return number


def _beats_per_bar(value: Any, column: str) -> int:
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)(?:\s*/\s*\d+)?", text) if not isinstance(value, bool) else None
    if isinstance(value, float) and value.is_integer():
        match = re.fullmatch(r"(\d+)", str(int(value)))
    if not match or not 1 <= int(match.group(1)) <= 32:
        raise RowError("bad_row", f"{column}: {value!r} is not a metre such as 3 or '3/4'")
    return int(match.group(1))


def _split_value(value: Any) -> str | None:
    if _empty(value):
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise RowError("bad_row", f"split: unknown split {value!r} (train, valid, test, validation, val, dev)")
    return split


def _split_fractions(split: str | list) -> tuple[float, float]:
    parts = split if isinstance(split, list) else str(split).split("/")
    try:
        weights = [float(p) for p in parts]
    except (TypeError, ValueError):
        weights = []
    if len(weights) != 3 or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise StageConfigError(f"--set split: expected TRAIN/VALID/TEST weights such as 80/10/10, got {split!r}")
    total = sum(weights)
    return weights[0] / total, (weights[0] + weights[1]) / total


def _seeded_split(rel: str, fractions: tuple[float, float], seed: int) -> str:
    digest = hashlib.sha256(f"{seed}\x1f{rel}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < fractions[0] else "valid" if u < fractions[1] else "test"


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout=LAYOUT,
    description="your own music: a folder of audio files, with optional metadata.csv/.jsonl/.parquet "
    "(Hugging Face audiofolder convention); seeded 80/10/10 split unless a split column says",
)
