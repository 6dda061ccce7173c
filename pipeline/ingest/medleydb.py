"""MedleyDB: multitrack recordings with per-stem instrument labels and activation confidences.

Bittner, Salamon, Tierney, Mauch, Cannam, Bello, "MedleyDB: A Multitrack Dataset for
Annotation-Intensive MIR Research", ISMIR 2014 (v1: 122 tracks); Bittner et al., "MedleyDB 2.0",
ISMIR 2016 late-breaking (v2: 74 more). https://medleydb.weebly.com

Expected layout (the release as unpacked; the metadata may also come from the ``medleydb``
package's ``data/Metadata`` folder copied to ``Metadata/``)::

    Audio/{Track}/{Track}_MIX.wav
    Audio/{Track}/{Track}_METADATA.yaml     or  Metadata/{Track}_METADATA.yaml
    Annotations/Instrument_Activations/ACTIVATION_CONF/{Track}_ACTIVATION_CONF.lab
                                            or  Annotations/{Track}_ANNOTATIONS/{Track}_ACTIVATION_CONF.lab

``{Track}_METADATA.yaml`` holds ``artist``, ``title``, ``genre``, ``instrumental`` ('yes'/'no')
and ``stems: {S01: {instrument, component, filename, raw: {R01: ...}}}``; a stem's ``instrument``
is one taxonomy name or, in v2 metadata, a list of them. The activation file is a CSV with the
header ``time,S01,S02,...``: one row every 2048 samples at 44.1 kHz (46.4 ms), one confidence in
[0, 1] per stem.

Instruments are mapped to General MIDI instrument families as the LLark paper does for MedleyDB
(section D.1.4): instruments with no General MIDI program (yangqin, guzheng, ...) are ignored,
guitar-like instruments (lap steel guitar, mandolin) count as guitar, and drums and vocals are
each one instrument. Every record is in the "test" split.
"""

from __future__ import annotations

import csv
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.ingest import Adapter, require
from pipeline.ingest.common import Skipped, heard
from pipeline.labels import Labels
from pipeline.records import ClipRecord, make_id

log = logging.getLogger("llark")

ACTIVE_CONFIDENCE = 0.5

# MedleyDB taxonomy name (v1 taxonomy.yaml, plus names seen in v2 metadata) -> General MIDI
# family, with "drums" (the percussion key map of channel 10, i.e. every unpitched percussion
# sound) and "vocals" kept apart. None: no General MIDI program, or no instrument at all; these
# are ignored, as the paper ignores yangqin and guzheng.
GM_FAMILY: dict[str, str | None] = {
    # strings: bowed
    "violin": "strings", "viola": "strings", "cello": "strings",
    "double bass": "bass",  # GM 33 Acoustic Bass; in MedleyDB it mostly plays the bass line
    "violin section": "ensemble", "viola section": "ensemble", "cello section": "ensemble",
    "string section": "ensemble",
    "erhu": None,
    # strings: plucked
    "acoustic guitar": "guitar", "slide guitar": "guitar", "lap steel guitar": "guitar",
    "mandolin": "guitar", "ukulele": "guitar",
    "banjo": "ethnic", "sitar": "ethnic",  # GM 106, 105
    "harp": "strings",  # GM 47 Orchestral Harp
    "harpsichord": "piano",  # GM 7
    "guzheng": None, "liuqin": None, "zhongruan": None, "oud": None,
    # strings: struck
    "piano": "piano", "tack piano": "piano",
    "dulcimer": "chromatic percussion",  # GM 16
    "yangqin": None,
    # winds: flutes
    "flute": "pipe", "flute section": "pipe", "piccolo": "pipe", "panpipes": "pipe",
    "recorder": "pipe", "whistle": "pipe",  # GM 79 Whistle
    "dizi": None, "bamboo flute": None,
    # winds: reeds
    "alto saxophone": "reed", "baritone saxophone": "reed", "tenor saxophone": "reed",
    "soprano saxophone": "reed", "clarinet": "reed", "bass clarinet": "reed",
    "clarinet section": "reed", "oboe": "reed", "english horn": "reed", "bassoon": "reed",
    "bagpipe": "ethnic",  # GM 110
    # winds: brass
    "trumpet": "brass", "cornet": "brass", "trombone": "brass", "french horn": "brass",
    "euphonium": "brass", "tuba": "brass", "brass section": "brass",
    "french horn section": "brass", "trombone section": "brass", "horn section": "brass",
    "trumpet section": "brass",
    # winds: free reeds (GM puts accordion and harmonica in the organ family)
    "harmonica": "organ", "concertina": "organ", "accordion": "organ", "bandoneon": "organ",
    "harmonium": "organ", "pipe organ": "organ", "melodica": "organ",
    # voices
    "male singer": "vocals", "female singer": "vocals", "male speaker": "vocals",
    "female speaker": "vocals", "male rapper": "vocals", "female rapper": "vocals",
    "vocalists": "vocals", "choir": "vocals", "beatboxing": "vocals",
    "crowd": "sound effects",  # GM 127 Applause
    # percussion: pitched idiophones
    "xylophone": "chromatic percussion", "vibraphone": "chromatic percussion",
    "marimba": "chromatic percussion", "glockenspiel": "chromatic percussion",
    "chimes": "chromatic percussion",  # GM 15 Tubular Bells
    "timpani": "strings",  # GM 48 is in the strings family
    # percussion: unpitched, all one "drums" instrument
    "drum set": "drums", "kick drum": "drums", "bass drum": "drums", "snare drum": "drums",
    "toms": "drums", "high hat": "drums", "cymbal": "drums", "gong": "drums",
    "tambourine": "drums", "bongo": "drums", "conga": "drums", "cowbell": "drums",
    "cabasa": "drums", "guiro": "drums", "maracas": "drums", "shaker": "drums",
    "triangle": "drums", "claps": "drums", "castanet": "drums", "rattle": "drums",
    "sleigh bells": "drums", "auxiliary percussion": "drums", "drum machine": "drums",
    "gu": None, "darbuka": None, "doumbek": None, "tabla": None,
    # electric
    "clean electric guitar": "guitar", "distorted electric guitar": "guitar",
    "electric bass": "bass", "electric piano": "piano", "electronic organ": "organ",
    "synthesizer": "synth pad",  # see _SYNTH_BY_COMPONENT
    "theremin": "synth lead",
    "fx/processed sound": "synth effects",
    "scratches": "sound effects",
    "sampler": None,  # a tool, not a sound
    "main system": None, "unlabeled": None,
}

