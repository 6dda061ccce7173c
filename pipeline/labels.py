"""A clip's labels, normalised: what a dataset knows about a clip, in one shape for every dataset.

Each ingest adapter turns its dataset's own annotations (kept as given under ``annotations``) into
a ``Labels`` block; prompts, templates and evaluation read the block, so they never need to know
which dataset a clip came from. Every field is optional: a dataset gives what it has.

- ``genre``: the one genre label a dataset's classification uses (GTZAN's, the demo's style);
  ``genres``: every genre the dataset gives (FMA's genre list, MTG-Jamendo's genre tags).
- ``tags``, ``moods``: free tags and mood or theme words, as the dataset spells them.
- ``instruments``: the instruments heard, in ``instrument_vocabulary``'s names (e.g. ``musicnet``,
  ``general_midi``, ``demo``, or the dataset's own tag set); after cropping, those heard in the clip.
- ``key`` (``"<Tonic> major|minor"``), ``tempo_bpm``, ``beats_per_bar``, ``caption``,
  ``lyrics_language`` (an ISO 639 code).
- ``beats``: beat times in seconds from the clip start (set once the clip is cut).
- ``complete``: which of ``genres``, ``instruments``, ``moods``, ``tags`` list everything there is
  (MusicNet's instruments are exhaustive; MagnaTagATune's tags are not).
- ``vocabularies``: the label set a dataset's evaluation scores against, per field (e.g.
  ``{"genre": [GTZAN's ten]}``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

LIST_FIELDS = ("genres", "tags", "moods", "instruments")

_TONICS = {"c": "C", "d": "D", "e": "E", "f": "F", "g": "G", "a": "A", "b": "B"}
_KEY = re.compile(r"^\s*([A-Ga-g])\s*([#♯b♭]|sharp|flat)?\s*[:\s-]?\s*(major|minor|maj|min|m)?\s*$", re.I)


def normalise_key(value: Any) -> str | None:
    """``"<Tonic> major|minor"`` from common spellings (``"eb minor"``, ``"F#:min"``, ``"Am"``,
    ``"C"``); None for an empty value; ValueError for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValueError(f"a key must be text such as 'Eb minor', got {value!r}")
    match = _KEY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a key such as 'Eb minor' or 'F# major'")
    tonic, accidental, mode = match.groups()
    accidental = (accidental or "").lower()
    accidental = {"♯": "#", "sharp": "#", "♭": "b", "flat": "b"}.get(accidental, accidental)
    mode = "minor" if (mode or "").lower() in ("minor", "min", "m") else "major"
    return f"{_TONICS[tonic.lower()]}{accidental} {mode}"


def _unique(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        v = " ".join(str(v).split())
        if v and v not in out:
            out.append(v)
    return out


class Labels(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    genre: str | None = None
    genres: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    moods: list[str] = Field(default_factory=list)
    instruments: list[str] | None = None
    instrument_vocabulary: str | None = None
    key: str | None = None
    tempo_bpm: float | None = Field(default=None, gt=0, lt=1000)
    beats_per_bar: int | None = Field(default=None, ge=1, le=32)
    caption: str | None = None
    beats: list[float] | None = None
    lyrics_language: str | None = None
    complete: list[Literal["genres", "instruments", "moods", "tags"]] = Field(default_factory=list)
    vocabularies: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("genres", "tags", "moods", "complete")
    @classmethod
    def _dedupe(cls, value: list[str]) -> list[str]:
        return _unique(value)

    @field_validator("instruments")
    @classmethod
    def _dedupe_instruments(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _unique(value)

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, value: Any) -> str | None:
        return normalise_key(value)

    @field_validator("genre", "caption", "lyrics_language", "instrument_vocabulary")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("beats")
    @classmethod
    def _beats(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(b < 0 for b in value):
            raise ValueError("beat times must be >= 0 s")
        return None if value is None else sorted(round(float(b), 6) for b in value)

    @classmethod
    def lenient(cls, **fields: Any) -> "Labels":
        """The labels of ``fields`` that are valid: a dataset's odd value (a 0 BPM tempo, an unreadable
        key) is left out rather than failing the record; None and empty values are dropped."""
        fields = {k: v for k, v in fields.items() if v is not None}
        while True:
            try:
                return cls(**fields)
            except ValidationError as exc:
                bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
                if not bad & set(fields):
                    raise
                fields = {k: v for k, v in fields.items() if k not in bad}

    def is_empty(self) -> bool:
        return not self.model_dump(exclude_defaults=True)

    def to_dict(self) -> dict[str, Any]:
        """The fields that hold something (what records store)."""
        return self.model_dump(mode="json", exclude_defaults=True)
