"""Words for the template writer: numbers, tempo and metre words, keys, articles and lists."""

from __future__ import annotations

import re

from pipeline.instructions.facts import FLAT_NAMES, PITCH_CLASSES, SHARP_NAMES


# Nouns that take no article ("there are drums", "there is percussion").
PLURAL_NOUNS = {"drums", "strings", "vocals", "horns", "violins", "woodwinds", "bongos", "bells", "chimes",
                "hand claps", "voices", "guitars", "flutes", "samples", "computer-made sounds", "keys"}


MASS_NOUNS = {"percussion", "brass"}


NOUN_GENRES = {"waltz", "ballad", "march", "lullaby", "hymn", "tango", "polka", "sonata", "symphony", "minuet"}


ROLES = (  # (role, the words that say which instruments have it); first match wins
    ("beat", ("drum", "percussion", "bongo", "clap", "beat", "conga", "tabla", "cymbal")),
    ("bass", ("bass", "contrabass", "bassoon", "tuba")),
    ("melody", ("voice", "vocal", "violin", "flute", "oboe", "clarinet", "trumpet", "saxophone", "lead",
                "fiddle", "harmonica", "sitar", "recorder", "whistle", "choir")),
    ("harmony", ("piano", "guitar", "organ", "harpsichord", "pad", "strings", "keyboard", "accordion",
                 "synthesizer", "synth", "harp", "lute", "banjo", "ukulele", "viola", "cello", "horn")),
)


ROLE_PHRASES = {  # (singular, plural) verb phrases
    "beat": (("keeps the beat", "keep the beat"), ("drives the rhythm", "drive the rhythm"),
             ("marks the pulse", "mark the pulse")),
    "bass": (("anchors the harmony from below", "anchor the harmony from below"),
             ("holds down the low end", "hold down the low end"),
             ("lays the foundation under the chords", "lay the foundation under the chords")),
    "melody": (("carries the melody", "carry the melody"), ("sings the main line", "sing the main line"),
               ("takes the lead", "take the lead")),
    "harmony": (("fills in the chords", "fill in the chords"), ("supplies the harmony", "supply the harmony"),
                ("provides the harmonic backdrop", "provide the harmonic backdrop")),
}


NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def fmt_bpm(bpm: float) -> str:
    return f"{round(bpm)}" if abs(bpm - round(bpm)) < 0.05 else f"{bpm:.1f}"


def fmt_seconds(seconds: float) -> str:
    value = round(seconds, 1)
    text = f"{value:g}"
    return f"{text} second" if value == 1 else f"{text} seconds"


def pace_words(bpm: float) -> tuple[str, str]:
    """(adjective phrase, 'a ... pace' phrase) for a tempo."""
    if bpm < 66:
        return "slow", "a slow, unhurried pace"
    if bpm < 80:
        return "fairly slow", "a relaxed, fairly slow pace"
    if bpm < 108:
        return "moderate", "a moderate, walking pace"
    if bpm < 132:
        return "lively", "a lively, upbeat pace"
    if bpm < 168:
        return "fast", "a fast, energetic pace"
    return "very fast", "a very fast, driving pace"


def metre_words(beats: int) -> tuple[str, str, str]:
    """(time signature, number word, how it feels)."""
    word = NUMBER_WORDS.get(beats, str(beats))
    feel = {2: "a marching, two-step feel", 3: "a lilting, waltz-like sway", 4: "a steady four-beat pulse",
            6: "a rolling, compound feel"}.get(beats, f"an unusual {word}-beat cycle")
    signature = "6/8" if beats == 6 else f"{beats}/4"
    return signature, word, feel


def mode_colour(mode: str | None) -> str:
    return {"major": "a bright, open sound", "minor": "a darker, more melancholy colour"}.get(mode or "", "its own colour")


def relative_key(key: str | None) -> str | None:
    """'A minor' -> 'C major', 'Eb major' -> 'C minor' (spelled with the key's accidentals)."""
    if not key:
        return None
    match = re.fullmatch(r"([A-G])([#b]?) (major|minor)", key.strip())
    if not match:
        return None
    letter, accidental, mode = match.groups()
    pc = (PITCH_CLASSES[letter] + {"#": 1, "b": -1, "": 0}[accidental]) % 12
    other = (pc + 3) % 12 if mode == "minor" else (pc - 3) % 12
    major_pc = pc if mode == "major" else other
    flat_side = accidental == "b" or (accidental != "#" and major_pc in (5, 10, 3, 8, 1))
    names = FLAT_NAMES if flat_side else SHARP_NAMES
    return f"{names[other]} {'major' if mode == 'minor' else 'minor'}"


def is_plural(noun: str) -> bool:
    return noun.lower() in PLURAL_NOUNS


def with_article(noun: str) -> str:
    lowered = noun.lower()
    if not lowered or lowered in PLURAL_NOUNS or lowered in MASS_NOUNS or lowered.startswith(("a ", "an ", "the ")):
        return noun
    vowel_sound = lowered[0] in "aeiou" and not lowered.startswith(("uk", "uni", "use", "eu", "one"))
    return f"{'an' if vowel_sound else 'a'} {noun}"


def genre_piece(genre: str) -> str:
    """'a waltz', 'an electronic piece', 'a rock piece'."""
    return with_article(genre if genre.lower() in NOUN_GENRES else f"{genre} piece")


def genre_phrase(genre: str) -> str:
    lowered = genre.lower()
    if lowered in NOUN_GENRES:
        return with_article(lowered)
    if lowered.endswith(("music", "song", "songs")):
        return genre
    return f"{genre} music"


def join_words(items: list[str]) -> str:
    items = [i for i in items if i]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def instrument_role(instrument: str) -> str | None:
    lowered = instrument.lower()
    return next((role for role, words in ROLES if any(w in lowered for w in words)), None)
