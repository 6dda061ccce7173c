"""What a clip looks like to the Q/A writer: one JSON object per clip, built from its record.

``clip_metadata(record)`` returns the object that is sent, as JSON, to the language model (and
that the template writer reads): the dataset's own annotations, chosen and named per dataset so
that every key is described by the dataset's system prompt (``prompts/fields/<dataset>.txt``),
followed by the augmented features under their contract names::

    tempo_in_beats_per_minute_madmom   float, BPM
    key_madmom                         "F# minor"
    chords_madmom                      [{"start", "end", "chord"}], seconds from the clip start
    beat_grid_madmom                   [{"time", "beat_number"}], seconds from the clip start

Fields that do not help describe the sound are left out: paths, ids, play counts, and the names
of the artist, track and album (the prompts forbid asking about them, and leaving them out keeps
them from leaking into answers). User-written text (FMA's notes) is kept as data, stripped of
HTML and cut to ``MAX_TEXT_CHARS``. Times are rounded to 10 ms.

Any change to what this module produces must bump ``METADATA_FORMAT_VERSION``: it is part of
every prompt version, so cached replies to the old format are not reused.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any, Callable

METADATA_FORMAT_VERSION = 2  # 2: datasets without a view of their own are described by their labels
AUGMENTED_FEATURES = (
    "tempo_in_beats_per_minute_madmom",
    "key_madmom",
    "chords_madmom",
    "beat_grid_madmom",
)
MAX_TEXT_CHARS = 1200
EMPTY = (None, "", [], {})
MAX_NOTES = 600
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clip_metadata(record: dict) -> dict[str, Any]:
    """The JSON object describing one clip record (a dict in the clip-record format)."""
    annotations = record.get("annotations") or {}
    view = DATASET_VIEWS.get(record.get("dataset", ""), generic_view)
    metadata = {k: v for k, v in view(annotations).items() if v not in EMPTY}
    if view is generic_view:
        # A dataset without a view of its own (a researcher's folder) is described by its labels.
        for k, v in labels_view(record.get("labels") or {}).items():
            if v not in EMPTY:
                metadata.setdefault(k, v)
    metadata.update(augmented_features(record.get("features") or {}))
    return metadata


def augmented_features(features: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tempo = _number(features.get("tempo_in_beats_per_minute_madmom"))
    if tempo is not None and tempo > 0:
        out["tempo_in_beats_per_minute_madmom"] = round(tempo, 1)
    key = features.get("key_madmom")
    if isinstance(key, str) and key.strip():
        out["key_madmom"] = key.strip()
    chords = [
        {"start": _seconds(c.get("start")), "end": _seconds(c.get("end")), "chord": str(c.get("chord"))}
        for c in features.get("chords_madmom") or []
        if isinstance(c, dict) and c.get("chord") is not None and _number(c.get("start")) is not None
    ]
    if chords:
        out["chords_madmom"] = chords
    beats = [
        {"time": _seconds(b.get("time")), "beat_number": int(b["beat_number"])}
        for b in features.get("beat_grid_madmom") or []
        if isinstance(b, dict) and _number(b.get("time")) is not None and _number(b.get("beat_number")) is not None
    ]
    if beats:
        out["beat_grid_madmom"] = beats
    return out


# ---------------------------------------------------------------------------------------------
# One view per dataset: annotations -> the keys its prompt describes


def fma_view(a: dict) -> dict:
    track, album, artist = (a.get(g) or {} for g in ("track", "album", "artist"))
    return {
        "track.genre_top": track.get("genre_top"),
        "track.genres": _strings(track.get("genres")),
        "track.genres_all": _strings(track.get("genres_all")),
        "track.tags": _strings(track.get("tags")),
        "track.information": clean_text(track.get("information")),
        "track.language_code": track.get("language_code"),
        "album.information": clean_text(album.get("information")),
        "album.tags": _strings(album.get("tags")),
        "artist.tags": _strings(artist.get("tags")),
    }


def mtg_jamendo_view(a: dict) -> dict:
    return {"genres": _strings(a.get("genres")), "instruments": _strings(a.get("instruments")),
            "moods": _strings(a.get("moods"))}


def magnatagatune_view(a: dict) -> dict:
    return {"tags": _strings(a.get("tags"))}


def musicnet_view(a: dict) -> dict:
    in_clip = a.get("in_clip") or {}
    out = {k: a.get(k) for k in ("composer", "composition", "movement", "ensemble")}
    out["instruments"] = _strings(in_clip.get("instruments") if in_clip else a.get("instruments"))
    notes, listed_until = notes_by_instrument(in_clip.get("notes") or [])
    out["notes"] = notes
    out["notes_listed_until_s"] = listed_until
    return out


def demo_view(a: dict) -> dict:
    instruments = a.get("instruments")
    if isinstance(instruments, str):
        instruments = [i for i in instruments.split(";") if i]
    return {
        "genre": a.get("genre"),
        "tempo_bpm": _number(a.get("tempo_bpm")),
        "key": a.get("key"),
        "metre": a.get("metre"),
        "instruments": [readable_name(i) for i in _strings(instruments)],
        "progression": a.get("progression"),
    }


def caption_view(a: dict) -> dict:
    return {"caption": a.get("caption")}


_LEFT_OUT = re.compile(r"(^|_)(id|ids|path|url|audio|file|filename)$|^(title|artist|album|name|file_name|duration|seconds)$")


def generic_view(a: dict) -> dict:
    """Any other dataset: its annotations minus paths, ids, names and durations, one level deep."""
    return {k: v for k, v in a.items() if not _LEFT_OUT.search(k.lower()) and k != "in_clip"}


def labels_view(labels: dict) -> dict:
    """A record's normalised labels (``pipeline.labels.Labels``) under the keys the template writer reads."""
    return {
        "genres": _strings(labels.get("genres")) or _strings([labels.get("genre")]),
        "tempo_bpm": _number(labels.get("tempo_bpm")),
        "key": labels.get("key"),
        "beats_per_bar": labels.get("beats_per_bar"),
        "instruments": _strings(labels.get("instruments")),
        "moods": _strings(labels.get("moods")),
        "tags": _strings(labels.get("tags")),
        "caption": labels.get("caption"),
        "lyrics_language": labels.get("lyrics_language"),
    }


