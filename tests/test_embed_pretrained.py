"""``llark embed`` with the Hugging Face encoders (mert, whisper, clap) on their tiny random stand-ins:
the storage printed before the run, ``--layers all`` arrays through shards and validate-shards (and,
slow, mixed by a trained layer mix, exported and asked), options another encoder does not take refused; and (slow) embed → shards →
train a few steps → ``llark ask`` on an audio file, for each encoder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llark.cli  # noqa: E402
from pipeline.encoders import read_manifest  # noqa: E402
from pipeline.encoders.standins import ENCODERS, write_standin  # noqa: E402
from pipeline.records import ClipRecord, read_jsonl  # noqa: E402
from test_shards import instruction  # noqa: E402

SR = 44_100
SECONDS = (2.0, 3.5, 1.0, 2.5, 2.0, 3.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six short clips (four train, two valid) with understanding instructions, and every stand-in."""
    root = tmp_path_factory.mktemp("pretrained")
    clips, instructions = [], []
    rng = np.random.default_rng(0)
    for k, seconds in enumerate(SECONDS):
        split = "train" if k < 4 else "valid"
        wav = root / "wav" / f"c{k}.wav"
        wav.parent.mkdir(exist_ok=True)
        t = np.arange(int(seconds * SR)) / SR
        sf.write(wav, (0.3 * np.sin(2 * np.pi * (200 + 50 * k) * t) + 0.05 * rng.standard_normal(len(t)))
                 .astype(np.float32), SR, subtype="PCM_16")
        clip_id = f"{split}-{k}"
        clips.append(ClipRecord(id=clip_id, dataset="fixture", split=split, audio_path=str(wav),
                                task_families=["understanding"], start_s=0.0, end_s=seconds,
                                clip_path=str(wav)).model_dump(mode="json", exclude_none=True))
        instructions.append(instruction(clip_id, "understanding", split=split))
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clips))
    (root / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instructions))
    for name in ENCODERS:
        write_standin(name, root / "standins" / name)
    return root


def embed(run, name, out, *flags):
    return llark.cli.main(["embed", str(run / "clips.jsonl"), "--embeddings-dir", str(out), "--encoder", name,
                           "--weights-dir", str(run / "standins" / name), "--no-progress", *flags])


def shards(run, embeddings, out):
    return llark.cli.main(["shards", "--clips", str(run / "clips.jsonl"), "--instructions",
                           str(run / "instructions.jsonl"), "--embeddings", str(embeddings), "--out", str(out),
                           "--no-progress"])


def test_every_layer_kept_goes_into_shards_as_stored_states(run, tmp_path, capsys):
    from llark.data import open_shards

    assert embed(run, "mert", tmp_path / "emb", "--layers", "all") == 0
    out = capsys.readouterr().out
    # 3 states x 32 x 2 bytes at 10 Hz: 1.92 kB per second; the median clip is 2.25 s = 23 frames.
    assert "embed: mert, layer all, 3 states x 32-dim float16 frames at 10 Hz: 115.2 kB per minute of audio; " \
           "4.5 kB per 2.2 s clip (the median)" in out, out
    manifest = read_manifest(tmp_path / "emb")
    assert manifest["layer"] == "all" and manifest["config"]["hidden_states"] == 3
    records = read_jsonl(tmp_path / "emb" / "embeddings.jsonl")
    for record, seconds in zip(records, SECONDS, strict=True):
        array = np.load(record["embedding_path"], allow_pickle=False)
        assert array.shape == (3, round(seconds * 10), 32) and record["frames"] == array.shape[1]
    assert shards(run, tmp_path / "emb", tmp_path / "shards") == 0
    assert llark.cli.main(["validate-shards", str(tmp_path / "shards")]) == 0
    assert open_shards([str(tmp_path / "shards")]).states == 3


