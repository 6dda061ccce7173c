"""What a clip looks like to the Q/A writer: one JSON object per clip, built from its record.

``clip_metadata(record)`` returns the object that is sent, as JSON, to the language model (and
that the template writer reads): the dataset's own annotations, chosen and named by its ingest
adapter (``Adapter.prompt_view``) so that every key is described by the dataset's system prompt
(``prompts/fields/<dataset>.txt``); a dataset without a view is described by its annotations less
ids, paths and names, and by its normalised labels. The augmented features follow, under their
contract names::

    tempo_in_beats_per_minute_madmom   float, BPM
    key_madmom                         "F# minor"
    chords_madmom                      [{"start", "end", "chord"}], seconds from the clip start
    beat_grid_madmom                   [{"time", "beat_number"}], seconds from the clip start

Fields that do not help describe the sound are left out: paths, ids, play counts, and the names
of the artist, track and album (the prompts forbid asking about them, and leaving them out keeps
them from leaking into answers). User-written text (FMA's notes) is kept as data, stripped of
HTML and cut to ``prompt_values.MAX_TEXT_CHARS``. Times are rounded to 10 ms.

Any change to what this module produces must bump ``METADATA_FORMAT_VERSION``: it is part of
every prompt version, so cached replies to the old format are not reused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.ingest import find_adapter
from pipeline.prompt_values import clean_text, number, seconds, strings  # noqa: F401  (clean_text: part of this API)

METADATA_FORMAT_VERSION = 2  # 2: datasets without a view of their own are described by their labels
AUGMENTED_FEATURES = (
    "tempo_in_beats_per_minute_madmom",
    "key_madmom",
    "chords_madmom",
    "beat_grid_madmom",
)
EMPTY = (None, "", [], {})


def clip_metadata(record: dict) -> dict[str, Any]:
    """The JSON object describing one clip record (a dict in the clip-record format)."""
    annotations = record.get("annotations") or {}
    adapter = find_adapter(record.get("dataset", ""))
    view = adapter.prompt_view if adapter is not None and adapter.prompt_view is not None else generic_view
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
    tempo = number(features.get("tempo_in_beats_per_minute_madmom"))
    if tempo is not None and tempo > 0:
        out["tempo_in_beats_per_minute_madmom"] = round(tempo, 1)
    key = features.get("key_madmom")
    if isinstance(key, str) and key.strip():
        out["key_madmom"] = key.strip()
    chords = [
        {"start": seconds(c.get("start")), "end": seconds(c.get("end")), "chord": str(c.get("chord"))}
        for c in features.get("chords_madmom") or []
        if isinstance(c, dict) and c.get("chord") is not None and number(c.get("start")) is not None
    ]
    if chords:
        out["chords_madmom"] = chords
    beats = [
        {"time": seconds(b.get("time")), "beat_number": int(b["beat_number"])}
        for b in features.get("beat_grid_madmom") or []
        if isinstance(b, dict) and number(b.get("time")) is not None and number(b.get("beat_number")) is not None
    ]
    if beats:
        out["beat_grid_madmom"] = beats
    return out


# ---------------------------------------------------------------------------------------------
# A dataset without a prompt view of its own


_LEFT_OUT = re.compile(r"(^|_)(id|ids|path|url|audio|file|filename)$|^(title|artist|album|name|file_name|duration|seconds)$")


def generic_view(a: dict) -> dict:
    """Any other dataset: its annotations minus paths, ids, names and durations, one level deep."""
    return {k: v for k, v in a.items() if not _LEFT_OUT.search(k.lower()) and k != "in_clip"}


def labels_view(labels: dict) -> dict:
    """A record's normalised labels (``pipeline.labels.Labels``) under the keys the template writer reads."""
    return {
        "genres": strings(labels.get("genres")) or strings([labels.get("genre")]),
        "tempo_bpm": number(labels.get("tempo_bpm")),
        "key": labels.get("key"),
        "beats_per_bar": labels.get("beats_per_bar"),
        "instruments": strings(labels.get("instruments")),
        "moods": strings(labels.get("moods")),
        "tags": strings(labels.get("tags")),
        "caption": labels.get("caption"),
        "lyrics_language": labels.get("lyrics_language"),
    }


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
