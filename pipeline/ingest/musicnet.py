"""MusicNet (Thickstun et al., 2017), https://zenodo.org/records/5120004

Expected layout under ``root`` (``musicnet.tar.gz`` and ``musicnet_metadata.csv`` unpacked side
by side; the ``musicnet/`` level may be left out)::

    musicnet_metadata.csv             id, composer, composition, movement, ensemble, source,
                                      transcriber, catalog_name, seconds
    musicnet/train_data/1727.wav      audio
    musicnet/train_labels/1727.csv    note labels
    musicnet/test_data/, musicnet/test_labels/

A labels file has the columns ``start_time, end_time, instrument, note, start_beat, end_beat,
note_value``: times are sample indices at 44.1 kHz, ``instrument`` is a General MIDI program
number counted from 1, ``note`` a MIDI note number. The split is the official one, the folder a
recording's labels are in (§G.8). (The paper used the realigned MIDI of MusicNet-EM for its
captions; this adapter reads the labels shipped with MusicNet.)

Each train recording gives two records: ``musicnet-<id>`` (one crop by the paper's rule; feeds
understanding and reasoning) and ``musicnet-<id>-captioning`` (every 25 s window; feeds
captioning, as the paper captions all crops of the train split). A test recording gives one
record with no task family. ``window_annotations`` returns the notes sounding in a window.
"""

from __future__ import annotations

import copy
import csv
import functools
import os
from pathlib import Path
from typing import Any

from pipeline.ingest import Adapter, DatasetLayoutError
from pipeline.ingest.common import Skipped, heard, parse_number, read_table
from pipeline.labels import Labels
from pipeline.prompt_values import notes_by_instrument, strings
from pipeline.records import ClipRecord, make_id

DATASET = "musicnet"
SAMPLE_RATE = 44100
METADATA_COLUMNS = ("composer", "composition", "movement", "ensemble", "source", "transcriber", "catalog_name")

# General MIDI programs, counted from 1, of the instruments MusicNet labels.
INSTRUMENTS = {
    1: "piano",
    7: "harpsichord",
    41: "violin",
    42: "viola",
    43: "cello",
    44: "contrabass",
    61: "french horn",
    69: "oboe",
    71: "bassoon",
    72: "clarinet",
    74: "flute",
}


def instrument_name(program: int) -> str:
    return INSTRUMENTS.get(program, f"general midi program {program}")


def prepare(root: Path) -> list[ClipRecord]:
    root = Path(root)
    metadata = root / "musicnet_metadata.csv"
    base = root / "musicnet" if (root / "musicnet").is_dir() else root
    label_dirs = {split: base / f"{split}_labels" for split in ("train", "test")}
    if not any(d.is_dir() for d in label_dirs.values()):
        raise DatasetLayoutError(
            f"MusicNet labels not found: expected {label_dirs['train']} and {label_dirs['test']}"
        )
    skipped = Skipped(DATASET)
    records: list[tuple[int, ClipRecord]] = []
    seen: set[int] = set()
    for row in read_table(metadata, "MusicNet metadata", required=("id",)):
        try:
            rec_id = int(row["id"])
        except ValueError:
            skipped.add("without an id")
            continue
        if rec_id in seen:
            skipped.add("with a repeated id")
            continue
        seen.add(rec_id)
        split = next((s for s, d in label_dirs.items() if (d / f"{rec_id}.csv").is_file()), None)
        if split is None:
            skipped.add("without a labels file in train_labels or test_labels")
            continue
        labels_path = (label_dirs[split] / f"{rec_id}.csv").absolute()
        try:
            notes = _read_notes(str(labels_path), os.path.getmtime(labels_path))
            seconds = parse_number(row["seconds"]) if row.get("seconds") else None
        except (ValueError, KeyError):
            skipped.add("with an unreadable labels file or duration")
            continue
        annotations: dict[str, Any] = {"id": rec_id}
        annotations.update({k: row[k] for k in METADATA_COLUMNS if row.get(k)})
        if seconds is not None:
            annotations["seconds"] = int(seconds) if seconds.is_integer() else seconds
        annotations["instruments"] = sorted({instrument_name(n["program"]) for n in notes})
        annotations["note_count"] = len(notes)
        annotations["labels_path"] = str(labels_path)
        common = dict(
            dataset=DATASET,
            split=split,
            audio_path=str((base / f"{split}_data" / f"{rec_id}.wav").absolute()),
            source_duration_s=seconds if seconds and seconds > 0 else None,
        )
        if split == "train":
            records.append((rec_id, ClipRecord(
                id=make_id(DATASET, rec_id), task_families=["understanding", "reasoning"],
                crop_policy="paper", annotations=annotations, **common)))
            records.append((rec_id, ClipRecord(
                id=make_id(DATASET, rec_id, "captioning"), task_families=["captioning"],
                crop_policy="all_windows", annotations=copy.deepcopy(annotations), **common)))
        else:
            records.append((rec_id, ClipRecord(
                id=make_id(DATASET, rec_id), task_families=[], crop_policy="paper",
                annotations=annotations, **common)))
    skipped.report()
    records.sort(key=lambda pair: (pair[0], pair[1].id))
    return [record for _, record in records]


