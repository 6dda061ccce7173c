"""Clip records as the ingest, crop and augment stages write them, and a way to run the
instructions stage on them against the local server, for the instructions tests."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.instructions.run import InstructionsConfig, run_instructions
from pipeline.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]

FEATURES = {
    "tempo_in_beats_per_minute_madmom": 121.3,
    "key_madmom": "F# minor",
    "chords_madmom": [
        {"start": 0.0, "end": 1.98, "chord": "F# minor"},
        {"start": 1.98, "end": 3.96, "chord": "D major"},
        {"start": 3.96, "end": 5.94, "chord": "A major"},
        {"start": 5.94, "end": 7.92, "chord": "E major"},
        {"start": 7.92, "end": 9.9, "chord": "F# minor"},
    ],
    "beat_grid_madmom": [{"time": round(0.1 + 0.4946 * k, 3), "beat_number": k % 4 + 1} for k in range(20)],
}


def annotations(dataset: str, n: int) -> dict:
    if dataset == "fma":
        return {"track_id": n, "track": {"title": f"Song {n}", "genre_top": "Hip-Hop", "genres": ["Hip-Hop", "Lo-Fi"],
                                         "genres_all": ["Hip-Hop", "Lo-Fi", "Electronic"], "genre_ids": [21, 2],
                                         "tags": ["chill beats", "lofi", "http://spam.example"],
                                         "information": "<p>Recorded at home &amp; mixed on a laptop.</p>",
                                         "language_code": "en", "duration": 168, "listens": 1293},
                "album": {"title": "Night Drive", "information": "<p>Second album.</p>", "tags": ["instrumental"]},
                "artist": {"name": "DJ Example", "tags": ["producer"], "bio": "A producer from Lyon."}}
    if dataset == "mtg_jamendo":
        return {"track_id": f"track_{n:07d}", "artist_id": "artist_1", "album_id": "album_1", "path": f"14/{n}.mp3",
                "duration": 210.0, "tags": ["genre---hiphop", "instrument---electricguitar", "mood/theme---film"],
                "genres": ["hiphop", "poprock"], "instruments": ["electricguitar", "drummachine", "voice"],
                "moods": ["energetic", "film"]}
    if dataset == "magnatagatune":
        return {"clip_id": n, "mp3_path": f"f/clip-{n}.mp3", "title": "Sonata", "artist": "Ensemble X",
                "tags": ["classical", "strings", "violin", "slow", "no vocals", "harpsichord"]}
    if dataset == "musicnet":
        notes = []
        for k in range(12):
            notes.append({"start_s": 0.5 * k, "end_s": 0.5 * k + 0.45, "instrument": "piano", "note": 60 + k % 7,
                          "note_value": "Quarter", "start_beat": k, "end_beat": k + 1})
        for k in range(6):
            notes.append({"start_s": 2.0 + k, "end_s": 2.9 + k, "instrument": "violin", "note": 76 + k % 3,
                          "note_value": "Half", "start_beat": 4 + 2 * k, "end_beat": 6 + 2 * k})
        return {"id": 1700 + n, "composer": "Schubert", "composition": "Piano Trio in B-flat major",
                "movement": "2. Andante", "ensemble": "Piano Trio", "seconds": 447,
                "instruments": ["piano", "violin", "cello"], "note_count": 5000,
                "labels_path": f"/data/musicnet/train_labels/{1700 + n}.csv",
                "in_clip": {"notes": notes, "instruments": ["piano", "violin"]}}
    if dataset == "musiccaps":
        return {"ytid": f"yt{n:09d}", "caption": f"A mellow jazz trio plays a slow ballad, take {n}.",
                "aspect_list": ["jazz", "mellow"], "audioset_positive_labels": ["/m/04rlf"], "is_audioset_eval": False}
    if dataset == "yt8m_musictextclips":
        return {"video_id": f"vid{n:08d}", "caption": f"Upbeat pop with synths and a female singer, clip {n}.",
                "original_split": "train"}
    if dataset == "demo":
        return {"genre": "waltz", "tempo_bpm": 112.0, "key": "D major", "tonic": "D", "mode": "major", "metre": "3/4",
                "beats_per_bar": 3, "instruments": ["piano", "strings", "synth_lead"], "progression": "I-IV-V-I",
                "duration_s": 15.0, "audio": f"audio/train/demo-{n:05d}.flac"}
    return {"label": "something", "audio_path_hint": "x"}


FAMILIES = {
    "fma": ["understanding", "reasoning"], "mtg_jamendo": ["understanding", "reasoning"],
    "magnatagatune": ["understanding", "reasoning"], "musicnet": ["understanding", "reasoning"],
    "musiccaps": ["captioning"], "yt8m_musictextclips": ["captioning"],
    "demo": ["understanding", "captioning", "reasoning"],
}


def clip(dataset: str, n: int = 1, features: bool = True, **overrides) -> dict:
    record = {
        "id": f"{dataset.replace('_', '')}-{n:06d}", "dataset": dataset, "split": "train",
        "audio_path": f"/data/{dataset}/{n}.wav", "task_families": FAMILIES.get(dataset, ["understanding"]),
        "crop_policy": "paper", "start_s": 0.0, "end_s": 25.0, "clip_path": f"/runs/clips/{dataset}/{n}.wav",
        "annotations": annotations(dataset, n), "features": dict(FEATURES) if features else {},
    }
    if dataset == "musicnet" and overrides.pop("captioning", False):
        record["id"] += "-captioning-w000"
        record["task_families"] = ["captioning"]
    record.update(overrides)
    return record


def write_clips(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def every_dataset(n: int = 1) -> list[dict]:
    out = []
    for dataset in ("fma", "mtg_jamendo", "magnatagatune", "musicnet", "musiccaps", "yt8m_musictextclips", "demo"):
        out.append(clip(dataset, n))
    out.append(clip("musicnet", n, captioning=True))
    return out


# ---------------------------------------------------------------------------------------------
# Running the stage against the local server

KEY = "sk-test-4f9c2b7e1d8a6035"


def marked(n: int, marker: str, families=("understanding",)) -> dict:
    """An MTG-Jamendo clip whose JSON carries ``marker`` (the server steers its answer by it)."""
    record = clip("mtg_jamendo", n, task_families=list(families))
    record["annotations"] = {**record["annotations"], "moods": ["energetic", marker]}
    return record


def run(tmp_path, server, clips, environ=None, **options):
    """Run the stage (the openai writer unless ``options`` say otherwise) on ``clips`` against
    ``server``; return (failed items, printed lines)."""
    inp = write_clips(tmp_path / "clips.jsonl", clips)
    lines: list[str] = []
    config = dict(input=inp, output=tmp_path / "out.jsonl", backend="openai", base_url=server.base_url,
                  concurrency=4, request_timeout_s=5.0, backoff_base_s=0.05, max_attempts=4, progress=False)
    config.update(options)
    failed = run_instructions(InstructionsConfig(**config), environ={"OPENAI_API_KEY": KEY} if environ is None else environ,
                              say=lines.append)
    return failed, lines


def errors(tmp_path) -> dict[str, dict]:
    return {e["id"]: e for e in read_jsonl(tmp_path / "out.errors.jsonl")}
