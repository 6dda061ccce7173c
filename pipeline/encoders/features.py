"""The ``features`` encoder: a frame-level music representation at exactly 10 Hz, with no weights.

It carries what questions about tempo, metre, key, chords, instruments and style need, computed
with numpy and scipy's FFT only (no model, no download, deterministic, a fraction of a second per
25 s clip on one core). The audio is mixed to mono, resampled to 44.1 kHz and peak-normalised
(as for Jukebox), then analysed at 100 Hz and pooled to 10 Hz.

Frames: output frame ``k`` covers ``[k / 10, (k + 1) / 10)`` s of the clip, and a clip of ``n``
samples at 44.1 kHz has ``ceil(n / 4410)`` frames, i.e. ``ceil(duration_s * 10)``: a final partial
window is a frame, averaged over the audio it holds (a 25.0 s clip gives 250 frames, 24.93 s gives
250 too).

Columns (128, float32), each scaled to roughly unit range by fixed constants (never per clip, so
that levels compare across clips):

===========  ==============================================================================
0-63         log-mel energy: 64 mel bands (HTK scale, 30 Hz-16 kHz, 46 ms windows), in dB
             relative to a full-scale sine, as ``(dB + 40) / 20``, floored at -80 dB
64-75        chroma C, C#, ..., B from 186 ms windows (55 Hz-4.2 kHz), divided by the frame's
             largest pitch class (all zero in silence)
76, 77       onset strength (spectral flux of the log-mel bands at 100 Hz): mean and max in the
             frame, dB per band / 6
78           loudness: RMS in dB relative to the clip's peak, ``dB / 20 + 1``, floored at -80 dB
79           spectral centroid, ``log2(centroid / 1 kHz)``
80-127       tempogram: autocorrelation of the onset strength in an 8 s window centred on the
             frame, divided by its value at lag 0, in 48 tempo bins log-spaced from 15 to 300 BPM
             (the largest value over the lags each bin spans; beat and bar periods both show up)
===========  ==============================================================================
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import scipy.fft
from threadpoolctl import ThreadpoolController

from pipeline.encoders import prepare_audio

NAME = "features"
SAMPLE_RATE = 44_100
FRAME_RATE_HZ = 10.0
FRAME_HOP = 4410  # samples per output frame
ANALYSIS_PER_FRAME = 10
ANALYSIS_HOP = FRAME_HOP // ANALYSIS_PER_FRAME  # 100 Hz analysis
N_FFT = 2048
N_MELS = 64
MEL_FMIN, MEL_FMAX = 30.0, 16_000.0
CHROMA_N_FFT = 8192
CHROMA_PER_FRAME = 2
CHROMA_HOP = FRAME_HOP // CHROMA_PER_FRAME
CHROMA_FMIN, CHROMA_FMAX = 55.0, 4186.0
TEMPO_BPM = np.geomspace(15.0, 300.0, 48)
TEMPO_WINDOW = 800  # analysis frames: 8 s
FLOOR_DB = -80.0

COLUMNS = {
    "log_mel": (0, 64),
    "chroma": (64, 76),
    "onset_mean": (76, 77),
    "onset_max": (77, 78),
    "loudness": (78, 79),
    "centroid": (79, 80),
    "tempogram": (80, 128),
}
DIM = 128


def frame_count(n_samples: int) -> int:
    """Output frames for ``n_samples`` of 44.1 kHz audio: ``ceil(n_samples / 4410)``."""
    return -(-n_samples // FRAME_HOP)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=None)
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


@lru_cache(maxsize=None)
def mel_filterbank() -> np.ndarray:
    """Triangular HTK-mel filters ``[N_MELS, N_FFT // 2 + 1]``, each of unit area."""
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(MEL_FMIN), _hz_to_mel(MEL_FMAX), N_MELS + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    fb = np.maximum(0.0, np.minimum(rising, falling))
    fb /= np.maximum(fb.sum(axis=1, keepdims=True), 1e-12)
    return fb.astype(np.float32)


@lru_cache(maxsize=None)
def chroma_filterbank() -> np.ndarray:
    """``[12, CHROMA_N_FFT // 2 + 1]``: each bin shared between its two nearest pitch classes."""
    freqs = np.fft.rfftfreq(CHROMA_N_FFT, 1.0 / SAMPLE_RATE)
    fb = np.zeros((12, len(freqs)), dtype=np.float64)
    inside = (freqs >= CHROMA_FMIN) & (freqs <= CHROMA_FMAX)
    pitch = 12.0 * np.log2(freqs[inside] / 440.0) + 69.0  # MIDI number; 60 is C4
    for pc in range(12):
        distance = np.abs((pitch - pc + 6.0) % 12.0 - 6.0)
        fb[pc, inside] = np.maximum(0.0, 1.0 - distance)
    return fb.astype(np.float32)


@lru_cache(maxsize=None)
def _window(n: int) -> np.ndarray:
    return np.hanning(n + 1)[:-1].astype(np.float32)  # periodic Hann


def _power_spectrogram(x: np.ndarray, n_fft: int, hop: int, n_frames: int) -> np.ndarray:
    """Power of centred frames ``i * hop`` (zero-padded at both ends), ``[n_frames, n_fft // 2 + 1]``."""
    needed = (n_frames - 1) * hop + n_fft
    padded = np.zeros(needed, dtype=np.float32)
    body = x[: max(0, needed - n_fft // 2)]
    padded[n_fft // 2 : n_fft // 2 + len(body)] = body
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n_frames]
    spectrum = scipy.fft.rfft(frames * _window(n_fft), axis=1, workers=1)
    power = spectrum.real**2 + spectrum.imag**2
    # A full-scale sine at a bin centre reads 0 dB.
    return power / np.float32((_window(n_fft).sum() / 2.0) ** 2)


def _pool(values: np.ndarray, per_frame: int, valid: np.ndarray, reducer=np.add) -> np.ndarray:
    """Mean (or max with ``reducer=np.maximum``) over each output frame's valid analysis frames."""
    frames = values.shape[0] // per_frame
    shaped = values.reshape(frames, per_frame, *values.shape[1:])
    mask = valid.reshape(frames, per_frame, *([1] * (values.ndim - 1)))
    if reducer is np.maximum:
        return np.where(mask, shaped, -np.inf).max(axis=1)
    counts = mask.sum(axis=1)
    return (shaped * mask).sum(axis=1) / counts


class FeaturesEncoder:
    """See the module docstring for what each of the 128 columns holds."""

    name = NAME
    dim = DIM
    frame_rate_hz = FRAME_RATE_HZ
    layer = None

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray:
        # A multi-threaded BLAS splits the filterbank products differently from a single thread
        # (seen with OpenBLAS on AMD EPYC): one thread gives the same bytes in every executor.
        with _blas().limit(limits=1, user_api="blas"):
            return self._encode(audio, sr)

    def _encode(self, audio: np.ndarray, sr: int) -> np.ndarray:
        x = prepare_audio(audio, sr)
        n = len(x)
        frames = frame_count(n)
        analysis = frames * ANALYSIS_PER_FRAME
        valid = np.arange(analysis) * ANALYSIS_HOP < n

        power = _power_spectrogram(x, N_FFT, ANALYSIS_HOP, analysis)
        mel_power = power @ mel_filterbank().T
        mel_db = np.maximum(10.0 * np.log10(mel_power + 1e-12), FLOOR_DB)
        log_mel = (10.0 * np.log10(_pool(mel_power, ANALYSIS_PER_FRAME, valid) + 1e-12)).clip(FLOOR_DB)

        flux = np.zeros(analysis, dtype=np.float32)
        flux[1:] = np.maximum(np.diff(mel_db, axis=0), 0.0).mean(axis=1)
        flux[~valid] = 0.0
        onset_mean = _pool(flux, ANALYSIS_PER_FRAME, valid)
        onset_max = _pool(flux, ANALYSIS_PER_FRAME, valid, reducer=np.maximum)

        mean_power = _pool(power, ANALYSIS_PER_FRAME, valid)
        freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE).astype(np.float32)
        centroid = (mean_power @ freqs) / np.maximum(mean_power.sum(axis=1), 1e-12)
        centroid = np.log2(np.maximum(centroid, 20.0) / 1000.0)

        chroma_valid = np.arange(frames * CHROMA_PER_FRAME) * CHROMA_HOP < n
        chroma_power = _power_spectrogram(x, CHROMA_N_FFT, CHROMA_HOP, frames * CHROMA_PER_FRAME)
        chroma = _pool(chroma_power @ chroma_filterbank().T, CHROMA_PER_FRAME, chroma_valid)
        peak = chroma.max(axis=1, keepdims=True)
        chroma = np.where(peak > 1e-8, chroma / np.maximum(peak, 1e-12), 0.0)

        padded = np.zeros(frames * FRAME_HOP, dtype=np.float32)
        padded[:n] = x
        counts = np.minimum(FRAME_HOP, n - np.arange(frames) * FRAME_HOP)
        rms_db = 10.0 * np.log10((padded.reshape(frames, FRAME_HOP) ** 2).sum(axis=1) / counts + 1e-12)
        loudness = np.maximum(rms_db, FLOOR_DB) / 20.0 + 1.0

        out = np.empty((frames, DIM), dtype=np.float32)
        out[:, 0:64] = (log_mel + 40.0) / 20.0
        out[:, 64:76] = chroma
        out[:, 76] = onset_mean / 6.0
        out[:, 77] = onset_max / 6.0
        out[:, 78] = loudness
        out[:, 79] = centroid
        out[:, 80:128] = tempogram(flux, frames)
        return out

    def encode_batch(self, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        return [self.encode(audio, sr) for audio, sr in clips]

    def config(self) -> dict[str, Any]:
        return {
            "sample_rate": SAMPLE_RATE,
            "frames": "ceil(duration_s * 10)",
            "peak_normalise": True,
            "columns": {k: list(v) for k, v in COLUMNS.items()},
            "n_fft": N_FFT,
            "chroma_n_fft": CHROMA_N_FFT,
            "mel": {"bands": N_MELS, "fmin": MEL_FMIN, "fmax": MEL_FMAX, "scale": "htk"},
            "tempogram": {"bpm_min": float(TEMPO_BPM[0]), "bpm_max": float(TEMPO_BPM[-1]),
                          "bins": len(TEMPO_BPM), "window_s": TEMPO_WINDOW / 100},
        }


@lru_cache(maxsize=None)
def _tempo_lag_edges() -> np.ndarray:
    """Lag ranges (in analysis frames, ascending) of the tempo bins: geometric midpoints between bins."""
    lags = 60.0 * 100.0 / TEMPO_BPM[::-1]  # ascending lags = descending tempi
    ratio = np.sqrt(lags[1:] / lags[:-1])
    edges = np.concatenate([[lags[0] / ratio[0]], lags[:-1] * ratio, [lags[-1] * ratio[-1]]])
    edges = np.ceil(edges).astype(int)  # integer lag l belongs to the bin whose centre is nearest
    assert (np.diff(edges) > 0).all()
    return edges


def tempogram(onset: np.ndarray, frames: int) -> np.ndarray:
    """Normalised local autocorrelation of a 100 Hz onset envelope, per 10 Hz frame and tempo bin.

    Each bin takes the largest autocorrelation over the lags it spans (bins are 6.6 % apart, wider
    than a beat's autocorrelation peak at long lags), so no beat or bar period falls between bins.
    """
    half = TEMPO_WINDOW // 2
    padded = np.concatenate([np.zeros(half, np.float32), onset.astype(np.float32), np.zeros(half, np.float32)])
    centres = np.arange(frames) * ANALYSIS_PER_FRAME + ANALYSIS_PER_FRAME // 2
    segments = np.lib.stride_tricks.sliding_window_view(padded, TEMPO_WINDOW)[centres]
    segments = (segments - segments.mean(axis=1, keepdims=True)) * _window(TEMPO_WINDOW)
    n_fft = 1 << math.ceil(math.log2(2 * TEMPO_WINDOW))
    spectrum = scipy.fft.rfft(segments, n=n_fft, axis=1, workers=1)
    edges = _tempo_lag_edges()
    acf = scipy.fft.irfft(spectrum.real**2 + spectrum.imag**2, n=n_fft, axis=1, workers=1)[:, : edges[-1] + 1]
    energy = acf[:, :1]
    acf = np.where(energy > 1e-10, acf / np.maximum(energy, 1e-10), 0.0)
    per_bin = np.maximum.reduceat(acf, edges[:-1], axis=1)  # ascending lags
    return per_bin[:, ::-1].astype(np.float32)  # ascending tempi, like TEMPO_BPM


# --- the encoder-module interface (see pipeline.encoders) ----------------------------------------


def check_options(options: dict[str, Any], devices_here: bool = True) -> dict[str, Any]:
    from pipeline.runner import StageConfigError

    if options:
        raise StageConfigError(f"the features encoder takes no options, got {sorted(options)}")
    return {}


def describe(options: dict[str, Any]) -> dict[str, Any]:
    enc = FeaturesEncoder()
    return {"name": NAME, "layer": None, "frame_rate_hz": FRAME_RATE_HZ, "dim": DIM, "config": enc.config(),
            "packages": ("scipy", "soxr")}


def build(options: dict[str, Any]) -> FeaturesEncoder:
    return FeaturesEncoder()
