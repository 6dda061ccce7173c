"""The synthetic demo dataset written by ``pipeline.demo_data`` (``llark demo-data``).

Every clip becomes one record whose annotations are the exact ground truth the clip was rendered
from: genre, tempo, key, metre, instruments, chord progression, and the beat and chord timelines.

All splits carry the task families ``["understanding", "reasoning"]``: the held-out splits are
for evaluation, but they are built the same way so that evaluation questions can be generated
from them with the same templates; which split feeds training is decided downstream by ``split``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.ingest import Adapter, DatasetLayoutError, require
from pipeline.labels import Labels
from pipeline.prompt_values import number, readable_name, strings
from pipeline.records import ClipRecord, InvalidRecord, check_id

DATASET = "demo"
TASK_FAMILIES = ["understanding", "reasoning"]
REQUIRED_COLUMNS = ("id", "split", "genre", "tempo_bpm", "key", "tonic", "mode", "metre",
                    "beats_per_bar", "instruments", "progression", "duration_s", "audio")
# Fields copied from the annotation JSON next to the metadata row.
TIMELINE_FIELDS = ("beats", "chords", "sections")

LAYOUT = """\
ROOT/metadata.csv           id, split, genre, tempo_bpm, key, tonic, mode, metre, beats_per_bar,
                            instruments (';'-separated), progression, duration_s, audio
ROOT/annotations/{id}.json  beats [{time, beat_number}], chords [{start, end, chord}]
ROOT/audio/{split}/{id}.flac
ROOT/long_tracks.csv        (optional; read with include_long=True) full-length tracks"""


def prepare(root: str | Path, include_long: bool = False, **_options: Any) -> list[ClipRecord]:
    """Read the demo dataset under ``root``; with ``include_long`` also its full-length tracks."""
    root = Path(root)
    records = _read_table(root, require(root / "metadata.csv", "demo metadata"))
    if include_long:
        records += _read_table(root, require(root / "long_tracks.csv", "demo long-track metadata"))
    return records


def _read_table(root: Path, table: Path) -> list[ClipRecord]:
    with table.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayoutError(f"{table} lacks the columns {', '.join(missing)}")
        return [_record(root, table, line, row) for line, row in enumerate(reader, start=2)]


def _record(root: Path, table: Path, line: int, row: dict[str, str]) -> ClipRecord:
    try:
        ident = check_id(row["id"])
    except InvalidRecord as exc:
        raise DatasetLayoutError(f"{table}: line {line}: {exc}") from None
    audio = require(root / row["audio"], f"audio of {ident}")
    doc = json.loads(require(root / "annotations" / f"{ident}.json", f"annotations of {ident}")
                     .read_text(encoding="utf-8"))
    annotations: dict[str, Any] = {
        "genre": row["genre"],
        "tempo_bpm": float(row["tempo_bpm"]),
        "key": row["key"],
        "tonic": row["tonic"],
        "mode": row["mode"],
        "metre": row["metre"],
        "beats_per_bar": int(row["beats_per_bar"]),
        "instruments": [i for i in row["instruments"].split(";") if i],
        "progression": row["progression"],
        "synthetic": True,
    }
    annotations.update({k: doc[k] for k in TIMELINE_FIELDS if k in doc})
    return ClipRecord(
        id=ident,
        dataset=DATASET,
        split=row["split"],
        audio_path=str(audio.resolve()),
        task_families=list(TASK_FAMILIES),
        crop_policy="paper",
        source_duration_s=float(row["duration_s"]),
        annotations=annotations,
    )


def window_annotations(record: ClipRecord, start_s: float, end_s: float) -> dict[str, Any]:
    """The record's annotations for ``[start_s, end_s)``, with times relative to ``start_s``."""
    ann = dict(record.annotations)
    if "beats" in ann:
        ann["beats"] = [{**b, "time": round(b["time"] - start_s, 6)}
                        for b in ann["beats"] if start_s <= b["time"] < end_s]
    for name in ("chords", "sections"):
        if name in ann:
            ann[name] = [{**seg, "start": round(max(seg["start"], start_s) - start_s, 6),
                          "end": round(min(seg["end"], end_s) - start_s, 6)}
                         for seg in ann[name] if seg["end"] > start_s and seg["start"] < end_s]
    return ann


def labels(record: ClipRecord) -> Labels:
    """The exact ground truth; beats once the clip is cut (``in_clip``, times from the clip start)."""
    from pipeline.demo_data import STYLES

    a = record.annotations
    in_clip = a.get("in_clip") or {}
    beats = [b["time"] for b in in_clip.get("beats") or []] if "beats" in in_clip else None
    return Labels.lenient(genre=a.get("genre"), genres=[a["genre"]] if a.get("genre") else [],
                  instruments=a.get("instruments"), instrument_vocabulary="demo", key=a.get("key"),
                  tempo_bpm=a.get("tempo_bpm"), beats_per_bar=a.get("beats_per_bar"), beats=beats,
                  complete=["genres", "instruments"], vocabularies={"genre": [s.name for s in STYLES]})


def prompt_view(a: dict) -> dict:
    instruments = a.get("instruments")
    if isinstance(instruments, str):
        instruments = [i for i in instruments.split(";") if i]
    return {
        "genre": a.get("genre"),
        "tempo_bpm": number(a.get("tempo_bpm")),
        "key": a.get("key"),
        "metre": a.get("metre"),
        "instruments": [readable_name(i) for i in strings(instruments)],
        "progression": a.get("progression"),
    }


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout=LAYOUT,
    description="synthetic demo clips with exact tempo, key, metre, chord, beat and genre labels "
    "(made by `llark demo-data`; no download)",
    window_annotations=window_annotations,
    labels=labels,
    prompt_view=prompt_view,
    lists_every_instrument=True,
)
