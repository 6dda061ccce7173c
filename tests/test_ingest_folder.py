"""`llark ingest folder`: a researcher's own folder of audio, with optional audiofolder metadata;
and the folder's records through every later stage to a few training steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import tiny_lm_dir, train_env  # noqa: E402

from pipeline.ingest import get_adapter  # noqa: E402
from pipeline.ingest.folder import prepare  # noqa: E402
from pipeline.ingest.run import ingest_dataset  # noqa: E402
from pipeline.records import make_id, read_jsonl, read_records  # noqa: E402
from pipeline.runner import StageConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tone(path: Path, seconds: float = 0.2, sr: int = 8000, freq: float = 440.0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), sr, format=fmt)
    return path


def folder(root: Path) -> Path:
    for rel in ("a.wav", "rock/b.flac", "rock/live/c.ogg", "jazz/d.aiff", "e.WAV", ".hidden.wav",
                ".cache/f.wav", "notes/readme.txt"):
        if rel.endswith(".txt"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("not audio")
        else:
            tone(root / rel)
    return root


def ingest(root: Path, out: Path, **options) -> tuple[list, list[dict]]:
    ingest_dataset("folder", root, out / "ingested.jsonl", options)
    return read_records(out / "ingested.jsonl"), read_jsonl(out / "ingested.errors.jsonl")


def by_name(records) -> dict:
    return {r.annotations["file_name"]: r for r in records}


def test_nested_folder_without_metadata(tmp_path):
    records, errors = ingest(folder(tmp_path / "music"), tmp_path / "out")
    names = by_name(records)
    assert sorted(names) == ["a.wav", "e.WAV", "jazz/d.aiff", "rock/b.flac", "rock/live/c.ogg"]
    assert errors == []
    c = names["rock/live/c.ogg"]
    assert c.id == make_id("folder", "rock/live/c.ogg") and c.dataset == "folder"
    assert c.audio_path == str((tmp_path / "music" / "rock" / "live" / "c.ogg").absolute())
    assert c.labels is None and c.crop_policy == "paper" and c.annotations == {"file_name": "rock/live/c.ogg"}
    assert all(r.task_families == ["understanding", "reasoning"] for r in records)
    assert "folder" in get_adapter("folder").name


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_labels_splits_and_other_columns(tmp_path):
    root = folder(tmp_path / "music")
    write_csv(root / "metadata.csv",
              "file_name,genre,moods,instruments,tags,caption,key,bpm,time_signature,language,split,artist,rating\n"
              'a.wav,rock,"happy; calm","[""guitar"", ""drums""]","loud,live",A loud song.,F#:min,121.5,3/4,en,'
              "validation,Me,5\n"
              'rock/b.flac,"rock, blues",,,,,Eb,90,,,train,,\n'
              "jazz/d.aiff,,,,,,,,,,dev,,\n"
              "rock/live/c.ogg,,,,,,,,,,TEST,,\n")
    records, errors = ingest(root, tmp_path / "out")
    assert errors == []
    n = by_name(records)
    a = n["a.wav"]
    assert a.split == "valid" and a.labels == {
        "genre": "rock", "genres": ["rock"], "moods": ["happy", "calm"], "instruments": ["guitar", "drums"],
        "tags": ["loud", "live"], "caption": "A loud song.", "key": "F# minor", "tempo_bpm": 121.5,
        "beats_per_bar": 3, "lyrics_language": "en"}
    assert a.annotations == {"file_name": "a.wav", "artist": "Me", "rating": "5"}
    assert a.task_families == ["understanding", "reasoning", "captioning"]
    b = n["rock/b.flac"]
    assert b.split == "train" and b.labels == {"genres": ["rock", "blues"], "key": "Eb major", "tempo_bpm": 90.0}
    assert (n["jazz/d.aiff"].split, n["rock/live/c.ogg"].split) == ("valid", "test")
    assert n["e.WAV"].labels is None  # no row: still ingested


def test_jsonl_and_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"file_name": "a.wav", "genres": ["jazz", "funk"], "tempo": 100, "beats_per_bar": 4, "split": "test",
             "mood": "sad", "extra": {"x": 1}},
            {"file_name": "rock/b.flac", "genre": "rock", "key": "C", "instruments": "piano;bass"}]
    root = folder(tmp_path / "j")
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    jsonl = by_name(ingest(root, tmp_path / "oj")[0])
    assert jsonl["a.wav"].labels == {"genres": ["jazz", "funk"], "moods": ["sad"], "tempo_bpm": 100.0,
                                     "beats_per_bar": 4}
    assert jsonl["a.wav"].split == "test" and jsonl["a.wav"].annotations["extra"] == {"x": 1}
    assert jsonl["rock/b.flac"].labels == {"genre": "rock", "genres": ["rock"], "key": "C major",
                                           "instruments": ["piano", "bass"]}

    root = folder(tmp_path / "p")
    table = pa.table({"file_name": ["a.wav", "rock/b.flac"], "genres": [["jazz", "funk"], []],
                      "tempo": [100.0, None], "split": ["test", None], "year": [1999, 2001]})
    pq.write_table(table, root / "metadata.parquet")
    parquet = by_name(ingest(root, tmp_path / "op")[0])
    assert parquet["a.wav"].labels == {"genres": ["jazz", "funk"], "tempo_bpm": 100.0}
    assert parquet["a.wav"].split == "test" and parquet["a.wav"].annotations == {"file_name": "a.wav", "year": 1999}
    assert parquet["rock/b.flac"].labels is None and parquet["rock/b.flac"].annotations["year"] == 2001


def test_bad_rows_become_error_records_and_the_run_goes_on(tmp_path):
    root = folder(tmp_path / "music")
    write_csv(root / "metadata.csv",
              "file_name,tempo,key,split\n"
              "a.wav,120,,\n"
              "gone.wav,,,\n"              # line 3: no such file
              "rock/b.flac,-4,,\n"         # line 4: tempo not positive
              "jazz/d.aiff,,H major,\n"    # line 5: no such key
              "e.WAV,,,holdout\n"          # line 6: unknown split
              "rock/live/c.ogg,,,\n"       # lines 7 and 8: the same file twice
              "./rock/live/c.ogg,,,\n"
              ",,,\n")
    (root / "metadata.csv").write_text((root / "metadata.csv").read_text() + ",90,,\n")  # line 10: no file_name
    records, errors = ingest(root, tmp_path / "out")
    assert sorted(by_name(records)) == ["a.wav"]
    got = {(e["code"], e["line"]): e for e in errors}
    assert sorted(got) == [("bad_row", 4), ("bad_row", 5), ("bad_row", 6), ("bad_row", 10),
                           ("duplicate_file_name", 7), ("missing_audio", 3)]
    for e in errors:
        assert str(root / "metadata.csv") in e["reason"] and f"line {e['line']}" in e["reason"]
        assert e["stage"] == "ingest"
    assert "gone.wav" in got[("missing_audio", 3)]["reason"]
    assert "tempo" in got[("bad_row", 4)]["reason"] and got[("bad_row", 4)]["id"] == make_id("folder", "rock/b.flac")
    assert "'H major'" in got[("bad_row", 5)]["reason"]
    assert "holdout" in got[("bad_row", 6)]["reason"]
    assert "lines 7, 8" in got[("duplicate_file_name", 7)]["reason"]


def test_bad_json_line(tmp_path):
    root = folder(tmp_path / "music")
    (root / "metadata.jsonl").write_text('{"file_name": "a.wav", "genre": "pop"}\n{"file_name": "e.WAV", \n[1]\n')
    records, errors = ingest(root, tmp_path / "out")
    assert by_name(records)["a.wav"].labels["genre"] == "pop"
    assert [(e["code"], e["line"]) for e in errors] == [("bad_row", 2), ("bad_row", 3)]
    assert "not valid JSON" in errors[0]["reason"] and "metadata.jsonl line 2" in errors[0]["reason"]


@pytest.mark.parametrize("files,match", [
    ({"metadata.csv": "file_name,genre\n", "metadata.jsonl": ""}, "metadata.csv and metadata.jsonl"),
    ({"metadata.csv": "name,genre\na.wav,pop\n"}, "no file_name column"),
    ({"metadata.csv": "file_name,genre,genre\na.wav,pop,rock\n"}, "'genre' twice"),
    ({"metadata.jsonl": '{"name": "a.wav"}\n'}, "no file_name"),
    ({"metadata.parquet": "not parquet"}, "parquet"),
])
def test_a_broken_metadata_file_stops_before_any_output(tmp_path, files, match):
    root = folder(tmp_path / "music")
    for name, text in files.items():
        (root / name).write_text(text)
    with pytest.raises(StageConfigError, match=match):
        ingest_dataset("folder", root, tmp_path / "out" / "ingested.jsonl")
    assert not (tmp_path / "out" / "ingested.jsonl").exists()


def test_seeded_split_is_stable_and_order_independent(tmp_path, monkeypatch):
    root = tmp_path / "many"
    for i in range(300):
        tone(root / f"d{i % 7}" / f"t{i}.wav", seconds=0.01)
    first = {r.id: r.split for r in prepare(root).records}
    assert first == {r.id: r.split for r in prepare(root).records}
    counts = {s: list(first.values()).count(s) for s in ("train", "valid", "test")}
    assert 200 <= counts["train"] <= 280 and counts["valid"] > 10 and counts["test"] > 10
    # The listing order does not matter: the split is a function of (seed, relpath) alone.
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top: ((d, n[::-1], f[::-1]) for d, n, f in reversed(list(real_walk(top)))))
    assert {r.id: r.split for r in prepare(root).records} == first
    monkeypatch.undo()
    other_root = tmp_path / "copy"
    os.rename(root, other_root)
    assert {r.id: r.split for r in prepare(other_root).records} == first
    assert {r.id: r.split for r in prepare(other_root, seed=1).records} != first
    halves = {r.split for r in prepare(other_root, split="50/0/50").records}
    assert halves == {"train", "test"}
    with pytest.raises(StageConfigError, match="80/10/10"):
        prepare(other_root, split="80/20")


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(StageConfigError, match="split, seed"):
        ingest_dataset("folder", folder(tmp_path / "m"), tmp_path / "o.jsonl", {"subset": "x"})


def test_folder_labels_reach_the_template_writer(tmp_path):
    from pipeline.instructions.metadata import clip_metadata
    from pipeline.instructions.facts import clip_facts

    root = folder(tmp_path / "music")
    write_csv(root / "metadata.csv", "file_name,genre,key,tempo,time_signature,instruments,moods,caption,artist\n"
                                     "a.wav,jazz,Bb minor,96,3/4,piano;double bass,calm,Soft trio.,Someone\n")
    record = by_name(ingest(root, tmp_path / "out")[0])["a.wav"]
    metadata = clip_metadata(record.model_dump(mode="json"))
    assert "file_name" not in metadata and "artist" not in metadata and metadata["caption"] == "Soft trio."
    facts = clip_facts(metadata, "folder")
    assert (facts.key, facts.tempo_bpm, facts.beats_per_bar) == ("Bb minor", 96.0, 3)
    assert (facts.genres, facts.instruments, facts.moods) == (["jazz"], ["piano", "double bass"], ["calm"])


# ---------------------------------------------------------------------------------------------
# The whole chain


def music_folder(root: Path, n: int = 8, seconds: float = 6.0) -> Path:
    """``n`` clips with a click track at a known tempo over a chord, nested, with a metadata.csv."""
    sr = 22050
    rows = ["file_name,genre,tempo,key,time_signature,instruments,caption,split"]
    for i in range(n):
        bpm = 90 + 10 * i
        t = np.arange(int(seconds * sr)) / sr
        y = 0.1 * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
        beat = (t * bpm / 60) % 1
        y += 0.5 * np.exp(-beat * 30) * np.sin(2 * np.pi * 1000 * t)
        rel = f"{'ab'[i % 2]}/{i // 2}/track {i}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, y.astype(np.float32), sr)
        split = "train" if i < 6 else "test"
        rows.append(f'"{rel}",{"rock" if i % 2 else "jazz"},{bpm},A major,4/4,piano;drums,A steady click over a chord.,{split}')
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_folder_through_every_stage_to_training(tmp_path):
    from llark.cli import main

    root, run = music_folder(tmp_path / "music"), tmp_path / "run"
    assert main(["ingest", "folder", "--root", str(root), "--out", str(run / "ingested.jsonl")]) == 0
    assert main(["crop", str(run / "ingested.jsonl"), "--out", str(run / "clips.jsonl"),
                 "--clips-dir", str(run / "clips"), "--no-progress"]) == 0
    clips = read_records(run / "clips.jsonl")
    assert len(clips) == 8 and all(c.end_s == pytest.approx(6.0, abs=0.01) for c in clips)
    assert all(c.labels["key"] == "A major" for c in clips)
    assert main(["augment", str(run / "clips.jsonl"), "--out", str(run / "augmented.jsonl"), "--no-progress"]) == 0
    assert main(["instructions", str(run / "augmented.jsonl"), "--out", str(run / "instructions.jsonl"),
                 "--backend", "template", "--no-progress"]) == 0
    instructions = read_jsonl(run / "instructions.jsonl")
    assert {i["task_family"] for i in instructions} == {"understanding", "reasoning", "captioning"}
    assert len(instructions) == 24 and read_jsonl(run / "instructions.errors.jsonl") == []
    answers = " ".join(p["answer"] for i in instructions for p in i["pairs"])
    assert "A major" in answers and "piano" in answers
    assert main(["embed", str(run / "augmented.jsonl"), "--embeddings-dir", str(run / "embeddings"),
                 "--encoder", "features", "--no-progress"]) == 0
    assert main(["shards", "--clips", str(run / "augmented.jsonl"), "--instructions", str(run / "instructions.jsonl"),
                 "--embeddings", str(run / "embeddings"), "--out", str(run / "shards"), "--no-progress"]) == 0
    assert main(["validate-shards", str(run / "shards")]) == 0
    settings = {"model.lm_path": str(tiny_lm_dir()), "data.shards": [str(run / "shards")], "model.dtype": "float32",
                "model.attn_implementation": "eager", "model.gradient_checkpointing": False,
                "optim.warmup_steps": 1, "optim.max_steps": 3, "global_batch": 2, "micro_batch": 2,
                "save_every": 3, "log_every": 1, "output_dir": str(run / "train"), "data.num_workers": 0,
                "tensorboard": False}
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    proc = subprocess.run([sys.executable, "-m", "llark.train", *args], env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
