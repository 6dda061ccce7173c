"""Key: madmom's key CNN (Korzeniowski & Widmer 2018) over the whole clip.

Labels are madmom's own (``madmom.features.key.KEY_LABELS``): the usual key-signature spelling,
with the two six-accidental keys written F# major and D# minor::

    major  A  Bb  B  C  Db  D  Eb  E  F  F#  G  Ab
    minor  A  Bb  B  C  C#  D  D#  E  F  F#  G  G#

The network answers for any input, silence and noise included, so its answer is only given when
the chord recogniser heard at least one chord in the clip: no harmony, no key.
"""

from __future__ import annotations

import numpy as np

from pipeline.augment.common import FeatureUnavailable

SHARP_TO_FLAT = {"C#": "Db", "D#": "Eb", "F#": "Gb", "G#": "Ab", "A#": "Bb"}
# Keys whose pitches are spelled with sharps; every other key (the flat keys, and C major and
# A minor, where the usual chords off the scale are the borrowed Bb, Eb and Ab) uses flats.
SHARP_KEYS = frozenset({
    "G major", "D major", "A major", "E major", "B major", "F# major", "C# major",
    "E minor", "B minor", "F# minor", "C# minor", "G# minor", "D# minor", "A# minor",
})


def build_key_recogniser():
    from madmom.features.key import CNNKeyRecognitionProcessor

    return CNNKeyRecognitionProcessor()


def estimate_key(signal, recogniser, *, chord_heard: bool) -> str:
    """The clip's key and mode, e.g. 'F# minor', or FeatureUnavailable with the reason."""
    from madmom.features.key import key_prediction_to_label

    if not chord_heard:
        raise FeatureUnavailable("no key: the chord recogniser heard no chord in the clip")
    probabilities = recogniser(signal)
    if not np.all(np.isfinite(probabilities)):
        raise FeatureUnavailable("no key: the key network gave non-finite probabilities")
    return key_prediction_to_label(probabilities)


def spell_pitch(pitch: str, key: str | None) -> str:
    """A sharp-spelled pitch class ('A#') in the spelling of ``key`` ('Bb' in F major); sharps
    when the key is unknown."""
    if key is None or key in SHARP_KEYS:
        return pitch
    return SHARP_TO_FLAT.get(pitch, pitch)