@functools.lru_cache(maxsize=8)
def _read_notes(path: str, mtime: float) -> tuple[dict[str, Any], ...]:
    """The notes of one labels file, times in seconds; ValueError on a malformed line.

    Cached (keyed on the file's modification time) because the crop stage asks for many windows
    of the same recording one after the other.
    """
    notes = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                notes.append({
                    "start_s": int(row["start_time"]) / SAMPLE_RATE,
                    "end_s": int(row["end_time"]) / SAMPLE_RATE,
                    "program": int(row["instrument"]),
                    "note": int(row["note"]),
                    "start_beat": parse_number(row["start_beat"]),
                    "end_beat": parse_number(row["end_beat"]),
                    "note_value": (row.get("note_value") or "").strip(),
                })
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: line {len(notes) + 2} is not a MusicNet label") from None
    notes.sort(key=lambda n: (n["start_s"], n["note"], n["program"]))
    return tuple(notes)


def window_annotations(record: ClipRecord, start_s: float, end_s: float) -> dict[str, Any]:
    """The notes sounding in ``[start_s, end_s)`` of the recording and their instruments.

    Note times are seconds relative to ``start_s``, clipped to the window.
    """
    path = record.annotations.get("labels_path")
    if not path:
        raise ValueError(f"record {record.id} has no labels_path in its annotations")
    notes = _read_notes(path, os.path.getmtime(path))
    length = end_s - start_s
    out = []
    for n in notes:
        if n["start_s"] >= end_s:
            break  # notes are sorted by start
        if n["end_s"] <= start_s:
            continue
        out.append({
            "start_s": round(max(n["start_s"] - start_s, 0.0), 3),
            "end_s": round(min(n["end_s"] - start_s, length), 3),
            "instrument": instrument_name(n["program"]),
            "note": n["note"],
            "note_value": n["note_value"],
            "start_beat": n["start_beat"],
            "end_beat": n["end_beat"],
        })
    return {"notes": out, "instruments": sorted({n["instrument"] for n in out})}


def labels(record: ClipRecord) -> Labels:
    """The instruments playing (in the clip's window once it is cut); MusicNet's labels are exhaustive."""
    return Labels.lenient(instruments=heard(record.annotations, "instruments"), instrument_vocabulary="musicnet",
                  complete=["instruments"])


def prompt_view(a: dict) -> dict:
    """The work, the instruments heard and every note of the clip's window, by instrument."""
    in_clip = a.get("in_clip") or {}
    out = {k: a.get(k) for k in ("composer", "composition", "movement", "ensemble")}
    out["instruments"] = strings(in_clip.get("instruments") if in_clip else a.get("instruments"))
    notes, listed_until = notes_by_instrument(in_clip.get("notes") or [])
    out["notes"] = notes
    out["notes_listed_until_s"] = listed_until
    return out


ADAPTER = Adapter(
    name=DATASET,
    prepare=prepare,
    layout="musicnet_metadata.csv, musicnet/{train,test}_data/{id}.wav, musicnet/{train,test}_labels/{id}.csv",
    description="MusicNet: classical recordings with note-level labels (instrument, pitch, beat); "
    "official train/test split; train recordings also captioned window by window",
    window_annotations=window_annotations,
    labels=labels,
    prompt_view=prompt_view,
    lists_every_instrument=True,
)