@pytest.mark.slow
def test_every_mert_layer_is_mixed_trained_exported_and_asked(run, tmp_path, capsys):
    from safetensors.torch import load_file
    from test_ask import run_ask
    from test_train import losses, run_train

    assert embed(run, "mert", tmp_path / "emb", "--layers", "all") == 0
    assert shards(run, tmp_path / "emb", tmp_path / "shards") == 0
    run_train(tmp_path / "train", tmp_path / "shards",
              **{"optim.max_steps": 4, "save_every": 4, "data.num_workers": 1, "global_batch": 2, "micro_batch": 1,
                 "model.mode": "projector", "optim.projector_lr": 0.05})
    assert sorted(losses(tmp_path / "train")) == [1, 2, 3, 4]
    final = tmp_path / "train" / "final"
    config = json.loads((final / "llark_config.json").read_text())
    assert config["audio_states"] == 3 and config["encoder"]["layer"] == "all"
    logits = load_file(str(final / "projector.safetensors"))["layer_mix.logits"]
    assert logits.shape == (3,) and logits.abs().max() > 0  # trained away from the mean
    capsys.readouterr()
    code, stdout, stderr = run_ask([str(final), str(run / "wav" / "c1.wav"), "What is the key of this song?", "--json",
                               "--max-new-tokens", "3", "--encoder-option",
                               f"weights_dir={run / 'standins' / 'mert'}"], capsys)
    assert code == 0, (stdout, stderr)
    assert json.loads(stdout)["frames"] == 35  # 3.5 s at 10 Hz


def test_options_of_other_encoders_are_refused_before_any_work(run, tmp_path, capsys):
    features = ["embed", str(run / "clips.jsonl"), "--embeddings-dir", str(tmp_path / "e"), "--layers", "3"]
    cases = ((lambda: llark.cli.main(features), "--layers: not an option of the features encoder"),
             (lambda: embed(run, "whisper", tmp_path / "e", "--window-seconds", "5"),
              "--window-seconds: not an option of the whisper encoder"),
             (lambda: embed(run, "mert", tmp_path / "e", "--context", "truncate"),
              "--context: not an option of the mert encoder"),
             (lambda: embed(run, "mert", tmp_path / "e", "--layers", "7"),
              "--layers 7: this checkpoint has hidden states 0-2"))
    for command, message in cases:
        assert command() == 2 and message in capsys.readouterr().err, message
    assert not (tmp_path / "e").exists()


def test_a_directory_of_another_layer_choice_is_refused(run, tmp_path, capsys):
    assert embed(run, "mert", tmp_path / "emb", "--layers", "1") == 0
    capsys.readouterr()
    assert embed(run, "mert", tmp_path / "emb", "--layers", "2") == 2
    assert "holds embeddings of another encoder configuration (layer: 2 != 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ENCODERS)
def test_embed_shards_train_and_ask_with_each_encoder(run, name, tmp_path, capsys):
    from test_ask import run_ask
    from test_train import losses, run_train

    assert embed(run, name, tmp_path / "emb") == 0
    assert shards(run, tmp_path / "emb", tmp_path / "shards") == 0
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["name"] == name
    run_train(tmp_path / "train", tmp_path / "shards", **{"optim.max_steps": 3, "save_every": 3,
                                                          "data.num_workers": 1, "global_batch": 2, "micro_batch": 1})
    assert sorted(losses(tmp_path / "train")) == [1, 2, 3]
    config = json.loads((tmp_path / "train" / "final" / "llark_config.json").read_text())
    assert config["encoder"]["name"] == name and config["encoder"]["dim"] == manifest["dim"]
    capsys.readouterr()
    wav = run / "wav" / "c1.wav"
    code, stdout, _ = run_ask([str(tmp_path / "train" / "final"), str(wav), "What is the key of this song?",
                               "--json", "--max-new-tokens", "3", "--encoder-option",
                               f"weights_dir={run / 'standins' / name}"], capsys)
    assert code == 0, stdout
    answer = json.loads(stdout)
    expected = np.load(read_jsonl(tmp_path / "emb" / "embeddings.jsonl")[1]["embedding_path"]).shape[0]
    assert isinstance(answer["answer"], str) and answer["frames"] == expected


@pytest.mark.slow
def test_make_embed_writes_a_stand_in_when_no_checkpoint_is_named(run, tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "run"
    target.mkdir()
    shutil.copy(run / "clips.jsonl", target / "augmented.jsonl")
    shutil.copy(run / "instructions.jsonl", target / "instructions.jsonl")
    proc = subprocess.run(["make", "--no-print-directory", "embed", "shards", f"RUN={target}", "ENCODER=mert"],
                          cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "a tiny random mert checkpoint" in proc.stdout
    assert (target / "standins" / "mert" / "config.json").is_file()
    assert read_manifest(target / "shards")["name"] == "mert"
