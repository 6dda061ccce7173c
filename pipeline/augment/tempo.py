"""Tempo: madmom's comb-filter tempo estimator on the beat activation of the downbeat network.

The reference recipe ran ``RNNBeatProcessor`` (a second ensemble of eight recurrent networks) only
to feed ``TempoEstimationProcessor``. ``RNNDownBeatProcessor`` already gives, per frame, the
probability of a beat that is not a downbeat and of a downbeat; their sum is the probability of a
beat, which is what the tempo estimator takes. ``benchmarks/augment.py`` compares the two inputs.
"""

from __future__ import annotations

import numpy as np

from pipeline.augment.common import BEAT_FPS, FeatureUnavailable

# madmom's defaults for TempoEstimationProcessor (as the reference used them), spelled out so that
# the histogram processor can be passed directly instead of by the deprecated ``method`` argument.
MIN_BPM = 40.0
MAX_BPM = 250.0
COMB_ALPHA = 0.79
ACT_SMOOTH_S = 0.14
HIST_SMOOTH_BINS = 9


def build_tempo_estimator():
    from madmom.features.tempo import CombFilterTempoHistogramProcessor, TempoEstimationProcessor

    histogram = CombFilterTempoHistogramProcessor(min_bpm=MIN_BPM, max_bpm=MAX_BPM, alpha=COMB_ALPHA, fps=BEAT_FPS)
    return TempoEstimationProcessor(
        method=None, histogram_processor=histogram, act_smooth=ACT_SMOOTH_S,
        hist_smooth=HIST_SMOOTH_BINS, fps=BEAT_FPS,
    )


def beat_activation(downbeat_activations: np.ndarray) -> np.ndarray:
    """P(beat) per frame from RNNDownBeatProcessor's (beat, downbeat) columns."""
    return downbeat_activations.sum(axis=1)


def estimate_tempo(beat_activation: np.ndarray, estimator, *, min_duration_s: float, beat_threshold: float) -> float:
    """The strongest tempo in BPM, rounded to 0.1, or FeatureUnavailable with the reason."""
    duration_s = len(beat_activation) / BEAT_FPS
    if duration_s < min_duration_s:
        raise FeatureUnavailable(
            f"the clip is {duration_s:.1f} s long; a tempo needs at least {min_duration_s:g} s "
            f"(two beats at the slowest tempo considered, {MIN_BPM:g} BPM)"
        )
    peak = float(np.max(beat_activation)) if len(beat_activation) else 0.0
    if peak < beat_threshold:
        raise FeatureUnavailable(
            f"no beat heard: the beat activation never reaches {beat_threshold:g} (its peak is {peak:.3f})"
        )
    tempi = estimator(beat_activation)
    bpm = float(tempi[0][0]) if len(tempi) else float("nan")
    if not np.isfinite(bpm) or bpm <= 0:
        raise FeatureUnavailable("the tempo histogram has no peak")
    return round(bpm, 1)
