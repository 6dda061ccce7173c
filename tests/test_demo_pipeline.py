"""The demo pipeline through the command line: demo-data → ingest → crop (fast); `make demo` whole (slow)."""

import json
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from llark.cli import main
from pipeline.records import read_jsonl, read_records

REPO = Path(__file__).resolve().parents[1]


def run_demo(run: Path, clips: int, duration: float, workers: int) -> None:
    assert main(["demo-data", "--out", str(run / "source"), "--clips", str(clips), "--duration", str(duration)]) == 0
    assert main(["ingest", "demo", "--root", str(run / "source"), "--out", str(run / "ingested.jsonl")]) == 0
    assert main(["crop", str(run / "ingested.jsonl"), "--out", str(run / "clips.jsonl"),
                 "--clips-dir", str(run / "clips"), "--workers", str(workers), "--no-progress"]) == 0


def test_demo_data_is_ingested_and_cropped(tmp_path):
    run_demo(tmp_path, clips=12, duration=6.0, workers=2)
    ingested = read_records(tmp_path / "ingested.jsonl")
    clips = read_records(tmp_path / "clips.jsonl")
    assert len(ingested) == 12 and [c.id for c in clips] == [r.id for r in ingested]
    assert read_jsonl(tmp_path / "clips.errors.jsonl") == []
    for clip in clips:
        info = sf.info(clip.clip_path)
        assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
        assert clip.start_s == 0.0 and clip.end_s == pytest.approx(6.0, abs=0.01)  # short tracks keep their start
        assert {"tempo_bpm", "key", "genre"} <= set(clip.annotations)
    # Running the same commands again does no work and changes nothing.
    before = (tmp_path / "clips.jsonl").read_bytes()
    run_demo(tmp_path, clips=12, duration=6.0, workers=1)
    assert (tmp_path / "clips.jsonl").read_bytes() == before


@pytest.mark.slow
def test_make_demo_end_to_end(tmp_path):
    run = tmp_path / "demo"
    proc = subprocess.run(["make", "demo", f"RUN={run}"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{run}/clips.jsonl" in proc.stdout
    clips = read_records(run / "clips.jsonl")
    assert len(clips) == 240
    assert {c.split for c in clips} == {"train", "valid", "test"}
    augmented = read_records(run / "augmented.jsonl")
    assert len(augmented) == 240 and all("key_madmom" in r.features for r in augmented)
    assert len(read_jsonl(run / "instructions.jsonl")) == 480
    assert "validate-shards" in proc.stdout and "no problems" in proc.stdout
    # It ends by evaluating the trained model on the held-out clips, with the shuffled-audio control.
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary["conditions"]) == {"real", "shuffled"}
    held_out = [c for c in clips if c.split in ("valid", "test")]
    for task in ("key", "tempo", "metre"):
        assert "| " + task + " |" in proc.stdout
    assert (run / "eval" / "report.md").is_file()
    predictions = read_jsonl(run / "eval" / "predictions.jsonl")
    assert {p["clip_id"] for p in predictions} == {c.id for c in held_out}
    # The model uses the audio: tempo from the clip's own audio beats tempo from another clip's by a
    # margin no 46-clip sampling accident gives (300 steps here: Acc2 0.54 against 0.04).
    conditions = summary["conditions"]
    real, shuffled = conditions["real"]["tempo/demo"]["acc2"], conditions["shuffled"]["tempo/demo"]["acc2"]
    assert real["value"] - shuffled["value"] >= 0.3 and real["low"] > shuffled["high"], (real, shuffled)
