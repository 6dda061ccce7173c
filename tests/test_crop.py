import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.audio import AudioChecks, AudioError, probe, read_window
from pipeline.crop import CropSettings, all_windows, choose_windows, crop_item, crop_stage, paper_window
from pipeline.records import ClipRecord, read_jsonl, read_records
from pipeline.runner import InlineExecutor, LocalExecutor, errors_path, run_stage

SR = 22050


def tone(seconds, freq=440.0, sr=SR, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def sectioned(seconds, sr=SR):
    """A tone whose frequency says which 5 s section of the track it is (200 Hz + 100 Hz per section)."""
    t = np.arange(int(seconds * sr)) / sr
    freq = 200.0 + 100.0 * np.floor(t / 5.0)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return (0.5 * np.sin(phase)).astype(np.float32)


def dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]


def record(rid, path, **kw):
    return ClipRecord(id=rid, dataset="fixture", split="train", audio_path=str(path), **kw).model_dump(mode="json", exclude_none=True)


# --- the window rule -----------------------------------------------------------------------


def test_paper_rule_short_tracks_keep_their_start():
    s = CropSettings(clips_dir="x")
    assert paper_window("a", 10.0, s) == (0.0, 10.0)
    assert paper_window("a", 25.0, s) == (0.0, 25.0)
    assert paper_window("a", 59.99, s) == (0.0, 25.0)


def test_paper_rule_long_tracks_take_the_late_window_80_percent_of_the_time():
    s = CropSettings(clips_dir="x")
    choices = Counter(paper_window(f"track-{i}", 180.0, s) for i in range(4000))
    assert set(choices) == {(30.0, 55.0), (0.0, 25.0)}
    late = choices[(30.0, 55.0)] / 4000
    assert abs(late - 0.8) < 0.025  # ~4 standard deviations of a binomial(4000, 0.8) fraction
    # 60 s exactly is "long"
    assert {paper_window(f"t{i}", 60.0, s) for i in range(50)} == {(30.0, 55.0), (0.0, 25.0)}


def test_window_choice_is_reproducible_and_seeded_by_id():
    s0, s1 = CropSettings(clips_dir="x", seed=0), CropSettings(clips_dir="x", seed=1)
    ids = [f"track-{i}" for i in range(200)]
    first = [paper_window(i, 200.0, s0) for i in ids]
    assert first == [paper_window(i, 200.0, s0) for i in ids]
    assert first != [paper_window(i, 200.0, s1) for i in ids]


def test_all_windows_and_given_windows():
    s = CropSettings(clips_dir="x")
    assert all_windows(80.0, s) == [(0.0, 25.0), (25.0, 50.0), (50.0, 75.0)]
    assert all_windows(75.0, s) == [(0.0, 25.0), (25.0, 50.0), (50.0, 75.0)]
    assert all_windows(20.0, s) == [(0.0, 20.0)]
    given = ClipRecord(id="m", dataset="musiccaps", split="train", audio_path="a.wav", crop_policy="given", start_s=30.0, end_s=40.0)
    assert choose_windows(given, 300.0, s) == [(30.0, 40.0)]
    assert choose_windows(given, 10.0, s) == [(0.0, 10.0)]  # the file was already trimmed
    with pytest.raises(AudioError) as exc:
        choose_windows(given, 35.0, s)
    assert exc.value.code == "window_outside_audio"


def test_invalid_settings_fail_naming_the_field():
    with pytest.raises(ValueError, match="p_late"):
        CropSettings(clips_dir="x", p_late=1.5)
    with pytest.raises(ValueError, match="clip_s"):
        CropSettings(clips_dir="x", clip_s=0)


# --- cutting real files --------------------------------------------------------------------


def test_crop_cuts_the_right_window_as_mono_44k_16bit(tmp_path):
    stereo = np.stack([sectioned(90.0), sectioned(90.0)], axis=1)
    src = tmp_path / "long.wav"
    sf.write(src, stereo, SR)
    s = CropSettings(clips_dir=str(tmp_path / "clips"))
    rid = next(f"t{i}" for i in range(100) if paper_window(f"t{i}", 90.0, s) == (30.0, 55.0))
    [out] = crop_item(record(rid, src), s)
    assert (out["start_s"], out["end_s"]) == (30.0, 55.0)
    assert out["source_duration_s"] == pytest.approx(90.0)
    info = sf.info(out["clip_path"])
    assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
    assert info.frames == 25 * 44100
    clip, sr = sf.read(out["clip_path"])
    # seconds 30-35 of the source are section 6 (800 Hz); seconds 50-55 section 10 (1200 Hz)
    assert dominant_freq(clip[: 4 * sr], sr) == pytest.approx(800, abs=3)
    assert dominant_freq(clip[-4 * sr :], sr) == pytest.approx(1200, abs=3)
    assert Path(out["clip_path"]).parent.name == "fixture"


def test_all_windows_policy_makes_one_record_per_window(tmp_path):
    src = tmp_path / "piece.flac"
    sf.write(src, sectioned(60.0), SR)
    outs = crop_item(record("mn-1", src, crop_policy="all_windows", task_families=["captioning"]), CropSettings(clips_dir=str(tmp_path / "c")))
    assert [o["id"] for o in outs] == ["mn-1-w000", "mn-1-w001"]
    assert all(o["source_id"] == "mn-1" for o in outs)
    assert [(o["start_s"], o["end_s"]) for o in outs] == [(0.0, 25.0), (25.0, 50.0)]


