"""The synthetic demo dataset (pipeline.demo_data) and its ingestion adapter (pipeline.ingest.demo)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import mir_eval
import numpy as np
import pytest
import soundfile as sf

from pipeline.demo_data import (
    METADATA_COLUMNS,
    chord_label,
    chord_pitch_classes,
    generate_demo_dataset,
    plan_dataset,
)
from pipeline.ingest import DatasetLayoutError, get_adapter
from pipeline.records import SPLITS, check_id

PITCH_CLASS = {name: i for i, name in enumerate("C C# D D# E F F# G G# A A# B".split())}
PITCH_CLASS.update({"Db": 1, "Eb": 3, "Gb": 6, "Ab": 8, "Bb": 10})
SR = 22050


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Ten 8-second clips (two of each style) and one 30-second long track."""
    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, n_clips=10, seed=3, duration_s=8.0, long_tracks=1,
                          long_duration_s=30.0, workers=1)
    return out


def read_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def annotation(root: Path, ident: str) -> dict:
    return json.loads((root / "annotations" / f"{ident}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Generation


def test_same_seed_gives_identical_files_and_clips_differ(tmp_path):
    kwargs = dict(n_clips=6, seed=11, duration_s=3.0)
    generate_demo_dataset(tmp_path / "a", workers=1, **kwargs)
    generate_demo_dataset(tmp_path / "b", workers=2, **kwargs)  # parallel rendering, same bytes
    generate_demo_dataset(tmp_path / "c", workers=1, **{**kwargs, "seed": 12})
    rows = read_rows(tmp_path / "a" / "metadata.csv")
    assert len(rows) == 6
    for row in rows:
        a = (tmp_path / "a" / row["audio"]).read_bytes()
        assert a == (tmp_path / "b" / row["audio"]).read_bytes(), row["id"]
        name = f"annotations/{row['id']}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/metadata.csv").read_bytes() == (tmp_path / "b/metadata.csv").read_bytes()
    assert (tmp_path / "a/metadata.csv").read_bytes() != (tmp_path / "c/metadata.csv").read_bytes()
    audio = [sf.read(tmp_path / "a" / row["audio"])[0] for row in rows]
    for i in range(len(audio)):
        for j in range(i + 1, len(audio)):
            assert not np.allclose(audio[i], audio[j], atol=1e-3), (rows[i]["id"], rows[j]["id"])


def test_second_run_is_a_no_op_and_other_parameters_regenerate(tmp_path):
    first = generate_demo_dataset(tmp_path, n_clips=6, duration_s=2.0, workers=1)
    assert first.generated and first.n_clips == 6
    stamp = (tmp_path / "metadata.csv").stat().st_mtime_ns
    again = generate_demo_dataset(tmp_path, n_clips=6, duration_s=2.0, workers=1)
    assert not again.generated and again.splits == first.splits
    assert (tmp_path / "metadata.csv").stat().st_mtime_ns == stamp

    fewer = generate_demo_dataset(tmp_path, n_clips=3, duration_s=2.0, workers=1)
    assert fewer.generated
    assert len(read_rows(tmp_path / "metadata.csv")) == 3
    assert len(list((tmp_path / "audio").glob("*/*.flac"))) == 3  # stale clips removed
    assert len(list((tmp_path / "annotations").glob("*.json"))) == 3
    assert json.loads((tmp_path / "demo_params.json").read_text())["n_clips"] == 3


def test_interrupted_generation_is_detected(tmp_path):
    generate_demo_dataset(tmp_path, n_clips=2, duration_s=2.0, workers=1)
    (tmp_path / "metadata.csv").unlink()  # what a run killed before its last write leaves
    assert generate_demo_dataset(tmp_path, n_clips=2, duration_s=2.0, workers=1).generated
    assert (tmp_path / "metadata.csv").exists()


def test_metadata_files_and_annotations_agree(demo):
    rows = read_rows(demo / "metadata.csv")
    assert tuple(rows[0]) == METADATA_COLUMNS
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    assert (demo / "README.txt").read_text().lower().count("synthetic") >= 1
    for row in rows:
        assert check_id(row["id"]) and "." not in row["id"]
        assert row["split"] in SPLITS
        assert row["audio"] == f"audio/{row['split']}/{row['id']}.flac"
        assert (demo / row["audio"]).is_file()
        doc = annotation(demo, row["id"])
        for column in METADATA_COLUMNS:
            value = doc[column]
            if column == "instruments":
                value = ";".join(value)
            assert str(value) == row[column], (row["id"], column)
        assert row["key"] == f"{row['tonic']} {row['mode']}"
        assert row["metre"] == f"{row['beats_per_bar']}/4"
        assert "drums" in row["instruments"].split(";")
    long_rows = read_rows(demo / "long_tracks.csv")
    assert [r["audio"] for r in long_rows] == ["audio/long/demo-long-000.flac"]


def test_keys_modes_metres_and_splits_are_balanced():
    clips, _ = plan_dataset(240, seed=0, duration_s=15.0, sample_rate=SR)
    keys = Counter((p.tonic, p.mode) for p in clips)
    assert len(keys) == 24 and set(keys.values()) == {10}
    assert set(Counter(p.style.name for p in clips).values()) == {48}
    metres = Counter(p.style.beats_per_bar for p in clips)
    assert set(metres) == {3, 4} and min(metres.values()) >= 0.3 * 240
    assert {p.tempo_bpm for p in clips} <= {round(t, 1) for t in np.arange(70, 160.05, 0.1)}
    splits = Counter(p.split for p in clips)
    assert 0.75 * 240 <= splits["train"] <= 0.85 * 240
    assert splits["valid"] >= 0.08 * 240 and splits["test"] >= 0.08 * 240
    for split in ("valid", "test"):
        held_out = [p for p in clips if p.split == split]
        assert {p.mode for p in held_out} == {"major", "minor"}
        assert {p.style.beats_per_bar for p in held_out} == {3, 4}
    again, _ = plan_dataset(240, seed=0, duration_s=15.0, sample_rate=SR)
    assert [(p.split, p.tempo_bpm, p.bars) for p in again] == [(p.split, p.tempo_bpm, p.bars) for p in clips]


def test_beat_grid_matches_tempo_and_metre(demo):
    for row in read_rows(demo / "metadata.csv") + read_rows(demo / "long_tracks.csv"):
        doc = annotation(demo, row["id"])
        times = np.array([b["time"] for b in doc["beats"]])
        numbers = [b["beat_number"] for b in doc["beats"]]
        n = int(row["beats_per_bar"])
        assert 0.0 <= times[0] <= 0.5 and numbers[0] == 1
        np.testing.assert_allclose(np.diff(times), 60.0 / float(row["tempo_bpm"]), atol=2e-6)
        assert numbers == [i % n + 1 for i in range(len(numbers))]
        assert times[-1] < float(row["duration_s"]) <= times[-1] + 60.0 / float(row["tempo_bpm"]) + 1e-6


def test_chords_follow_the_bars_and_start_and_end_on_the_tonic(demo):
    for row in read_rows(demo / "metadata.csv") + read_rows(demo / "long_tracks.csv"):
        doc = annotation(demo, row["id"])
        chords = doc["chords"]
        starts = np.array([c["start"] for c in chords])
        ends = np.array([c["end"] for c in chords])
        assert starts[0] == 0.0 and ends[-1] == pytest.approx(float(row["duration_s"]))
        np.testing.assert_allclose(starts[1:], ends[:-1])
        downbeats = [b["time"] for b in doc["beats"] if b["beat_number"] == 1]
        played = [c for c in chords if c["chord"] != "N"]
        np.testing.assert_allclose([c["start"] for c in played], downbeats, atol=1e-6)
        mir_eval.chord.encode_many([c["chord"] for c in chords])  # raises on an invalid label
        root, quality = played[0]["chord"].split(":")
        assert PITCH_CLASS[root] == PITCH_CLASS[row["tonic"]]
        assert quality == ("maj" if row["mode"] == "major" else "min")
        assert played[-1]["chord"] == played[0]["chord"]


def test_chord_labels_spell_the_harmonic_minor_dominant():
    assert chord_label(9, "minor", "V") == "E:maj"
    assert chord_label(6, "minor", "i") == "F#:min"
    assert chord_label(7, "major", "V7") == "D:7"
    assert chord_label(0, "minor", "iio") == "D:dim"
    assert chord_label(10, "major", "IV") == "Eb:maj"
    assert chord_pitch_classes(9, "minor", "V") == (4, 8, 11)  # G# is the leading tone


def test_audio_is_mono_16_bit_not_clipped_and_not_silent(demo):
    for row in read_rows(demo / "metadata.csv"):
        info = sf.info(demo / row["audio"])
        assert (info.channels, info.samplerate, info.subtype, info.format) == (1, SR, "PCM_16", "FLAC")
        assert info.frames == round(float(row["duration_s"]) * SR)
        audio, _ = sf.read(demo / row["audio"])
        peak_db = 20 * np.log10(np.max(np.abs(audio)))
        assert -1.5 < peak_db < -0.5
        assert 20 * np.log10(np.sqrt(np.mean(audio ** 2))) > -30
        quiet = np.mean(np.abs(audio) < 1e-4)
        assert quiet < 0.1  # no long silent stretches


def chroma(audio: np.ndarray, sr: int) -> np.ndarray:
    """Spectral magnitude per pitch class from one FFT of the whole clip, 60 Hz to 2 kHz."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1.0 / sr)
    band = (freqs > 60) & (freqs < 2000)
    pcs = np.round(12 * np.log2(freqs[band] / 440.0)).astype(int) % 12
    by_a = np.bincount(pcs, weights=spectrum[band], minlength=12)
    return np.roll(by_a, 9)  # index 0 = C


def test_spectrum_reflects_the_key(demo):
    ratios = []
    for row in read_rows(demo / "metadata.csv"):
        audio, sr = sf.read(demo / row["audio"])
        energy = chroma(audio, sr)
        tonic = PITCH_CLASS[row["tonic"]]
        triad = [tonic, (tonic + (4 if row["mode"] == "major" else 3)) % 12, (tonic + 7) % 12]
        others = [pc for pc in range(12) if pc not in triad]
        # the other chords share the spectrum: in an 8 s clip the tonic chord may hold 2 bars of 5
        ratios.append(energy[triad].mean() / energy[others].mean())
        assert ratios[-1] > 1.1, row["id"]
        # the mode is audible: the key's own third is stronger than the other mode's third
        other_third = (tonic + (3 if row["mode"] == "major" else 4)) % 12
        assert energy[triad[1]] > energy[other_third], row["id"]
    assert np.median(ratios) > 1.4


@pytest.mark.filterwarnings("ignore:Usage of `method` is deprecated")
def test_madmom_finds_the_tempo(demo):
    soxr = pytest.importorskip("soxr")
    from madmom.audio.signal import Signal
    from madmom.features.beats import RNNBeatProcessor
    from madmom.features.tempo import TempoEstimationProcessor

    rows = read_rows(demo / "metadata.csv")
    picked = [next(r for r in rows if r["metre"] == m) for m in ("3/4", "4/4")]
    beats, tempo = RNNBeatProcessor(), TempoEstimationProcessor(fps=100)
    for row in picked:
        audio, sr = sf.read(demo / row["audio"], dtype="float32")
        estimate = tempo(beats(Signal(soxr.resample(audio, sr, 44100), sample_rate=44100)))[0][0]
        truth = float(row["tempo_bpm"])
        assert any(abs(estimate - f * truth) <= 0.04 * f * truth for f in (1, 2, 0.5)), (row, estimate)


# ---------------------------------------------------------------------------------------------
# Ingestion


def test_adapter_reads_every_clip_with_its_ground_truth(demo):
    adapter = get_adapter("demo")
    records = adapter.prepare(demo)
    rows = read_rows(demo / "metadata.csv")
    assert [r.id for r in records] == [row["id"] for row in rows]
    for record, row in zip(records, rows):
        doc = annotation(demo, row["id"])
        assert record.dataset == "demo" and record.split == row["split"]
        assert record.crop_policy == "paper"
        assert record.task_families == ["understanding", "reasoning"]
        assert Path(record.audio_path).is_absolute() and Path(record.audio_path).is_file()
        assert record.source_duration_s == float(row["duration_s"])
        ann = record.annotations
        assert ann["tempo_bpm"] == float(row["tempo_bpm"]) and ann["beats_per_bar"] == int(row["beats_per_bar"])
        assert (ann["genre"], ann["key"], ann["metre"], ann["progression"]) == (
            row["genre"], row["key"], row["metre"], row["progression"])
        assert ann["instruments"] == row["instruments"].split(";")
        assert ann["beats"] == doc["beats"] and ann["chords"] == doc["chords"]
    with_long = adapter.prepare(demo, include_long=True)
    assert len(with_long) == len(records) + 1
    assert with_long[-1].id == "demo-long-000" and with_long[-1].annotations["sections"]


def test_adapter_names_the_missing_metadata(tmp_path):
    with pytest.raises(DatasetLayoutError, match="metadata.csv"):
        get_adapter("demo").prepare(tmp_path)


def test_adapter_rejects_an_unsafe_id(demo, tmp_path):
    rows = read_rows(demo / "metadata.csv")[:1]
    rows[0]["id"] = "demo.bad"
    with (tmp_path / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DatasetLayoutError, match="demo.bad"):
        get_adapter("demo").prepare(tmp_path)


def test_window_annotations_are_relative_to_the_window(demo):
    adapter = get_adapter("demo")
    record = adapter.prepare(demo)[0]
    window = adapter.window_annotations(record, 2.0, 6.0)
    times = [b["time"] for b in window["beats"]]
    assert times and 0.0 <= min(times) and max(times) < 4.0
    expected = [b["time"] - 2.0 for b in record.annotations["beats"] if 2.0 <= b["time"] < 6.0]
    np.testing.assert_allclose(times, expected, atol=1e-6)
    assert window["chords"][0]["start"] == 0.0 and window["chords"][-1]["end"] == pytest.approx(4.0)
    assert window["key"] == record.annotations["key"]
