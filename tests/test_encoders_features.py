import numpy as np
import pytest

from pipeline.encoders import build_encoder, check_encoder_options, describe_encoder, encoder_manifest
from pipeline.encoders.features import COLUMNS, DIM, TEMPO_BPM, FeaturesEncoder, frame_count
from pipeline.runner import StageConfigError

SR = 44_100
ENC = FeaturesEncoder()


def clicks(bpm, seconds=12.0, sr=SR, accent_every=0):
    """A click track (with every n-th click louder when ``accent_every``) plus a quiet drone."""
    x = 0.02 * np.sin(2 * np.pi * 110 * np.arange(int(seconds * sr)) / sr)
    rng = np.random.default_rng(0)
    for k, start in enumerate(np.arange(0.05, seconds, 60.0 / bpm)):
        i = int(start * sr)
        burst = rng.standard_normal(min(1500, len(x) - i)) * np.exp(-np.arange(min(1500, len(x) - i)) / 200)
        x[i : i + len(burst)] += burst * (1.0 if accent_every and k % accent_every == 0 else 0.5)
    return x.astype(np.float32)


def chord(freqs, seconds=3.0, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32)


def cols(out, name):
    a, b = COLUMNS[name]
    return out[:, a:b]


def test_frames_are_exactly_ten_per_second_rounding_up():
    assert frame_count(25 * SR) == 250
    assert frame_count(int(24.93 * SR)) == 250
    assert frame_count(4410) == 1 and frame_count(4411) == 2
    out = ENC.encode(chord([440.0], seconds=2.55), SR)
    assert out.shape == (26, DIM) and out.dtype == np.float32 and np.isfinite(out).all()
    assert sum(b - a for a, b in COLUMNS.values()) == DIM


def test_a_click_lands_in_the_frame_of_its_time():
    x = np.zeros(3 * SR, dtype=np.float32)
    x[int(1.234 * SR) : int(1.234 * SR) + 200] = 1.0
    onset_max = cols(ENC.encode(x, SR), "onset_max")[:, 0]
    assert int(np.argmax(onset_max)) == 12


@pytest.mark.parametrize("bpm", [90.0, 140.0])
def test_the_tempogram_peaks_at_the_tempo(bpm):
    tempogram = cols(ENC.encode(clicks(bpm), SR), "tempogram")[20:-20].mean(axis=0)
    beat_range = (TEMPO_BPM >= 60) & (TEMPO_BPM <= 200)
    best = TEMPO_BPM[beat_range][np.argmax(tempogram[beat_range])]
    assert abs(best - bpm) / bpm < 0.04


def test_the_tempogram_holds_beat_and_bar_periods_and_nothing_between():
    """At 150 BPM the beat (150), 3- and 4-beat bars (50, 37.5) stand out; 1.5 beats (100) does not."""
    tempogram = cols(ENC.encode(clicks(150.0), SR), "tempogram")[20:-20].mean(axis=0)
    at = lambda bpm: tempogram[np.argmin(np.abs(TEMPO_BPM - bpm))]
    assert min(at(150.0), at(50.0), at(37.5)) > 0.5
    assert at(100.0) < 0.1


@pytest.mark.parametrize("freqs,classes", [
    ([261.63, 329.63, 392.00], {0, 4, 7}),    # C major: C E G
    ([220.00, 261.63, 329.63], {9, 0, 4}),    # A minor: A C E
    ([146.83, 185.00, 220.00], {2, 6, 9}),    # D major, low register: D F# A
])
def test_chroma_names_the_chord(freqs, classes):
    chroma = cols(ENC.encode(chord(freqs), SR), "chroma").mean(axis=0)
    assert set(np.argsort(chroma)[-3:].tolist()) == classes


def test_timbre_columns_tell_noise_from_a_low_tone():
    rng = np.random.default_rng(1)
    noise = ENC.encode((0.3 * rng.standard_normal(2 * SR)).astype(np.float32), SR)
    tone = ENC.encode(chord([110.0], seconds=2.0), SR)
    assert cols(noise, "centroid").mean() > cols(tone, "centroid").mean() + 2  # octaves
    mel_noise, mel_tone = cols(noise, "log_mel").mean(axis=0), cols(tone, "log_mel").mean(axis=0)
    assert mel_noise[-10:].mean() > mel_tone[-10:].mean() + 1.0
    assert np.argmax(mel_tone) < 16


def test_deterministic_level_invariant_and_sample_rate_aware():
    x = clicks(120.0, seconds=4.0)
    first = ENC.encode(x, SR)
    assert np.array_equal(first, ENC.encode(x, SR))
    np.testing.assert_allclose(ENC.encode(0.1 * x, SR), first, atol=1e-4)  # peak-normalised
    half_rate = ENC.encode(x[::2], SR // 2)
    assert half_rate.shape == first.shape
    stereo = ENC.encode(np.stack([x, x], axis=1), SR)
    np.testing.assert_allclose(stereo, first, atol=1e-5)


def test_silence_and_bad_input():
    out = ENC.encode(np.zeros(SR, dtype=np.float32), SR)
    assert np.isfinite(out).all() and (cols(out, "chroma") == 0).all()
    with pytest.raises(ValueError):
        ENC.encode(np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(ValueError):
        ENC.encode(np.array([0.0, np.nan], dtype=np.float32), SR)


def test_selected_by_name_with_its_manifest():
    encoder = build_encoder("features", check_encoder_options("features", {}))
    assert (encoder.name, encoder.dim, encoder.frame_rate_hz, encoder.layer) == ("features", 128, 10.0, None)
    manifest = encoder_manifest(describe_encoder("features", {}), "float16")
    assert manifest["name"] == "features" and manifest["dim"] == 128 and manifest["frame_rate_hz"] == 10.0
    assert manifest["dtype"] == "float16" and manifest["layer"] is None
    assert {"numpy", "scipy"} <= set(manifest["packages"])
    assert manifest["config"]["frames"] == "ceil(duration_s * 10)"
    with pytest.raises(StageConfigError, match="--encoder"):
        check_encoder_options("beats", {})
    with pytest.raises(StageConfigError, match="no options"):
        check_encoder_options("features", {"layer": 3})