def test_mp3_sources_are_decoded(tmp_path):
    src = tmp_path / "song.mp3"
    sf.write(src, tone(12.0, 660.0, sr=44100), 44100)
    [out] = crop_item(record("mp3-1", src), CropSettings(clips_dir=str(tmp_path / "c")))
    clip, sr = sf.read(out["clip_path"])
    assert sr == 44100 and len(clip) / sr == pytest.approx(12.0, abs=0.1)
    assert dominant_freq(clip, sr) == pytest.approx(660, abs=3)


def test_odd_sample_rates_are_resampled(tmp_path):
    for rate in (8000, 11025, 44099, 96000):
        src = tmp_path / f"r{rate}.wav"
        sf.write(src, tone(3.0, 300.0, sr=rate), rate)
        audio = read_window(probe(src), 0.0, 3.0)
        assert len(audio) == pytest.approx(3 * 44100, abs=2)
        assert dominant_freq(audio, 44100) == pytest.approx(300, abs=2)


# --- bad audio: each case becomes an error record, the run goes on ---------------------------


def make_bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    d.mkdir(parents=True, exist_ok=True)
    cases = {}

    def case(name, code, path):
        cases[name] = (path, code)

    (d / "empty.wav").write_bytes(b"")
    case("empty", "empty_file", d / "empty.wav")
    (d / "text.wav").write_text("this is not audio at all\n" * 20)
    case("not-audio", "not_audio", d / "text.wav")
    sf.write(d / "full.wav", tone(4.0), SR, subtype="PCM_16")
    raw = (d / "full.wav").read_bytes()
    (d / "cut.wav").write_bytes(raw[: len(raw) // 2])
    case("truncated-wav", "truncated", d / "cut.wav")
    sf.write(d / "full.flac", np.random.default_rng(0).normal(0, 0.2, 4 * SR), SR)
    raw = (d / "full.flac").read_bytes()
    (d / "cut.flac").write_bytes(raw[: len(raw) // 2])
    case("truncated-flac", "truncated", d / "cut.flac")
    sf.write(d / "silent.wav", np.zeros(3 * SR, dtype=np.float32), SR)
    case("silent", "silent", d / "silent.wav")
    nan = tone(3.0)
    nan[1000:1010] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    case("nan", "non_finite", d / "nan.wav")
    sf.write(d / "one.wav", np.array([0.5], dtype=np.float32), SR)
    case("one-sample", "too_short", d / "one.wav")
    sf.write(d / "many.wav", np.tile(tone(2.0)[:, None], (1, 16)), SR)
    case("many-channels", "too_many_channels", d / "many.wav")
    sf.write(d / "slow.wav", tone(3.0, 50.0, sr=1000), 1000)
    case("low-rate", "bad_sample_rate", d / "slow.wav")
    sf.write(d / "header-only.wav", np.zeros(0, dtype=np.float32), SR)
    case("no-samples", "empty_audio", d / "header-only.wav")
    case("missing", "missing_file", d / "nope.wav")
    return cases


def test_every_bad_audio_case_is_an_error_record_with_its_reason(tmp_path):
    cases = make_bad_files(tmp_path / "bad")
    good = tmp_path / "good.wav"
    sf.write(good, tone(5.0), SR)
    rows = [record("good-1", good)] + [record(name, path) for name, (path, _) in cases.items()] + [record("good-2", good)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clips.jsonl"
    summary = run_stage(crop_stage(CropSettings(clips_dir=str(tmp_path / "clips"))), inp, out, executor=LocalExecutor(2), progress=False)
    assert [r.id for r in read_records(out)] == ["good-1", "good-2"]
    errors = {e["id"]: e for e in read_jsonl(errors_path(out))}
    assert {k: e["code"] for k, e in errors.items()} == {name: code for name, (_, code) in cases.items()}
    for name, (path, _) in cases.items():
        assert path.name in errors[name]["reason"]
    assert summary.failed_total == len(cases) and summary.done == 2


def test_too_short_and_silence_limits_are_configurable(tmp_path):
    src = tmp_path / "quiet.wav"
    sf.write(src, tone(0.5, amp=0.001), SR)
    with pytest.raises(AudioError) as exc:
        read_window(probe(src), 0, 0.5)
    assert exc.value.code == "too_short"
    audio = read_window(probe(src), 0, 0.5, checks=AudioChecks(min_duration_s=0.1, silence_dbfs=-70))
    assert len(audio) == pytest.approx(0.5 * 44100, abs=2)
    with pytest.raises(AudioError) as exc:
        read_window(probe(src), 0, 0.5, checks=AudioChecks(min_duration_s=0.1, silence_dbfs=-50))
    assert exc.value.code == "silent"


def test_a_malformed_record_is_an_error_record(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "x1", "dataset": "demo", "split": "nope", "audio_path": "a.wav"}) + "\n")
    run_stage(crop_stage(CropSettings(clips_dir=str(tmp_path / "c"))), inp, tmp_path / "o.jsonl", executor=InlineExecutor(), progress=False)
    [err] = read_jsonl(errors_path(tmp_path / "o.jsonl"))
    assert err["code"] == "invalid_record" and "split" in err["reason"]
