"""Annotation values as prompts and the template writer show them: lists of strings, user-written
text without HTML, note listings with pitch names, times rounded to 10 ms.

The ingest adapters use these to choose what their dataset's prompt describes (``Adapter.prompt_view``)
and the instruction stage to build the rest of the prompt's JSON, so both write values one way.
"""

from __future__ import annotations

import html
import re
from typing import Any, Iterable

MAX_TEXT_CHARS = 1200
MAX_NOTES = 600
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def strings(value: Any) -> list[str]:
    """A string or a list of values as a list of non-empty stripped strings; anything else is []."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def number(value: Any) -> float | None:
    """An int or float as a float; None for anything else, booleans and NaN included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value else None  # NaN is no number
    return None


def seconds(value: Any) -> float:
    return round(float(value), 2)


def unique_words(items: Iterable[Any]) -> list[str]:
    """The non-empty strings of ``items``, stripped, without repeats ignoring case, in order."""
    seen, out = set(), []
    for item in items:
        if isinstance(item, str) and item.strip() and item.strip().lower() not in seen:
            seen.add(item.strip().lower())
            out.append(item.strip())
    return out


def clean_text(value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
    """User-written text without HTML, whitespace collapsed, cut at a word boundary."""
    if not isinstance(value, str):
        return None
    text = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", value))).strip()
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text or None


def readable_name(value: str) -> str:
    return str(value).replace("_", " ").strip()


def pitch_name(midi: Any) -> str:
    """MIDI note number -> name with octave, middle C (60) = 'C4'."""
    n = number(midi)
    if n is None:
        return str(midi)
    n = int(round(n))
    return f"{NOTE_NAMES[n % 12]}{n // 12 - 1}"


def notes_by_instrument(notes: list[dict], limit: int = MAX_NOTES) -> tuple[dict[str, list[dict]], float | None]:
    """Window notes (``{"start_s", "end_s", "note", "instrument"}``) grouped by instrument, as
    ``{"start", "end", "pitch"}``.

    When there are more than ``limit`` notes, only those starting before the onset of note
    ``limit + 1`` are kept, and that onset is returned (else None), so the listing is a complete
    prefix of the excerpt rather than a sample of it.
    """
    usable = [n for n in notes if isinstance(n, dict) and number(n.get("start_s")) is not None]
    usable.sort(key=lambda n: (n["start_s"], n.get("note", 0)))
    listed_until = None
    if len(usable) > limit:
        listed_until = seconds(usable[limit]["start_s"])
        usable = [n for n in usable if seconds(n["start_s"]) < listed_until]
    grouped: dict[str, list[dict]] = {}
    for n in usable:
        grouped.setdefault(str(n.get("instrument", "unknown")), []).append(
            {"start": seconds(n["start_s"]), "end": seconds(n.get("end_s", n["start_s"])),
             "pitch": pitch_name(n.get("note"))}
        )
    return grouped, listed_until