DATASET_VIEWS: dict[str, Callable[[dict], dict]] = {
    "fma": fma_view,
    "mtg_jamendo": mtg_jamendo_view,
    "magnatagatune": magnatagatune_view,
    "musicnet": musicnet_view,
    "demo": demo_view,
    "musiccaps": caption_view,
    "yt8m_musictextclips": caption_view,
}


# ---------------------------------------------------------------------------------------------
# Helpers


def notes_by_instrument(notes: list[dict], limit: int = MAX_NOTES) -> tuple[dict[str, list[dict]], float | None]:
    """MusicNet's window notes grouped by instrument, as ``{"start", "end", "pitch"}``.

    When there are more than ``limit`` notes, only those starting before the onset of note
    ``limit + 1`` are kept, and that onset is returned (else None), so the listing is a complete
    prefix of the excerpt rather than a sample of it.
    """
    usable = [n for n in notes if isinstance(n, dict) and _number(n.get("start_s")) is not None]
    usable.sort(key=lambda n: (n["start_s"], n.get("note", 0)))
    listed_until = None
    if len(usable) > limit:
        listed_until = _seconds(usable[limit]["start_s"])
        usable = [n for n in usable if _seconds(n["start_s"]) < listed_until]
    grouped: dict[str, list[dict]] = {}
    for n in usable:
        grouped.setdefault(str(n.get("instrument", "unknown")), []).append(
            {"start": _seconds(n["start_s"]), "end": _seconds(n.get("end_s", n["start_s"])),
             "pitch": pitch_name(n.get("note"))}
        )
    return grouped, listed_until


def pitch_name(midi: Any) -> str:
    """MIDI note number -> name with octave, middle C (60) = 'C4'."""
    number = _number(midi)
    if number is None:
        return str(midi)
    n = int(round(number))
    return f"{NOTE_NAMES[n % 12]}{n // 12 - 1}"


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


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value else None  # NaN is no number
    return None


def _seconds(value: Any) -> float:
    return round(float(value), 2)


_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


def identifier_like_keys(metadata: Any) -> set[str]:
    """Keys (at any depth) that read as field names rather than words: ``track.genre_top``,
    ``beat_number``, and their dotted parts that contain an underscore (``genre_top``).
    ``metadata`` is the JSON object, or its text."""
    text = metadata if isinstance(metadata, str) else json.dumps(metadata, ensure_ascii=False)
    found: set[str] = set()
    for key in set(_JSON_KEY.findall(text)):
        if "_" in key or "." in key or "/" in key:
            found.add(key)
            found.update(p for p in key.split(".") if "_" in p)
    return found
