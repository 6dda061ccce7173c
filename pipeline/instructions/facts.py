"""What the template writer knows about a clip: ``Facts`` (tempo, key, metre, chords, genres,
instruments, vocals, moods, themes, tags, and for note-level data the order of entrances, registers
and density), read from the JSON the language model would get (``metadata.clip_metadata``), with
the vocabularies that turn a dataset's own spelling of a tag into words."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


MTG_GENRES = {
    "hiphop": "hip-hop", "rnb": "R&B", "drumnbass": "drum and bass", "easylistening": "easy listening",
    "newage": "new age", "triphop": "trip-hop", "poprock": "pop rock", "idm": "IDM", "chillout": "chill-out",
    "darkambient": "dark ambient", "bossanova": "bossa nova", "alternativerock": "alternative rock",
    "singersongwriter": "singer-songwriter", "worldfusion": "world fusion", "deephouse": "deep house",
    "jazzfusion": "jazz fusion", "hardrock": "hard rock", "acidjazz": "acid jazz", "rocknroll": "rock and roll",
    "electropop": "electropop", "synthpop": "synth-pop", "edm": "EDM", "lounge": "lounge", "dubstep": "dubstep",
    "breakbeat": "breakbeat", "eurodance": "Eurodance", "postrock": "post-rock", "newwave": "new wave",
    "hardcore": "hardcore", "reggae": "reggae", "90s": "1990s pop", "80s": "1980s pop", "60s": "1960s pop",
}


MTG_INSTRUMENTS = {
    "electricguitar": "electric guitar", "acousticguitar": "acoustic guitar", "classicalguitar": "classical guitar",
    "drummachine": "drum machine", "electricpiano": "electric piano", "doublebass": "double bass",
    "acousticbassguitar": "acoustic bass guitar", "pipeorgan": "pipe organ", "rhodes": "Rhodes piano",
    "synthesizer": "synthesizer", "computer": "computer-made sounds", "beat": "a programmed beat",
    "pad": "synth pad", "sampler": "samples", "voice": "voice", "bongo": "bongos", "bell": "bells",
}


MTG_THEMES = {
    "film", "movie", "christmas", "advertising", "commercial", "corporate", "documentary", "background",
    "children", "game", "holiday", "nature", "party", "retro", "space", "sport", "summer", "trailer",
    "travel", "love", "soundscape", "ballad", "action", "adventure", "horror", "wedding", "sexy", "fun",
}


MTG_MOOD_WORDS = {"dream": "dreamy", "melancholic": "melancholic", "funny": "funny"}


MAGNA_GENRES = {
    "classical": "classical", "clasical": "classical", "rock": "rock", "hard rock": "hard rock",
    "soft rock": "soft rock", "jazz": "jazz", "jazzy": "jazz", "folk": "folk", "ambient": "ambient",
    "new age": "new age", "funk": "funk", "funky": "funk", "country": "country", "reggae": "reggae",
    "electronic": "electronic", "electronica": "electronic", "electro": "electronic", "trance": "trance",
    "heavy metal": "heavy metal", "metal": "metal", "disco": "disco", "industrial": "industrial",
    "jungle": "jungle", "pop": "pop", "punk": "punk", "blues": "blues", "techno": "techno", "house": "house",
    "rap": "rap", "hip hop": "hip-hop", "baroque": "baroque", "medieval": "medieval", "celtic": "Celtic",
    "irish": "Irish folk", "opera": "opera", "world": "world", "middle eastern": "Middle Eastern",
    "indian": "Indian", "india": "Indian", "arabic": "Arabic", "oriental": "East Asian", "eastern": "Eastern",
    "spanish": "Spanish", "tribal": "tribal", "dance": "dance",
}


MAGNA_INSTRUMENTS = {
    "guitar": "guitar", "guitars": "guitar", "acoustic guitar": "acoustic guitar",
    "electric guitar": "electric guitar", "classical guitar": "classical guitar", "piano": "piano",
    "piano solo": "piano", "harpsichord": "harpsichord", "harpsicord": "harpsichord", "sitar": "sitar",
    "clarinet": "clarinet", "woodwind": "woodwinds", "horns": "horns", "horn": "horn", "banjo": "banjo",
    "violin": "violin", "violins": "violins", "fiddle": "fiddle", "strings": "strings", "string": "strings",
    "synth": "synthesizer", "synthesizer": "synthesizer", "trumpet": "trumpet", "percussion": "percussion",
    "drum": "drums", "drums": "drums", "bongos": "bongos", "bass": "bass", "keyboard": "keyboard",
    "organ": "organ", "bells": "bells", "chimes": "chimes", "harp": "harp", "lute": "lute", "oboe": "oboe",
    "viola": "viola", "cello": "cello", "flute": "flute", "flutes": "flute", "sax": "saxophone",
    "orchestra": "orchestra", "choir": "choir", "clapping": "hand claps",
}


MAGNA_MOODS = {
    "heavy": "heavy", "eerie": "eerie", "spacey": "spacey", "quiet": "quiet", "happy": "happy", "airy": "airy",
    "repetitive": "repetitive", "loud": "loud", "weird": "weird", "dark": "dark", "strange": "strange",
    "mellow": "mellow", "light": "light", "sad": "sad", "scary": "scary", "calm": "calm", "upbeat": "upbeat",
    "soft": "soft", "deep": "deep", "hard": "hard",
}


FEMALE_VOICE = {"female singing", "female opera", "female", "female voice", "girl", "female vocal", "woman",
                "woman singing", "female vocals", "female singer", "women", "soprano"}


MALE_VOICE = {"male vocal", "men", "male voice", "male singer", "man singing", "male opera", "man",
              "male vocals", "male", "monks"}


VOCAL_TAGS = FEMALE_VOICE | MALE_VOICE | {"singer", "duet", "chorus", "vocals", "vocal", "voice", "voices",
                                          "chanting", "chant", "talking", "choral", "opera", "operatic",
                                          "singing", "choir", "rap"}


NO_VOCAL_TAGS = {"no voice", "no voices", "no vocal", "no vocals", "no singing", "no singer", "instrumental"}


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
    f = Facts()
    f.tempo_bpm = _positive(metadata.get("tempo_bpm")) or _positive(metadata.get("tempo_in_beats_per_minute_madmom"))
    f.key = readable_key(metadata.get("key") or metadata.get("key_madmom"))
    f.beats_per_bar = (_metre_beats(metadata.get("metre")) or _bar_count(metadata.get("beats_per_bar"))
                       or _grid_beats(metadata.get("beat_grid_madmom")))
    f.chords, f.seconds_per_chord = _chords(metadata.get("chords_madmom"))
    if isinstance(metadata.get("progression"), str):
        f.progression = metadata["progression"].replace("-", "–")
    if dataset == "fma":
        f.genres = _unique([metadata.get("track.genre_top"), *(metadata.get("track.genres") or [])])
        f.tags = [t for t in _unique(metadata.get("track.tags") or []) if re.fullmatch(r"[a-z][a-z &'-]{1,24}", t.lower())
                  and len(t.split()) <= 3][:8]
    elif dataset == "mtg_jamendo":
        f.genres = [MTG_GENRES.get(g, g) for g in metadata.get("genres") or []]
        f.instruments = [MTG_INSTRUMENTS.get(i, i) for i in metadata.get("instruments") or []]
        if "voice" in (metadata.get("instruments") or []):
            f.vocals = True
        for mood in metadata.get("moods") or []:
            (f.themes if mood in MTG_THEMES else f.moods).append(MTG_MOOD_WORDS.get(mood, mood))
    elif dataset == "magnatagatune":
        _magnatagatune_facts(f, metadata.get("tags") or [])
    else:
        genre = metadata.get("genre") or metadata.get("genres")
        f.genres = _unique(genre if isinstance(genre, list) else [genre])
        f.instruments = _unique(metadata.get("instruments") or [])
        f.instruments_complete = bool(f.instruments) and dataset in ("musicnet", "demo")
        f.moods = _unique(metadata.get("moods") or metadata.get("mood") or [])
        f.tags = _unique(metadata.get("tags") or [])[:8] if isinstance(metadata.get("tags"), list) else []
        if isinstance(metadata.get("ensemble"), str):
            f.ensemble = metadata["ensemble"]
        if isinstance(metadata.get("notes"), dict):
            _note_facts(f, metadata["notes"])
    f.genres = _unique(tidy_label(g) for g in f.genres)
    f.instruments = _unique(tidy_label(i) for i in f.instruments if "voice" not in str(i).lower())
    f.moods, f.themes, f.tags = (_unique(tidy_label(x) for x in xs) for xs in (f.moods, f.themes, f.tags))
    return f


def _magnatagatune_facts(f: Facts, tags: list[str]) -> None:
    tags = [t.lower() for t in tags]
    f.genres = [MAGNA_GENRES[t] for t in tags if t in MAGNA_GENRES]
    f.instruments = [MAGNA_INSTRUMENTS[t] for t in tags if t in MAGNA_INSTRUMENTS and t != "choir"]
    f.moods = [MAGNA_MOODS[t] for t in tags if t in MAGNA_MOODS]
    if any(t in NO_VOCAL_TAGS for t in tags):
        f.vocals = False
    elif any(t in VOCAL_TAGS for t in tags):
        f.vocals = True
        female, male = any(t in FEMALE_VOICE for t in tags), any(t in MALE_VOICE for t in tags)
        f.voice = "female" if female and not male else "male" if male and not female else None
    f.tags = [t for t in tags if not t.startswith(("no ", "not ")) and t not in ("lol", "silence")][:8]


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


def _unique(items) -> list[str]:
    seen, out = set(), []
    for item in items:
        if isinstance(item, str) and item.strip() and item.strip().lower() not in seen:
            seen.add(item.strip().lower())
            out.append(item.strip())
    return out


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
    return _unique(names), per_chord


def midi_number(pitch: Any) -> int | None:
    match = re.fullmatch(r"([A-G])([#b]?)(-?\d+)", str(pitch or ""))
    if not match:
        return None
    letter, accidental, octave = match.groups()
    return PITCH_CLASSES[letter] + {"#": 1, "b": -1, "": 0}[accidental] + 12 * (int(octave) + 1)


def _pitch_name(midi: int) -> str:
    return f"{SHARP_NAMES[midi % 12]}{midi // 12 - 1}"
