"""Beat grid: madmom's bar-pointer downbeat tracker on the downbeat network's activations."""

from __future__ import annotations

import numpy as np

from pipeline.augment.common import BEAT_FPS, TIME_DECIMALS, FeatureUnavailable

BEATS_PER_BAR = (3, 4)  # the metres the tracker chooses between, as in the reference
# madmom's default (DBNDownBeatTrackingProcessor.THRESHOLD): activations below it are 'no beat';
# the tempo estimator uses it too, to tell a clip without any beat.
BEAT_THRESHOLD = 0.05


def build_beat_tracker(beats_per_bar: tuple[int, ...] = BEATS_PER_BAR):
    """``DBNDownBeatTrackingProcessor`` with madmom's defaults (55-215 BPM, 60 tempi, transition
    lambda 100, observation lambda 16, threshold 0.05, peak correction on)."""
    from madmom.features.downbeats import DBNDownBeatTrackingProcessor

    return DBNDownBeatTrackingProcessor(beats_per_bar=list(beats_per_bar), fps=BEAT_FPS, threshold=BEAT_THRESHOLD)


def track_beat_grid(downbeat_activations: np.ndarray, tracker) -> list[dict]:
    """[{"time", "beat_number"}] with times in seconds from the clip start, or FeatureUnavailable.

    A grid needs two downbeats (one whole bar) to say anything about the metre; with fewer, the
    beat numbers are guesses and the grid is not given.
    """
    try:
        beats = tracker(downbeat_activations)
    except IndexError:
        # madmom 0.16 raises here when decoding finds no beat at all (CPJKU/madmom#488)
        raise FeatureUnavailable("no beat grid: the downbeat tracker found no beats") from None
    if len(beats) == 0:
        raise FeatureUnavailable("no beat grid: the downbeat tracker found no beats")
    numbers = beats[:, 1].astype(int)
    downbeats = int(np.sum(numbers == 1))
    if downbeats < 2:
        raise FeatureUnavailable(
            f"no beat grid: the downbeat tracker found {_count(len(beats), 'beat')} but "
            f"{_count(downbeats, 'downbeat')}, not a whole bar"
        )
    return [{"time": round(float(t), TIME_DECIMALS), "beat_number": int(n)} for t, n in zip(beats[:, 0], numbers)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