# MedleyDB says only "synthesizer"; its stem component tells the lead and bass lines apart.
_SYNTH_BY_COMPONENT = {"melody": "synth lead", "bass": "bass"}


def instrument_family(name: Any, component: str = "") -> str | None:
    """The General MIDI family of one MedleyDB instrument name (None when it has none or the
    name is unknown)."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if key == "synthesizer" and component in _SYNTH_BY_COMPONENT:
        return _SYNTH_BY_COMPONENT[component]
    return GM_FAMILY.get(key)


def _instrument_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _yes_no(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower() == "yes"
    return value


def _metadata_path(root: Path, track: str) -> Path | None:
    for path in (root / "Metadata" / f"{track}_METADATA.yaml",
                 root / "Audio" / track / f"{track}_METADATA.yaml"):
        if path.is_file():
            return path
    return None


def _activation_path(root: Path, track: str) -> Path | None:
    name = f"{track}_ACTIVATION_CONF.lab"
    for path in (root / "Annotations" / "Instrument_Activations" / "ACTIVATION_CONF" / name,
                 root / "Annotations" / f"{track}_ANNOTATIONS" / name):
        if path.is_file():
            return path
    return None


def _activation_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    header = [h.strip() for h in header]
    if len(header) < 2 or header[0] != "time":
        raise ValueError(f"{path}: header is not 'time,S01,...'")
    return header


def _stems(metadata: dict, unmapped: set[str]) -> dict[str, dict]:
    stems = {}
    raw_stems = metadata.get("stems") or {}
    for stem_id in sorted(raw_stems, key=str):
        entry = raw_stems[stem_id] if isinstance(raw_stems[stem_id], dict) else {}
        component = entry.get("component") or ""
        instrument = entry.get("instrument")
        families = []
        for name in _instrument_names(instrument):
            family = instrument_family(name, component)
            if name.strip().lower() not in GM_FAMILY:
                unmapped.add(name)
            if family is not None and family not in families:
                families.append(family)
        stems[str(stem_id)] = {
            "instrument": instrument,
            # A stem has one instrument name but for a few v2 stems (e.g. ['male singer',
            # 'vocalists']); "family" is the first one's, "families" all of them.
            "family": families[0] if families else None,
            "families": families,
            "component": component,
        }
    return stems


def prepare(root: str | Path) -> list[ClipRecord]:
    """Read MedleyDB under ``root``: one test record per track folder in ``Audio/``."""
    root = Path(root)
    audio_dir = require(root / "Audio", "MedleyDB audio folder")
    skipped = Skipped("medleydb", unit="tracks")
    unmapped: set[str] = set()
    bad_activations: list[str] = []
    records = []
    for track_dir in sorted(p for p in audio_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        track = track_dir.name
        meta_path = _metadata_path(root, track)
        if meta_path is None:
            skipped.add("without a METADATA.yaml")
            continue
        try:
            with open(meta_path, encoding="utf-8") as fh:
                metadata = yaml.safe_load(fh)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            metadata = None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("stems"), dict):
            skipped.add("with an unreadable METADATA.yaml")
            continue
        stems = _stems(metadata, unmapped)
        annotations: dict[str, Any] = {
            "artist": metadata.get("artist"),
            "title": metadata.get("title"),
            "genre": metadata.get("genre"),
            "instrumental": _yes_no(metadata.get("instrumental")),
            "stems": stems,
            "instrument_families": sorted({f for s in stems.values() for f in s["families"]}),
        }
        activation = _activation_path(root, track)
        if activation is not None:
            try:
                _activation_header(activation)
                annotations["activation_path"] = str(activation.resolve())
            except (OSError, UnicodeDecodeError, ValueError):
                bad_activations.append(track)
        records.append(
            ClipRecord(
                id=make_id("medleydb", track),
                dataset="medleydb",
                split="test",
                audio_path=str((track_dir / f"{track}_MIX.wav").resolve()),
                task_families=[],
                crop_policy="paper",
                annotations=annotations,
            )
        )
    skipped.report()
    if bad_activations:
        log.warning("medleydb: %d unreadable ACTIVATION_CONF.lab files ignored (those tracks use their "
                    "track-level instruments in every window): %s",
                    len(bad_activations), ", ".join(bad_activations))
    if unmapped:
        log.warning("medleydb: %d instrument names have no General MIDI family and are ignored: %s",
                    len(unmapped), ", ".join(sorted(unmapped)))
    return sorted(records, key=lambda r: r.id)


@lru_cache(maxsize=8)
def _read_activations(path: str, mtime_ns: int) -> tuple[list[str], list[float], list[list[float]]]:
    """(stem ids, times, rows of confidences) of one ACTIVATION_CONF.lab; cached per file version."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if len(header) < 2 or header[0] != "time":
            raise ValueError(f"{path}: header is not 'time,S01,...'")
        times, rows = [], []
        for number, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}: line {number} has {len(row)} fields, the header {len(header)}")
            try:
                values = [float(v) for v in row]
            except ValueError:
                raise ValueError(f"{path}: line {number} is not numeric") from None
            times.append(values[0])
            rows.append(values[1:])
    return header[1:], times, rows


