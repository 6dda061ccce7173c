import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from llark.cli import build_parser, main

VERBS = ["demo-data", "ingest", "crop", "augment", "instructions", "embed", "shards", "validate-shards", "train", "ask", "evaluate", "plan"]


def test_help_lists_every_verb_and_each_verb_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for verb in VERBS:
        assert verb in top
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        assert "default" in text.lower() and len(text) > 300, f"{verb} --help says too little"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "llark.cli", "crop", "--help"], capture_output=True, text=True, check=True).stdout
    assert "[30, 55)" in out and "--workers" in out


def test_bad_configuration_fails_before_any_work_naming_the_field(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "dataset": "fixture", "split": "train", "audio_path": "x.wav"}) + "\n")
    assert main(["crop", str(inp), "--out", str(tmp_path / "o.jsonl"), "--clips-dir", str(tmp_path / "c"), "--p-late", "2"]) == 2
    assert "p_late" in capsys.readouterr().err
    assert main(["crop", str(inp), "--out", str(tmp_path / "o.jsonl"), "--clips-dir", str(tmp_path / "c"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["crop", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--clips-dir", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "c").exists()
    assert main(["ingest", "gtzan", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i.jsonl")]) == 2
    assert "--root" in capsys.readouterr().err


def test_crop_verb_runs_and_strict_reports_failures(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, 0.3 * np.sin(np.linspace(0, 2000, 44100 * 3)).astype(np.float32), 44100)
    rows = [
        {"id": "a", "dataset": "fixture", "split": "train", "audio_path": str(good)},
        {"id": "b", "dataset": "fixture", "split": "train", "audio_path": str(tmp_path / "gone.wav")},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["crop", str(inp), "--out", str(tmp_path / "o.jsonl"), "--clips-dir", str(tmp_path / "c"), "--executor", "inline", "--no-progress"]
    assert main(args) == 0
    assert main(args + ["--strict"]) == 1  # resumed: nothing to do, but the failure is still there
    assert (tmp_path / "c" / "fixture" / "a.wav").exists()
