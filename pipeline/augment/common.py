"""What the estimators share: the frame rate, and how a feature says 'none' (the feature names are in
``pipeline.contracts``)."""

from __future__ import annotations

from pipeline.errors import PipelineError

SAMPLE_RATE = 44_100  # what every madmom network here was trained on
BEAT_FPS = 100  # frames per second of RNNDownBeatProcessor's activations
TIME_DECIMALS = 2  # 10 ms: the beat tracker's resolution (the chord recogniser's is 100 ms)


class FeatureUnavailable(PipelineError):
    """An estimator has no answer for this clip; the message is the reason recorded in the record."""
