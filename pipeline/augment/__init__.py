"""The augment stage: madmom's tempo, key, chords and beat grid of each clip the model hears.

Input: clip records from the crop stage (each with ``clip_path``, a 44.1 kHz mono wav of the
window the model hears). Output: the same records with these fields added to ``features``; every
time is in seconds from the start of the clip, rounded to 10 ms::

    tempo_in_beats_per_minute_madmom  float, BPM, one decimal                    e.g. 121.3
    key_madmom                        "<tonic> major|minor"                       e.g. "F# minor"
    chords_madmom                     [{"start", "end", "chord"}], covering the clip from 0 s
                                      to its end; chord names "<root> major|minor" or "no chord"
    beat_grid_madmom                  [{"time", "beat_number"}], beat 1 = downbeat; the largest
                                      beat number is the metre (3 or 4)
    unavailable                       {feature name: reason} for each of the four that could not
                                      be computed ({} when all were)

A feature is either present or named in ``unavailable``, never both. Earlier values of these
fields are replaced; other keys of ``features`` are kept.

Spelling. Keys are spelled as madmom's ``KEY_LABELS``: the usual key-signature spelling, with
the two six-accidental keys written F# major and D# minor. Chord roots are spelled as the clip's
key spells them: sharps in G, D, A, E, B, F# major and E, B, F#, C#, G#, D# minor; flats in every
other key (C major and A minor included: their usual chords off the scale are Bb, Eb, Ab); sharps
when the key is unavailable.

Estimators (madmom, Böck et al. 2016; parameters are madmom's defaults, as in the reference):

- One ``RNNDownBeatProcessor`` pass per clip (eight BLSTMs, 100 fps) gives the (beat, downbeat)
  activations used twice: by ``DBNDownBeatTrackingProcessor(beats_per_bar=[3, 4], fps=100)`` for
  the beat grid, and, summed into a beat activation, by ``TempoEstimationProcessor`` (comb filter,
  40-250 BPM, fps=100) for the tempo. The reference ran ``RNNBeatProcessor`` as well, only for the
  tempo; ``benchmarks/augment.py`` measures that the summed activation does as well.
- ``CNNChordFeatureProcessor`` -> ``CRFChordRecognitionProcessor`` (10 fps; major, minor, no chord).
- ``CNNKeyRecognitionProcessor`` -> ``key_prediction_to_label``.

What is analysed is the clip itself, not the whole track: tempo and key describe the 25 s the
model hears, and there is nothing to crop afterwards.

When a feature is unavailable, and why (the recorded reason says which):

- the clip is silent (peak below ``silence_dbfs``, -80 dBFS) or shorter than 0.1 s: all four;
- tempo: the clip is shorter than ``min_tempo_s`` (3 s), the beat activation never reaches the
  beat tracker's threshold (0.05), or the tempo histogram has no peak;
- beat grid: the tracker finds no beats (or raises IndexError, as madmom 0.16 does on hopeless
  input), or fewer than two downbeats (no whole bar, so no metre);
- chords: the recogniser hears only no-chord;
- key: the chord recogniser hears no chord (the key network names a key even for silence or noise);
- any other exception from one estimator: that feature, with the exception named; the others are
  still computed.

Item errors (the record goes to the errors file instead): a record without ``clip_path``
(``not_cropped``), and a clip file that is missing, unreadable or holds NaN samples (the codes of
``pipeline.audio``).

Threads: each worker runs every onnxruntime session on one intra-op thread (see
``pipeline.augment.runtime``) and, through the runner, one BLAS thread, so N workers use N cores.
"""

from pipeline.augment.common import FeatureUnavailable
from pipeline.contracts import BEAT_GRID, CHORDS, FEATURE_NAMES, KEY, TEMPO, UNAVAILABLE
from pipeline.augment.stage import (
    AugmentSettings,
    Estimators,
    analyse_clip,
    augment_item,
    augment_stage,
    build_estimators,
    load_clip,
)

__all__ = [
    "AugmentSettings", "BEAT_GRID", "CHORDS", "Estimators", "FEATURE_NAMES", "FeatureUnavailable",
    "KEY", "TEMPO", "UNAVAILABLE", "analyse_clip", "augment_item", "augment_stage",
    "build_estimators", "load_clip",
]
