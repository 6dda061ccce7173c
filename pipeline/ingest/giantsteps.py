"""GiantSteps Key and GiantSteps Tempo: two evaluation sets of 2-minute Beatport previews (EDM).

Knees, Faraldo, Herrera, Vogl, Böck, Hörschläger, Le Goff, "Two data sets for tempo estimation and
key detection in electronic dance music annotated from user corrections", ISMIR 2015. The 'v2'
tempo labels are from Schreiber & Müller, "A Crowdsourced Experiment for Tempo Estimation of
Electronic Dance Music", ISMIR 2018.

- https://github.com/GiantSteps/giantsteps-key-dataset (604 tracks)
- https://github.com/GiantSteps/giantsteps-tempo-dataset (664 tracks)

The audio is not in the repositories; their ``audio_dl.sh`` fetches it from Beatport. Expected
layout (a clone of the repository with the audio downloaded into it)::

    giantsteps-key-dataset/
        audio/{id}.LOFI.mp3                 (or .wav after the repository's convert_audio.sh)
        annotations/key/{id}.LOFI.key       one line, e.g. "Eb minor" (flats, lower-case mode)
        annotations/genre/{id}.LOFI.genre   optional, e.g. "progressive-house"

    giantsteps-tempo-dataset/
        audio/{id}.LOFI.mp3
        annotations_v2/tempo/{id}.LOFI.bpm  v2 labels, one number, e.g. "174.0"
        annotations/tempo/{id}.LOFI.bpm     v1 labels, e.g. "171.419"
        annotations/genre/{id}.LOFI.genre   optional

Both are evaluation sets: every record is in the "test" split and feeds no instruction task. The
paper (G.3) uses the v2 tempo labels and drops the three tracks whose v2 tempo is 0 BPM (the
tempo repository's README names them: 3041381, 3041383, 1327052).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.ingest import Adapter, DatasetLayoutError, require
from pipeline.ingest.common import Skipped, find_audio
from pipeline.labels import Labels
from pipeline.records import ClipRecord, make_id

AUDIO_EXTENSIONS = (".mp3", ".wav")
TEMPO_LABEL_DIRS = {"v2": "annotations_v2/tempo", "v1": "annotations/tempo"}

# mir_eval.key accepts these tonic spellings (case-insensitive); the others are respelled.
_TONICS = {"c", "c#", "db", "d", "d#", "eb", "e", "f", "f#", "gb", "g", "g#", "ab", "a", "a#", "bb", "b"}
_RESPELL = {"cb": "b", "fb": "e", "e#": "f", "b#": "c"}
_KEY = re.compile(r"^\s*([A-Ga-g][#b]?)\s+(major|minor)\s*$", re.IGNORECASE)


def mir_eval_key(label: str) -> str:
    """``label`` (e.g. ``"eb MINOR"``) as a mir_eval key string (``"Eb minor"``); ValueError if it
    is not a tonic and a major/minor mode."""
    match = _KEY.match(label)
    if not match:
        raise ValueError(f"not a key: {label!r}")
    tonic, mode = match.group(1).lower(), match.group(2).lower()
    tonic = _RESPELL.get(tonic, tonic)
    if tonic not in _TONICS:
        raise ValueError(f"not a key: {label!r}")
    return f"{tonic[0].upper()}{tonic[1:]} {mode}"


def _read_label(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _track_ids(label_dir: Path, label_suffix: str, audio_dir: Path) -> list[str]:
    """The ids of every track with a label file or an audio file.

    A track with a label but no audio still gets a record: the ingest stage reports its audio as
    missing. A track with audio but no label is counted as skipped by the caller.
    """
    ids = {p.name[: -len(label_suffix)] for p in label_dir.glob(f"*{label_suffix}")}
    for ext in AUDIO_EXTENSIONS:
        ids.update(p.name[: -len(f".LOFI{ext}")] for p in audio_dir.glob(f"*.LOFI{ext}"))
    return sorted(i for i in ids if i and not i.startswith("."))


def _genre(root: Path, track: str) -> str | None:
    path = root / "annotations" / "genre" / f"{track}.LOFI.genre"
    if not path.is_file():
        return None
    return _read_label(path) or None


def _record(dataset: str, root: Path, audio_dir: Path, track: str, annotations: dict) -> ClipRecord:
    genre = _genre(root, track)
    if genre is not None:
        annotations["genre"] = genre
    audio = find_audio(audio_dir, f"{track}.LOFI", AUDIO_EXTENSIONS)
    return ClipRecord(
        id=make_id(dataset, track),
        dataset=dataset,
        split="test",
        audio_path=str(audio.resolve()),
        task_families=[],
        crop_policy="paper",
        annotations=annotations,
    )


def prepare_key(root: str | Path) -> list[ClipRecord]:
    """Read GiantSteps Key under ``root``: one test record per track with a readable key label."""
    root = Path(root)
    audio_dir = require(root / "audio", "GiantSteps Key audio folder")
    label_dir = require(root / "annotations" / "key", "GiantSteps Key annotation folder")
    skipped = Skipped("giantsteps_key", unit="tracks")
    records = []
    for track in _track_ids(label_dir, ".LOFI.key", audio_dir):
        path = label_dir / f"{track}.LOFI.key"
        if not path.is_file():
            skipped.add("without a key label")
            continue
        label = _read_label(path)
        try:
            normalised = mir_eval_key(label)
        except ValueError:
            skipped.add("with an unreadable key label")
            continue
        records.append(_record("giantsteps_key", root, audio_dir, track,
                               {"key": label, "key_mir_eval": normalised}))
    skipped.report()
    return sorted(records, key=lambda r: r.id)


def prepare_tempo(root: str | Path, labels: str = "v2") -> list[ClipRecord]:
    """Read GiantSteps Tempo under ``root`` with the ``labels`` tempo annotations ("v2", the
    paper's choice, or "v1"); tracks labelled 0 BPM are dropped."""
    if labels not in TEMPO_LABEL_DIRS:
        # DatasetLayoutError so that `llark ingest --set labels=...` reports it without a traceback.
        raise DatasetLayoutError(
            f"labels must be 'v2' (annotations_v2/tempo) or 'v1' (annotations/tempo), got {labels!r}"
        )
    root = Path(root)
    audio_dir = require(root / "audio", "GiantSteps Tempo audio folder")
    label_dir = require(root / TEMPO_LABEL_DIRS[labels], f"GiantSteps Tempo {labels} tempo folder")
    skipped = Skipped("giantsteps_tempo", unit="tracks")
    records = []
    for track in _track_ids(label_dir, ".LOFI.bpm", audio_dir):
        path = label_dir / f"{track}.LOFI.bpm"
        if not path.is_file():
            skipped.add(f"without a {labels} tempo label")
            continue
        text = _read_label(path)
        try:
            bpm = float(text.split()[0]) if text else float("nan")
        except ValueError:
            bpm = float("nan")
        if bpm == 0:
            skipped.add("labelled 0 BPM")
            continue
        if not 0 < bpm < float("inf"):
            skipped.add(f"with an unreadable {labels} tempo label")
            continue
        records.append(_record("giantsteps_tempo", root, audio_dir, track,
                               {"tempo_bpm": bpm, "tempo_labels": labels}))
    skipped.report()
    return sorted(records, key=lambda r: r.id)


def labels(record: ClipRecord) -> Labels:
    a = record.annotations
    genre = a.get("genre")
    return Labels.lenient(key=a.get("key_mir_eval"), tempo_bpm=a.get("tempo_bpm"), genres=[genre] if genre else [])


ADAPTERS = {
    "giantsteps_key": Adapter(
        name="giantsteps_key",
        prepare=prepare_key,
        layout="audio/{id}.LOFI.mp3, annotations/key/{id}.LOFI.key (e.g. 'Eb minor'), "
        "optional annotations/genre/{id}.LOFI.genre",
        description="GiantSteps Key (604 EDM previews, key labels): evaluation, test split",
        labels=labels,
    ),
    "giantsteps_tempo": Adapter(
        name="giantsteps_tempo",
        prepare=prepare_tempo,
        layout="audio/{id}.LOFI.mp3, annotations_v2/tempo/{id}.LOFI.bpm (labels=v2, default) or "
        "annotations/tempo/{id}.LOFI.bpm (labels=v1), optional annotations/genre/{id}.LOFI.genre",
        description="GiantSteps Tempo (664 EDM previews, tempo labels; 0 BPM tracks dropped): "
        "evaluation, test split",
        labels=labels,
    ),
}