def window_annotations(record: ClipRecord, start_s: float, end_s: float) -> dict[str, Any]:
    """The instrument families active in ``[start_s, end_s)`` of the source.

    A stem is active when its activation confidence reaches 0.5 at any frame in the window (the
    frame nearest the window's middle when the window holds no frame). A stem with no column in
    the activation file counts as active. Without an activation file, the track's families.
    """
    annotations = record.annotations
    path = annotations.get("activation_path")
    if not path:
        return {"instrument_families": list(annotations.get("instrument_families", []))}
    columns, times, rows = _read_activations(path, os.stat(path).st_mtime_ns)
    picked = [i for i, t in enumerate(times) if start_s <= t < end_s]
    if not picked and times:
        middle = (start_s + end_s) / 2
        picked = [min(range(len(times)), key=lambda i: abs(times[i] - middle))]
    index = {stem: i for i, stem in enumerate(columns)}
    families = set()
    for stem_id, stem in annotations.get("stems", {}).items():
        col = index.get(stem_id)
        if col is None or any(rows[i][col] >= ACTIVE_CONFIDENCE for i in picked):
            families.update(stem.get("families", []))
    return {"instrument_families": sorted(families)}


def labels(record: ClipRecord) -> Labels:
    """Genre, and the General MIDI families playing (in the clip's window once it is cut)."""
    a = record.annotations
    genre = a.get("genre") if isinstance(a.get("genre"), str) else None
    return Labels.lenient(genre=genre, genres=[genre] if genre else [], instruments=heard(a, "instrument_families"),
                  instrument_vocabulary="general_midi", complete=["instruments"])


ADAPTER = Adapter(
    name="medleydb",
    prepare=prepare,
    layout="Audio/{Track}/{Track}_MIX.wav, Audio/{Track}/{Track}_METADATA.yaml (or "
    "Metadata/{Track}_METADATA.yaml), optional Annotations/Instrument_Activations/"
    "ACTIVATION_CONF/{Track}_ACTIVATION_CONF.lab",
    description="MedleyDB multitracks (genre; instruments as General MIDI families, active per "
    "window from the activation confidences): evaluation, test split",
    window_annotations=window_annotations,
    labels=labels,
)
