"""Helpers shared by the dataset adapters: reading metadata tables, parsing their values,
finding audio files, and reporting the rows an adapter had to skip.

Parsers raise ``ValueError`` on a bad value; an adapter catches it, counts the row under a
reason in a ``Skipped`` and logs one warning line at the end of its run.
"""

from __future__ import annotations

import ast
import csv
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from pipeline.ingest import DatasetLayoutError, require
from pipeline.records import make_id

log = logging.getLogger("llark")

# The extensions soundfile (libsndfile >= 1.1) decodes, in the order they are preferred.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")

# Some metadata fields (FMA's biographies, for one) are far longer than csv's 128 KiB default.
csv.field_size_limit(2**31 - 1)


def open_text(path: Path, what: str) -> TextIO:
    """Open a metadata file for the csv module; DatasetLayoutError naming ``path`` if it is missing.

    A UTF-8 byte-order mark is dropped and undecodable bytes become U+FFFD, so one stray byte
    in a dataset's text does not stop the whole run.
    """
    require(path, what)
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def read_table(
    path: Path, what: str, *, delimiter: str = ",", required: Iterable[str] = ()
) -> Iterator[dict[str, str]]:
    """Yield the rows of a delimited table with a one-line header as dicts of stripped strings.

    Raises DatasetLayoutError when the file is missing or its header lacks a ``required`` column.
    Missing trailing fields read as ``""``.
    """
    with open_text(path, what) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, restval="")
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetLayoutError(
                f"{what} {path} has no column {', '.join(repr(c) for c in missing)} "
                f"(its header: {', '.join(header) or 'empty'})"
            )
        reader.fieldnames = header
        for row in reader:
            yield {k: (v or "").strip() for k, v in row.items() if k is not None}


def parse_number(text: str) -> float:
    """A finite float from ``text``; ValueError for empty, non-numeric, NaN or infinite values."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def parse_literal_list(text: str) -> list[Any]:
    """A list from a Python-literal string such as ``"[21, 811]"`` or ``"['rock', 'pop']"``.

    Uses ``ast.literal_eval`` (never ``eval``); an empty string is an empty list. ValueError when
    the text is not a literal list or tuple.
    """
    text = text.strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"not a literal list: {text[:80]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"not a literal list: {text[:80]!r}")
    return list(value)


def parse_bool(text: str) -> bool:
    """``True``/``False`` in any case (also ``1``/``0``); ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_window(start: str, end: str) -> tuple[float, float]:
    """A ``(start_s, end_s)`` window in seconds; ValueError unless ``0 <= start < end``."""
    start_s, end_s = parse_number(start), parse_number(end)
    if start_s < 0 or end_s <= start_s:
        raise ValueError(f"not a window: [{start}, {end})")
    return start_s, end_s


_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_youtube_id(text: str) -> bool:
    """Whether ``text`` looks like a YouTube video id (so it is also safe as a file name stem)."""
    return bool(_YOUTUBE_ID.match(text))


def find_audio(directory: Path, stem: str, extensions: Iterable[str] = AUDIO_EXTENSIONS) -> Path:
    """The file ``directory/stem.<ext>`` for the first extension that exists.

    When none exists, the path with the first extension is returned, so the ingest command
    reports that file as missing.
    """
    extensions = tuple(extensions)
    for ext in extensions:
        candidate = directory / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return directory / f"{stem}{extensions[0]}"


def occurrence_ids(dataset: str, native_ids: Iterable[str]) -> list[str]:
    """Record ids for native ids that may repeat: the first occurrence gets ``make_id(dataset, x)``,
    the k-th (k >= 2) ``make_id(dataset, x, k)``, counted in the order given."""
    seen: Counter[str] = Counter()
    ids = []
    for native in native_ids:
        seen[native] += 1
        k = seen[native]
        ids.append(make_id(dataset, native) if k == 1 else make_id(dataset, native, k))
    return ids


class Skipped:
    """Counts the rows an adapter skipped, by reason, and logs them in one warning line."""

    def __init__(self, dataset: str, unit: str = "rows"):
        self.dataset = dataset
        self.unit = unit
        self.reasons: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self.reasons[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def report(self) -> None:
        if not self.reasons:
            return
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        log.warning("%s: skipped %d %s (%s)", self.dataset, self.total, self.unit, parts)


def heard(annotations: dict, key: str):
    """``key`` of the window a clip holds (``in_clip``, written by the crop stage), else the track's."""
    in_clip = annotations.get("in_clip") or {}
    return in_clip.get(key) if key in in_clip else annotations.get(key)


def caption_view(annotations: dict) -> dict:
    """The prompt view of a captioned dataset: its caption only."""
    return {"caption": annotations.get("caption")}
