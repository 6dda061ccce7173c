"""Chords: madmom's chord CNN features decoded by its CRF (Korzeniowski & Widmer 2016).

The recogniser knows 24 chords (12 roots x major/minor) and no-chord, at 10 frames per second.
Its labels ('A#:maj', 'C:min', 'N') become readable names: the root spelled as in the clip's key
(see ``pipeline.augment.key.spell_pitch``) and the quality as a word, so 'A#:maj' in F major is
'Bb major'. No-chord segments are kept, named "no chord", so that the segments cover the clip
from 0 s to its end without gaps.
"""

from __future__ import annotations

from pipeline.augment.common import TIME_DECIMALS, FeatureUnavailable
from pipeline.augment.key import spell_pitch

NO_CHORD = "no chord"
QUALITY_NAMES = {"maj": "major", "min": "minor"}


def build_chord_recogniser():
    from madmom.features.chords import CNNChordFeatureProcessor, CRFChordRecognitionProcessor
    from madmom.processors import SequentialProcessor

    return SequentialProcessor([CNNChordFeatureProcessor(), CRFChordRecognitionProcessor(fps=10)])


def recognise_chords(signal, recogniser) -> list[tuple[float, float, str]]:
    """madmom's raw segments: (start, end, label) with labels such as 'A#:maj' and 'N'."""
    return [(float(s), float(e), str(label)) for s, e, label in recogniser(signal)]


def chord_heard(segments: list[tuple[float, float, str]]) -> bool:
    return any(label != "N" for _, _, label in segments)


def readable_chord(label: str, key: str | None) -> str:
    """'A#:maj' -> 'Bb major' in a flat key, 'A# major' in a sharp one; 'N' -> 'no chord'."""
    if label == "N":
        return NO_CHORD
    root, quality = label.split(":")
    return f"{spell_pitch(root, key)} {QUALITY_NAMES.get(quality, quality)}"


def chord_timeline(segments: list[tuple[float, float, str]], duration_s: float, key: str | None) -> list[dict]:
    """[{"start", "end", "chord"}] in seconds from the clip start, ending at the clip's end, or
    FeatureUnavailable when no chord was heard."""
    if not chord_heard(segments):
        raise FeatureUnavailable("no chords: the chord recogniser heard no chord in the clip")
    timeline = []
    for start, end, label in segments:
        if start >= duration_s:
            break
        timeline.append({
            "start": round(start, TIME_DECIMALS),
            "end": round(min(end, duration_s), TIME_DECIMALS),
            "chord": readable_chord(label, key),
        })
    return timeline
