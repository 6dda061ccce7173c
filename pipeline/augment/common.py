"""What the estimators share: the feature names, the frame rate, and how a feature says 'none'."""

from __future__ import annotations

TEMPO = "tempo_in_beats_per_minute_madmom"
KEY = "key_madmom"
CHORDS = "chords_madmom"
BEAT_GRID = "beat_grid_madmom"
UNAVAILABLE = "unavailable"
FEATURE_NAMES = (TEMPO, KEY, CHORDS, BEAT_GRID)

SAMPLE_RATE = 44_100  # what every madmom network here was trained on
BEAT_FPS = 100  # frames per second of RNNDownBeatProcessor's activations
TIME_DECIMALS = 2  # 10 ms: the beat tracker's resolution (the chord recogniser's is 100 ms)


class FeatureUnavailable(Exception):
    """An estimator has no answer for this clip; the message is the reason recorded in the record."""
