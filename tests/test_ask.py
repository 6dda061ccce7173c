"""``llark ask`` on a tiny exported model: long-audio windowing shapes, batched generation equal to
one-by-one generation, --json and batch mode, and refusal of an encoder the model was not trained on."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import tiny_lm_dir  # noqa: E402

from llark.inference import GenerationSettings, InferenceError, encode_file, load, windows  # noqa: E402

FEATURES_DIM = 128


def features_identity(dtype: str = "float16") -> dict:
    from pipeline.encoders import describe_encoder

    d = describe_encoder("features", {})
    return {"name": d["name"], "layer": d["layer"], "frame_rate_hz": d["frame_rate_hz"], "dim": d["dim"],
            "dtype": dtype, "config": d["config"]}


def export_tiny_model(out_dir: Path, encoder: dict | None = None, seed: int = 0) -> Path:
    """A tiny random Llama + a 128 -> hidden projector, exported as `llark train` exports a model."""
    import torch

    from llark.model.llark import LlarkConfig, build_llark, export_pretrained, projector_state

    torch.manual_seed(seed)
    config = LlarkConfig(lm_path=str(tiny_lm_dir()), encoder_dim=FEATURES_DIM,
                         encoder=encoder if encoder is not None else features_identity())
    model, tokenizer = build_llark(config, dtype="float32", attn_implementation="sdpa")
    return export_pretrained(out_dir, model.lm, tokenizer, config, projector_state(model))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("tiny-llark") / "final")


def write_tone(path: Path, seconds: float, sr: int = 22_050, freq: float = 440.0) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    audio = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
    sf.write(path, audio.astype(np.float32), sr, subtype="PCM_16")
    return path


# ---------------------------------------------------------------------------------------------
# Windowing


@pytest.mark.parametrize("duration, start, max_seconds, expected", [
    (15.0, 0.0, 25.0, [(0.0, 15.0)]),
    (60.0, 0.0, 25.0, [(0.0, 25.0)]),
    (60.0, 0.0, 60.0, [(0.0, 25.0), (25.0, 50.0), (50.0, 60.0)]),
    (60.0, 0.0, 40.0, [(0.0, 25.0), (25.0, 40.0)]),
    (60.0, 30.0, 100.0, [(30.0, 55.0), (55.0, 60.0)]),
    (50.5, 0.0, 100.0, [(0.0, 25.0), (25.0, 50.0)]),  # a 0.5 s tail is dropped
])
def test_windows(duration, start, max_seconds, expected):
    got = windows(duration, start, max_seconds)
    assert len(got) == len(expected)
    for (a, b), (c, d) in zip(got, expected):
        assert (a, b) == pytest.approx((c, d))


def test_windows_reject_start_outside_audio():
    with pytest.raises(InferenceError, match="outside the audio"):
        windows(10.0, 12.0, 25.0)


def test_long_audio_frames_are_windows_concatenated(tmp_path):
    from pipeline.audio import TARGET_SAMPLE_RATE, probe, read_window
    from pipeline.encoders.features import FeaturesEncoder

    path = write_tone(tmp_path / "long.wav", 60.0)
    encoder = FeaturesEncoder()
    frames, spans = encode_file(path, encoder, max_seconds=60.0)
    assert spans == [(0.0, 25.0), (25.0, 50.0), (50.0, 60.0)]
    assert frames.shape == (250 + 250 + 100, FEATURES_DIM)
    # The second window is encoded on its own, as the crop + embed stages encode a clip.
    info = probe(path)
    second = encoder.encode(read_window(info, 25.0, 50.0), TARGET_SAMPLE_RATE)
    np.testing.assert_allclose(frames[250:500], second, rtol=1e-6, atol=1e-6)
    short, spans = encode_file(path, encoder, max_seconds=40.0)
    assert short.shape == (400, FEATURES_DIM) and spans == [(0.0, 25.0), (25.0, 40.0)]
    default, spans = encode_file(path, encoder)
    assert default.shape == (250, FEATURES_DIM) and spans == [(0.0, 25.0)]


# ---------------------------------------------------------------------------------------------
# Generation


def test_batched_answers_equal_one_by_one(tiny_model):
    llark = load(tiny_model, dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    audios = [rng.standard_normal((n, FEATURES_DIM)).astype(np.float32) for n in (5, 12, 8)]
    questions = ["What is the key of this song?", "What is the tempo?", "Describe the track in detail."]
    settings = GenerationSettings(max_new_tokens=6)
    batched = llark.answer(questions, audios, settings)
    single = [llark.answer([q], [a], settings)[0] for q, a in zip(questions, audios)]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_sampling_is_seeded(tiny_model):
    llark = load(tiny_model, dtype="float32", device="cpu")
    audio = [np.ones((4, FEATURES_DIM), dtype=np.float32)]
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    assert llark.answer(["Hi?"], audio, settings) == llark.answer(["Hi?"], audio, settings)


def test_answerer_reads_each_input_once_and_keeps_the_order(tiny_model, tmp_path, monkeypatch):
    import llark.inference as inference

    frames = tmp_path / "clip.npy"
    np.save(frames, np.zeros((6, FEATURES_DIM), dtype=np.float16), allow_pickle=False)
    reads = []
    read_frames = inference.read_frames
    monkeypatch.setattr(inference, "read_frames", lambda path, dim, states=None: reads.append(path) or read_frames(path, dim, states))
    answerer = inference.Answerer(load(tiny_model, dtype="float32", device="cpu"), batch_size=2)
    questions = ["Key?", "Tempo?", "Genre?"]
    results = answerer.answer([inference.Request(q, frames=str(frames)) for q in questions],
                              GenerationSettings(max_new_tokens=3))
    assert reads == [str(frames)]
    assert [r["question"] for r in results] == questions and all(r["frames"] == 6 for r in results)
    with pytest.raises(InferenceError, match="one of audio or frames"):
        inference.Request("Key?", audio="a.wav", frames=str(frames))


def test_answer_rejects_wrong_frame_dimension(tiny_model):
    llark = load(tiny_model, dtype="float32", device="cpu")
    with pytest.raises(InferenceError, match=r"\[frames, 128\]"):
        llark.answer(["?"], [np.zeros((4, 16), dtype=np.float32)])


# ---------------------------------------------------------------------------------------------
# The command


def run_ask(argv: list[str], capsys) -> tuple[int, str, str]:
    from llark.commands import ask

    parser = argparse.ArgumentParser()
    ask.register(parser.add_subparsers())
    args = parser.parse_args(["ask", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_json_and_batch(tiny_model, tmp_path, capsys):
    long = write_tone(tmp_path / "long.wav", 60.0)
    short = write_tone(tmp_path / "short.flac", 12.0, freq=220.0)
    code, out, _ = run_ask([str(tiny_model), str(long), "What is the key of this song?", "--json",
                            "--max-seconds", "60", "--max-new-tokens", "5"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["frames"] == 600 and result["windows"] == [[0.0, 25.0], [25.0, 50.0], [50.0, 60.0]]
    assert result["question"] == "What is the key of this song?" and isinstance(result["answer"], str)
    assert result["generation"]["do_sample"] is False

    code, plain, _ = run_ask([str(tiny_model), str(long), "What is the key of this song?", "--max-seconds", "60",
                              "--max-new-tokens", "5"], capsys)
    assert code == 0 and plain.strip() == result["answer"]

    batch = tmp_path / "questions.txt"
    batch.write_text(f"{long}\tWhat is the key of this song?\n"
                     + json.dumps({"audio": str(short), "question": "What is the tempo of this song?"}) + "\n\n"
                     + f"{short}\tList the instruments you hear.\n")
    answers = tmp_path / "answers.jsonl"
    code, _, _ = run_ask([str(tiny_model), "--batch", str(batch), "--out", str(answers), "--max-seconds", "60",
                          "--max-new-tokens", "5"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["audio"] for r in rows] == [str(long), str(short), str(short)]
    assert [r["frames"] for r in rows] == [600, 120, 120]
    assert rows[0]["answer"] == result["answer"]  # the same question about the same audio, batched


def test_ask_frames_file(tiny_model, tmp_path, capsys):
    frames = tmp_path / "clip.npy"
    np.save(frames, np.zeros((7, FEATURES_DIM), dtype=np.float16), allow_pickle=False)
    code, out, _ = run_ask([str(tiny_model), "What genre is this song?", "--frames", str(frames), "--json",
                            "--max-new-tokens", "3"], capsys)
    assert code == 0 and json.loads(out)["frames"] == 7


def test_ask_refuses_another_encoder(tmp_path, capsys):
    identity = features_identity()
    identity["config"] = {**identity["config"], "n_fft": 4096}
    model = export_tiny_model(tmp_path / "other", encoder=identity)
    audio = write_tone(tmp_path / "a.wav", 5.0)
    code, _, err = run_ask([str(model), str(audio), "Key?"], capsys)
    assert code == 2 and "differs from the one the model was trained on" in err and "config" in err


def test_ask_errors_are_messages(tiny_model, tmp_path, capsys):
    code, _, err = run_ask([str(tiny_model), str(tmp_path / "missing.wav"), "Key?"], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run_ask([str(tmp_path), str(tmp_path / "a.wav"), "Key?"], capsys)
    assert code == 2 and "not an exported LLark model" in err
    bad = tmp_path / "bad.txt"
    bad.write_text("no tab here\n")
    code, _, err = run_ask([str(tiny_model), "--batch", str(bad)], capsys)
    assert code == 2 and "line 1" in err
