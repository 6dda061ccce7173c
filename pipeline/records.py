"""Clip records: the contract between the offline stages.

A clip record is one JSON object per line. It says where the source audio is, which window of it
the model hears, the dataset's own annotations exactly as the dataset gave them (under
``annotations``), and, once a stage has estimated them, features named after their estimator
(under ``features``). Every time in ``features`` is in seconds relative to the start of the clip::

    source audio  |-------------------------------------------------------------|
    clip window                      |======== start_s .. end_s ========|
    feature times                    0 s ........................ (end_s - start_s) s

Record ids are used as file names (clip wavs, embeddings, shard keys), so they are restricted to
``[A-Za-z0-9_-]`` plus inner dots-free separators: no ``/``, no ``..``, no NUL, no leading dot and
no dot at all (webdataset cuts a sample key at its first dot).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import files
from pipeline.errors import InvalidRecord  # noqa: F401 (raised here, imported from here by many)

SPLITS = ("train", "valid", "test")
TASK_FAMILIES = ("understanding", "captioning", "reasoning")
CROP_POLICIES = ("paper", "all_windows", "given")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


def check_id(value: str) -> str:
    """Return ``value`` if it is a safe record id, else raise ``InvalidRecord`` naming the problem."""
    if not isinstance(value, str) or not value:
        raise InvalidRecord(f"record id must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise InvalidRecord(f"record id {value!r} contains a NUL byte")
    if "/" in value or "\\" in value or ".." in value:
        raise InvalidRecord(f"record id {value!r} contains a path separator or '..'")
    if value.startswith("."):
        raise InvalidRecord(f"record id {value!r} starts with a dot")
    if not _SAFE_ID.match(value):
        raise InvalidRecord(
            f"record id {value!r} must be 1-200 characters of letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def make_id(dataset: str, *parts: Any) -> str:
    """Build a stable, safe record id from a dataset name and the dataset's own identifiers.

    Characters outside ``[A-Za-z0-9_-]`` become ``_``. When that replacement loses information
    (two different source names could map to the same id) a short hash of the original parts is
    appended, so distinct sources never collide and the same source always gets the same id.
    """
    raw = [dataset, *(str(p) for p in parts)]
    cleaned = [_UNSAFE_RUN.sub("_", p).strip("_") or "x" for p in raw]
    ident = "-".join(cleaned)
    if any(c != r for c, r in zip(cleaned, raw)) or len(ident) > 180:
        digest = hashlib.sha1("\x1f".join(raw).encode("utf-8")).hexdigest()[:8]
        ident = f"{ident[:180]}-{digest}"
    return check_id(ident)


class ClipRecord(BaseModel):
    """One clip of one track: where it comes from, its window, its annotations and features."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str
    dataset: str
    split: Literal["train", "valid", "test"]
    audio_path: str = Field(description="the source audio file, as found in the dataset")
    task_families: list[Literal["understanding", "captioning", "reasoning"]] = Field(
        default_factory=list,
        description="the instruction task families this clip feeds (empty for evaluation sets)",
    )
    crop_policy: Literal["paper", "all_windows", "given"] = Field(
        default="paper",
        description="how the crop stage chooses the window: the paper's rule, every consecutive "
        "window (MusicNet captioning), or the window given in start_s/end_s (MusicCaps)",
    )
    start_s: float | None = Field(default=None, ge=0, description="window start in the source")
    end_s: float | None = Field(default=None, gt=0, description="window end in the source")
    source_duration_s: float | None = Field(default=None, ge=0)
    source_id: str | None = Field(
        default=None, description="the id of the record this clip was cut from, when one of many"
    )
    clip_path: str | None = Field(default=None, description="the cropped 44.1 kHz 16-bit wav")
    annotations: dict[str, Any] = Field(
        default_factory=dict, description="the dataset's own annotations, kept as given"
    )
    features: dict[str, Any] = Field(
        default_factory=dict,
        description="estimated features, each named after its estimator; times relative to the clip",
    )
    labels: dict[str, Any] | None = Field(
        default=None,
        description="what the dataset knows of the clip, normalised (pipeline.labels.Labels); absent in "
        "records written before labels existed (pipeline.ingest.labels_of derives them)",
    )

    @field_validator("id", "source_id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        return value if value is None else check_id(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from pipeline.labels import Labels

        if value is None:
            return None
        return Labels.model_validate(value).to_dict() or None

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9_]+$", value):
            raise ValueError(f"dataset name {value!r} must be lower-case letters, digits and '_'")
        return value

    @field_validator("task_families")
    @classmethod
    def _unique_families(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"task_families has duplicates: {value}")
        return value

    @model_validator(mode="after")
    def _window(self) -> "ClipRecord":
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        if self.crop_policy == "given" and (self.start_s is None or self.end_s is None):
            raise ValueError("crop_policy 'given' needs start_s and end_s")
        return self

    @property
    def duration_s(self) -> float | None:
        if self.start_s is None or self.end_s is None:
            return None
        return self.end_s - self.start_s

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False)


def parse_record(line_or_obj: str | dict) -> ClipRecord:
    """Validate one JSONL line (or decoded object) as a clip record; raise InvalidRecord if it is not."""
    try:
        obj = json.loads(line_or_obj) if isinstance(line_or_obj, str) else line_or_obj
        return ClipRecord.model_validate(obj)
    except InvalidRecord:
        raise
    except Exception as exc:  # json.JSONDecodeError, pydantic.ValidationError
        raise InvalidRecord(f"not a valid clip record: {_short(exc)}") from None


def _short(exc: Exception, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# JSONL files


class JsonlLine(BaseModel):
    """A line of a JSONL file: its 1-based number and either the decoded object or why not."""

    number: int
    obj: dict[str, Any] | None = None
    error: str | None = None


def iter_jsonl(path: str | os.PathLike) -> Iterator[JsonlLine]:
    """Yield every non-blank line of a JSONL file, decoded, or with the reason it could not be.

    A line cut in half (no trailing newline and not valid JSON) is reported like any other bad
    line; the caller decides whether that is an error record or the torn tail of a killed writer.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield JsonlLine(number=number, error=f"line {number} is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}")
                continue
            if not isinstance(obj, dict):
                yield JsonlLine(number=number, error=f"line {number} is a JSON {type(obj).__name__}, not an object")
                continue
            yield JsonlLine(number=number, obj=obj)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a whole JSONL file; any bad line raises ValueError naming the file and line."""
    out = []
    for line in iter_jsonl(path):
        if line.error:
            raise ValueError(f"{path}: {line.error}")
        out.append(line.obj)
    return out


def read_records(path: str | os.PathLike) -> list[ClipRecord]:
    """Read and validate a clip-record JSONL file; a bad line raises naming the file and line."""
    records = []
    for line in iter_jsonl(path):
        if line.error:
            raise InvalidRecord(f"{path}: {line.error}")
        try:
            records.append(parse_record(line.obj))
        except InvalidRecord as exc:
            raise InvalidRecord(f"{path}: line {line.number}: {exc}") from None
    return records


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict | BaseModel]) -> int:
    """Write rows to ``path`` atomically (``pipeline.files.write_jsonl``); return the count."""
    return files.write_jsonl(path, rows)


def to_json_line(row: dict | BaseModel) -> str:
    return files.json_line(row)
