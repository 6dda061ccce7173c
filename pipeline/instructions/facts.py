"""What the template writer knows about a clip: ``Facts`` (tempo, key, metre, chords, genres,
instruments, vocals, moods, themes, tags, and for note-level data the order of entrances, registers
and density), read from the JSON the language model would get (``metadata.clip_metadata``); a
dataset's own spelling of its tags is turned into words by its ingest adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.ingest import find_adapter
from pipeline.prompt_values import unique_words


PITCH_CLASSES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")


CHORD_QUALITIES = {
    "maj": "major", "min": "minor", "7": "dominant seventh", "maj7": "major seventh", "min7": "minor seventh",
    "dim": "diminished", "aug": "augmented", "sus2": "suspended second", "sus4": "suspended fourth",
    "dim7": "diminished seventh", "hdim7": "half-diminished seventh", "minmaj7": "minor-major seventh",
}


@dataclass
class Facts:
    tempo_bpm: float | None = None
    key: str | None = None  # "F# minor"
    beats_per_bar: int | None = None
    chords: list[str] = field(default_factory=list)  # distinct, in order of first appearance
    seconds_per_chord: float | None = None
    progression: str | None = None  # Roman numerals, when the dataset gives them
    genres: list[str] = field(default_factory=list)
    instruments: list[str] = field(default_factory=list)
    instruments_complete: bool = False  # the list names every instrument (note-level data, the demo)
    vocals: bool | None = None
    voice: str | None = None  # "female", "male"
    moods: list[str] = field(default_factory=list)
    themes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    ensemble: str | None = None
    entrances: list[tuple[str, float]] = field(default_factory=list)  # (instrument, first onset s)
    registers: dict[str, tuple[str, str]] = field(default_factory=dict)  # instrument -> (lowest, highest)
    notes_per_second: float | None = None

    @property
    def mode(self) -> str | None:
        return self.key.split()[-1] if self.key and self.key.split()[-1] in ("major", "minor") else None

    @property
    def tonic(self) -> str | None:
        return self.key.split()[0] if self.key else None


def clip_facts(metadata: dict, dataset: str) -> Facts:
    """The facts of one clip's prompt JSON; the dataset's ingest adapter turns its own labels into words
    (``Adapter.template_words``), else its genre(s), instruments, moods, tags and notes are read as given."""
    f = Facts()
    f.tempo_bpm = _positive(metadata.get("tempo_bpm")) or _positive(metadata.get("tempo_in_beats_per_minute_madmom"))
    f.key = readable_key(metadata.get("key") or metadata.get("key_madmom"))
    f.beats_per_bar = (_metre_beats(metadata.get("metre")) or _bar_count(metadata.get("beats_per_bar"))
                       or _grid_beats(metadata.get("beat_grid_madmom")))
    f.chords, f.seconds_per_chord = _chords(metadata.get("chords_madmom"))
    if isinstance(metadata.get("progression"), str):
        f.progression = metadata["progression"].replace("-", "–")
    adapter = find_adapter(dataset)
    if adapter is not None and adapter.template_words is not None:
        f = replace(f, **adapter.template_words(metadata))
    else:
        genre = metadata.get("genre") or metadata.get("genres")
        f.genres = unique_words(genre if isinstance(genre, list) else [genre])
        f.instruments = unique_words(metadata.get("instruments") or [])
        f.instruments_complete = bool(f.instruments) and adapter is not None and adapter.lists_every_instrument
        f.moods = unique_words(metadata.get("moods") or metadata.get("mood") or [])
        f.tags = unique_words(metadata.get("tags") or [])[:8] if isinstance(metadata.get("tags"), list) else []
        if isinstance(metadata.get("ensemble"), str):
            f.ensemble = metadata["ensemble"]
        if isinstance(metadata.get("notes"), dict):
            _note_facts(f, metadata["notes"])
    f.genres = unique_words(tidy_label(g) for g in f.genres)
    f.instruments = unique_words(tidy_label(i) for i in f.instruments if "voice" not in str(i).lower())
    f.moods, f.themes, f.tags = (unique_words(tidy_label(x) for x in xs) for xs in (f.moods, f.themes, f.tags))
    return f


def _note_facts(f: Facts, notes: dict[str, list[dict]]) -> None:
    first: dict[str, float] = {}
    span_end, count = 0.0, 0
    for instrument, played in notes.items():
        if not played:
            continue
        first[instrument] = min(n["start"] for n in played)
        midis = [m for m in (midi_number(n.get("pitch")) for n in played) if m is not None]
        if midis:
            f.registers[instrument] = (_pitch_name(min(midis)), _pitch_name(max(midis)))
        span_end = max(span_end, max(n["end"] for n in played))
        count += len(played)
    f.entrances = sorted(first.items(), key=lambda x: (x[1], x[0]))
    if count and span_end > 0:
        f.notes_per_second = count / span_end


def readable_key(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    match = re.fullmatch(r"([A-Ga-g])([#b♯♭]?)\s*[:\s]?\s*(maj|major|min|minor)", text)
    if match:
        letter, accidental, mode = match.groups()
        accidental = {"♯": "#", "♭": "b"}.get(accidental, accidental)
        return f"{letter.upper()}{accidental} {'major' if mode.startswith('maj') else 'minor'}"
    return text


def readable_chord(label: Any) -> str | None:
    """A chord name for prose: 'F#:min' -> 'F# minor', 'G:7' -> 'G dominant seventh'; None for no chord."""
    if not isinstance(label, str):
        return None
    text = label.strip()
    if not text or text.upper() in ("N", "X") or text.lower() in ("no chord", "none"):
        return None
    if ":" in text:
        root, quality = text.split(":", 1)
        quality = quality.split("/")[0]
        return f"{root} {CHORD_QUALITIES.get(quality, quality)}"
    return text


def tidy_label(label: Any) -> str:
    """Lower case unless a word is an acronym (R&B, IDM, DJ); underscores as spaces."""
    words = str(label).replace("_", " ").split()
    return " ".join(w if w.isupper() and sum(c.isalpha() for c in w) >= 2 else w.lower() for w in words)


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _metre_beats(value: Any) -> int | None:
    if isinstance(value, str) and re.fullmatch(r"\d+/\d+", value.strip()):
        top = int(value.split("/")[0])
        return 6 if value.strip() == "6/8" else top if 2 <= top <= 12 else None
    return None


def _bar_count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 12 else None


def _grid_beats(grid: Any) -> int | None:
    """The metre from a beat grid: its largest beat number, once at least two bars are seen."""
    numbers = [b.get("beat_number") for b in grid or [] if isinstance(b, dict) and isinstance(b.get("beat_number"), int)]
    if not numbers:
        return None
    top = max(numbers)
    return top if 2 <= top <= 12 and numbers.count(1) >= 2 else None


def _chords(chords: Any) -> tuple[list[str], float | None]:
    names, spans = [], []
    for chord in chords or []:
        if not isinstance(chord, dict):
            continue
        name = readable_chord(chord.get("chord"))
        if name is None:
            continue
        if not names or names[-1] != name:
            names.append(name)
            spans.append([chord.get("start"), chord.get("end")])
        else:
            spans[-1][1] = chord.get("end")
    lengths = [e - s for s, e in spans if isinstance(s, (int, float)) and isinstance(e, (int, float)) and e > s]
    per_chord = sum(lengths) / len(lengths) if len(lengths) >= 2 else None
    return unique_words(names), per_chord


def midi_number(pitch: Any) -> int | None:
    match = re.fullmatch(r"([A-G])([#b]?)(-?\d+)", str(pitch or ""))
    if not match:
        return None
    letter, accidental, octave = match.groups()
    return PITCH_CLASSES[letter] + {"#": 1, "b": -1, "": 0}[accidental] + 12 * (int(octave) + 1)


def _pitch_name(midi: int) -> str:
    return f"{SHARP_NAMES[midi % 12]}{midi // 12 - 1}"
