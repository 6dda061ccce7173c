"""Music theory for the demo dataset: pitch names and key spellings, scales, chords named by roman
numeral, and the four-bar chord loops the clips are built on."""

from __future__ import annotations

SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
CHORD_INTERVALS = {"maj": (0, 4, 7), "min": (0, 3, 7), "7": (0, 4, 7, 10), "dim": (0, 3, 6)}
ROMAN_DEGREES = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}

# Four-bar loops; each starts on the tonic chord. Every minor loop has the harmonic-minor V (major,
# with the leading tone): without it (e.g. i-VI-III-VII) madmom's key CNN mostly hears the
# relative major, and so would a listener.
LOOPS = {
    "major": ("I-IV-V-I", "I-vi-IV-V", "I-V-vi-IV", "I-ii-V7-I", "I-IV-I-V", "I-vi-ii-V7"),
    "minor": ("i-iv-V-i", "i-VI-V-i", "i-iio-V7-i", "i-iv-i-V7", "i-VII-iv-V", "i-III-iv-V"),
}


def key_name(tonic: int, mode: str) -> str:
    """Readable key name with the usual spelling, e.g. 'F# minor', 'Bb major'."""
    return f"{pitch_names(tonic, mode)[tonic]} {mode}"


def pitch_names(tonic: int, mode: str) -> tuple[str, ...]:
    """Sharps for sharp keys, flats for flat keys (judged from the relative major's signature)."""
    major_tonic = tonic if mode == "major" else (tonic + 3) % 12
    sharps = (major_tonic * 7) % 12  # position on the circle of fifths
    return SHARP_NAMES if 0 < sharps <= 6 and major_tonic != 5 else FLAT_NAMES


def parse_roman(numeral: str) -> tuple[int, str]:
    """'V7' -> (4, '7'), 'vi' -> (5, 'min'), 'III' -> (2, 'maj'), 'viio' -> (6, 'dim')."""
    core = numeral.rstrip("7o")
    degree = ROMAN_DEGREES[core.lower()]
    if numeral.endswith("7"):
        return degree, "7"
    if numeral.endswith("o"):
        return degree, "dim"
    return degree, "maj" if core.isupper() else "min"


def chord_root(tonic: int, mode: str, numeral: str) -> int:
    degree, _ = parse_roman(numeral)
    return (tonic + SCALES[mode][degree]) % 12


def chord_label(tonic: int, mode: str, numeral: str) -> str:
    """mir_eval chord label, e.g. 'F#:min', 'E:maj', 'G:7'."""
    _, quality = parse_roman(numeral)
    root = chord_root(tonic, mode, numeral)
    return f"{pitch_names(tonic, mode)[root]}:{quality}"


def chord_pitch_classes(tonic: int, mode: str, numeral: str) -> tuple[int, ...]:
    _, quality = parse_roman(numeral)
    root = chord_root(tonic, mode, numeral)
    return tuple((root + i) % 12 for i in CHORD_INTERVALS[quality])


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)
