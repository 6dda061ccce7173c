"""`llark plan --pipeline`: a full run sized from the CPU seconds measured in a run's ledgers."""

import re

import pytest

from llark.cli import main


def test_full_run_is_sized_from_measured_figures(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["demo-data", "--out", str(run / "source"), "--clips", "6", "--duration", "4"]) == 0
    assert main(["ingest", "demo", "--root", str(run / "source"), "--out", str(run / "ingested.jsonl")]) == 0
    assert main(["crop", str(run / "ingested.jsonl"), "--out", str(run / "clips.jsonl"), "--clips-dir", str(run / "clips"),
                 "--executor", "inline", "--no-progress"]) == 0
    assert main(["augment", str(run / "clips.jsonl"), "--out", str(run / "augmented.jsonl"), "--executor", "inline", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plan", "--pipeline", str(run), "--tracks", "100000"]) == 0
    text = capsys.readouterr().out
    crop = re.search(r"crop\s+([\d.]+) CPU s/clip \(from 6 items\) → \s*([\d,.]+) CPU-hours", text)
    augment = re.search(r"augment\s+([\d.]+) CPU s/clip \(from 6 items\) → \s*([\d,.]+) CPU-hours", text)
    assert crop and augment, text
    for match in (crop, augment):
        per_clip, hours = float(match.group(1)), float(match.group(2).replace(",", ""))
        assert per_clip > 0 and hours == pytest.approx(100000 * per_clip / 3600, abs=0.1)
    assert float(augment.group(1)) > float(crop.group(1))  # madmom costs more than cutting a wav
    assert re.search(r"API total\s+\$\s*[\d,]+", text)
    # Ten times the tracks, ten times the CPU-hours.
    assert main(["plan", "--pipeline", str(run), "--tracks", "1000000"]) == 0
    ten = re.search(r"augment\s+[\d.]+ CPU s/clip \(from 6 items\) → \s*([\d,.]+)", capsys.readouterr().out)
    assert float(ten.group(1).replace(",", "")) == pytest.approx(10 * float(augment.group(2).replace(",", "")), rel=0.03)


def test_plan_pipeline_needs_a_measured_run(tmp_path, capsys):
    assert main(["plan", "--pipeline", str(tmp_path)]) == 2
    assert "holds no augmented.jsonl" in capsys.readouterr().err
