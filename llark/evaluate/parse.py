"""Reading a value out of a free-text answer: a key, a tempo, a metre, a label, a set of
instruments, a list of beat times.

Parsing is kept apart from scoring (as ``mir_eval.io`` is apart from ``mir_eval.key``): every
function here returns the value it found, or ``None`` when the answer holds none, and the task
modules score values. An answer that parses to ``None`` is *unparseable*: it counts as wrong and
the run reports how many there were.

The rules, each chosen so that a wrong parse is rarer than a missed one:

- **key**: the first key mentioned. A tonic (``A``-``G``, case-insensitive) with an optional
  accidental (``#``, ``♯``, ``sharp``, ``b``, ``♭``, ``flat``; ``-`` or a space may separate it)
  followed by a mode (``major``, ``maj``, ``ionian`` → major; ``minor``, ``min``, ``aeolian``, or
  an ``m`` attached to the tonic as in ``F#m`` → minor). Enharmonic spellings are one pitch class
  (``Cb`` is B, ``E#`` is F, ``Gb`` and ``F#`` are both 6). A tonic with no mode counts only after
  "key of"/"key is"/"in the key" or as the whole answer, and is then major (the usual reading of
  "in D"). A lower-case ``a`` is the article unless the answer ends or punctuation follows the
  mode ("in a minor key, F minor" is F minor).
- **tempo**: a number followed by ``BPM``/"beats per minute" (digits or English words, "one
  hundred and twenty"; a range "118-122 BPM" gives its middle); failing that, the first number
  between 20 and 400 that is not part of a time signature. "approximately", "about", "~" are
  ignored.
- **metre**: beats per bar from a time signature (``3/4``, ``6/8`` counts 2 beats: compound
  duple) or from "three beats per bar", "triple metre", "waltz time".
- **labels** (genre): the labels of a closed vocabulary that the answer names, as whole words,
  ignoring case, spaces and punctuation ("hip-hop" = "hiphop"); longer labels first, so "pop
  rock" is not also "pop" and "rock".
- **instruments**: the vocabulary's labels whose names or synonyms the answer mentions as whole
  words (plurals too), except in a clause that negates them ("no vocals", "without drums").
- **beats**: every number in the answer, read as seconds (CMI-Bench: non-numeric items are
  dropped, the rest sorted).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# Keys

PITCH_CLASS = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
# One spelling per pitch class for parsed keys (all accepted by mir_eval.key).
CANONICAL_TONIC = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODE_WORDS = {"major": "major", "maj": "major", "ionian": "major", "minor": "minor", "min": "minor",
              "aeolian": "minor"}

_ACCIDENTAL = r"(?P<acc>\s*-?\s*(?:sharp|flat)|[#♯b♭])?"
_KEY_WITH_MODE = re.compile(
    r"(?<![A-Za-z0-9#♯♭])(?P<tonic>[A-Ga-g])" + _ACCIDENTAL
    + r"(?:(?P<m>(?-i:m))(?![A-Za-z])|[\s\-]*(?P<mode>major|minor|maj|min|ionian|aeolian)(?![A-Za-z]))",
    re.IGNORECASE,
)
_KEY_WITHOUT_MODE = re.compile(
    r"(?:\bkey\s*(?:of\s+|is\s+|:\s*)|\bin\s+the\s+key\s+|^\s*)(?P<tonic>[A-Ga-g])" + _ACCIDENTAL
    + r"(?=\s*(?:$|[.,;:!?)]|\s+key\b))",
    re.IGNORECASE,
)


def _accidental_shift(text: str | None) -> int:
    if not text:
        return 0
    t = text.strip(" -").lower()
    if t in ("#", "♯", "sharp"):
        return 1
    if t in ("b", "♭", "flat"):
        return -1
    return 0


def key_label(pitch_class: int, mode: str) -> str:
    """``(pitch class, mode)`` as a key string, e.g. ``(3, 'minor')`` → ``'Eb minor'``."""
    if mode not in ("major", "minor"):
        raise ValueError(f"mode must be 'major' or 'minor', got {mode!r}")
    return f"{CANONICAL_TONIC[pitch_class % 12]} {mode}"


def parse_key(answer: str) -> str | None:
    """The first key named in ``answer`` as ``'<tonic> <major|minor>'`` (canonical spelling), or None."""
    if not isinstance(answer, str):
        return None
    found: list[tuple[int, str]] = []
    for match in _KEY_WITH_MODE.finditer(answer):
        tonic = match.group("tonic")
        if tonic == "a" and not match.group("acc"):
            # "a minor key", "a major change": the article, unless nothing but punctuation follows.
            rest = answer[match.end():]
            if not re.match(r"\s*($|[.,;:!?)])", rest):
                continue
        mode = "minor" if match.group("m") else MODE_WORDS[match.group("mode").lower()]
        pc = (PITCH_CLASS[tonic.lower()] + _accidental_shift(match.group("acc"))) % 12
        found.append((match.start(), key_label(pc, mode)))
    for match in _KEY_WITHOUT_MODE.finditer(answer):
        if any(start <= match.start("tonic") < start + 1 for start, _ in found):
            continue
        tonic = match.group("tonic")
        if tonic == "a" and not match.group("acc") and match.start("tonic") > 0:
            continue
        pc = (PITCH_CLASS[tonic.lower()] + _accidental_shift(match.group("acc"))) % 12
        found.append((match.start("tonic"), key_label(pc, "major")))
    if not found:
        return None
    return min(found)[1]


# ---------------------------------------------------------------------------------------------
# Numbers in words

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_NUMBER_WORDS = set(_UNITS) | set(_TENS) | {"hundred", "a", "and", "point"}
_WORD_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]", re.IGNORECASE)


def words_to_number(words: Sequence[str]) -> float | None:
    """``['one', 'hundred', 'and', 'twenty']`` → 120.0; None if the words are not one number below 1000."""
    words = [w.lower() for w in words if w]
    if not words or words[-1] in ("and", "a", "point"):
        return None
    total, current, seen = 0, 0, False
    fraction: list[int] | None = None
    for i, w in enumerate(words):
        if fraction is not None:
            if w not in _UNITS or _UNITS[w] > 9:
                return None
            fraction.append(_UNITS[w])
        elif w == "a":
            if i + 1 >= len(words) or words[i + 1] != "hundred" or seen:
                return None
            current = 1
        elif w == "and":
            if not seen:
                return None
        elif w == "hundred":
            if current == 0 or current >= 10 or total:
                if not (current == 0 and not seen):
                    return None
                current = 1
            total, current = current * 100, 0
            seen = True
        elif w in _TENS:
            if current % 100 >= 10 or current % 10:
                return None
            current += _TENS[w]
            seen = True
        elif w in _UNITS:
            if current % 10 or (current % 100 >= 10 and current % 100 < 20) or (current >= 10 and _UNITS[w] >= 10):
                return None
            current += _UNITS[w]
            seen = True
        elif w == "point":
            fraction = []
        else:
            return None
    if not seen:
        return None
    value = float(total + current)
    if fraction:
        value += float("0." + "".join(str(d) for d in fraction))
    elif fraction is not None:
        return None
    return value


def _numbers(text: str) -> list[tuple[int, int, float]]:
    """Every number in ``text`` as (start, end, value): digits ("120", "120.5", "1,200") and runs of
    English number words ("one hundred and twenty", "ninety-six")."""
    out: list[tuple[int, int, float]] = []
    for m in re.finditer(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\d.])\d+(?:\.\d+)?", text):
        out.append((m.start(), m.end(), float(m.group().replace(",", ""))))
    tokens = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"[A-Za-z]+", text)]
    i = 0
    while i < len(tokens):
        if tokens[i][2] not in _NUMBER_WORDS or tokens[i][2] in ("and", "point"):
            i += 1
            continue
        j = i
        # Extend over number words joined by spaces or hyphens.
        while j + 1 < len(tokens) and tokens[j + 1][2] in _NUMBER_WORDS and \
                re.fullmatch(r"[\s-]*", text[tokens[j][1]:tokens[j + 1][0]]):
            j += 1
        best = None
        for k in range(j, i - 1, -1):
            value = words_to_number([t[2] for t in tokens[i:k + 1]])
            if value is not None:
                best = (tokens[i][0], tokens[k][1], value, k)
                break
        if best is None:
            i += 1
            continue
        out.append(best[:3])
        i = best[3] + 1
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Tempo

_BPM_AFTER = re.compile(r"\s*(?:-|–)?\s*(?:bpm|b\.p\.m\.?|beats?\s+(?:per|a|each)\s+minute|beats/min)\b", re.IGNORECASE)
_RANGE_JOIN = re.compile(r"\s*(?:-|–|to|and)\s*", re.IGNORECASE)


def parse_tempo(answer: str, low: float = 20.0, high: float = 400.0) -> float | None:
    """The tempo in BPM named in ``answer``, or None (see the module docstring for the rules)."""
    if not isinstance(answer, str):
        return None
    numbers = _numbers(answer)
    for n, (start, end, value) in enumerate(numbers):
        if _BPM_AFTER.match(answer, end):
            # "between 118 and 122 BPM", "118-122 BPM": the middle of the range.
            if n > 0:
                p_start, p_end, p_value = numbers[n - 1]
                if _RANGE_JOIN.fullmatch(answer[p_end:start]) and low <= p_value <= high:
                    return (p_value + value) / 2
            if low <= value <= high:
                return value
    for start, end, value in numbers:
        before, after = answer[max(0, start - 1):start], answer[end:end + 1]
        if before == "/" or after == "/":
            continue  # a time signature
        if low <= value <= high:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Metre

_SIGNATURE = re.compile(r"(?<![\d/])(\d{1,2})\s*/\s*(\d{1,2})(?![\d/])")
_METRE_WORDS = {"duple": 2, "triple": 3, "quadruple": 4}
_COMPOUND = {6: 2, 9: 3, 12: 4}
_BEATS_PER_BAR = re.compile(
    r"\s*(?:-\s*)?beats?\s+(?:(?:per|to\s+(?:a|the|each)|in\s+(?:a|each|every|the)|a|each)\s+)?(?:bar|measure)s?\b")


def parse_metre(answer: str) -> int | None:
    """Beats per bar: from the first time signature (``6/8`` is two dotted-quarter beats), from
    "N beats per/to the/in each bar|measure", "duple/triple/quadruple metre", or "waltz"."""
    if not isinstance(answer, str):
        return None
    m = _SIGNATURE.search(answer)
    if m:
        top, bottom = int(m.group(1)), int(m.group(2))
        if top >= 1 and bottom in (1, 2, 4, 8, 16):
            return _COMPOUND.get(top, top) if bottom == 8 else top
    text = answer.lower()
    for start, end, value in _numbers(text):
        if _BEATS_PER_BAR.match(text, end) and value == int(value) and 1 <= value <= 16:
            return int(value)
    m = re.search(r"\b(duple|triple|quadruple)\s+(?:metre|meter|time)\b", text)
    if m:
        return _METRE_WORDS[m.group(1)]
    if re.search(r"\bwaltz\s+time\b|\bin\s+three\b", text):
        return 3
    if re.search(r"\bcommon\s+time\b", text):
        return 4
    return None


# ---------------------------------------------------------------------------------------------
# Labels from a closed vocabulary (genre)


def normalise_text(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space: "Hip-Hop!" → "hip hop"."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _squash(text: str) -> str:
    return normalise_text(text).replace(" ", "")


def find_labels(answer: str, labels: Iterable[str], synonyms: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The labels ``answer`` names, in order of first mention, each once.

    Matching ignores case, spaces and punctuation ("hip-hop", "Hip Hop" and "hiphop" are one
    label) and takes whole words only; a longer name claims its words first, so "pop rock" is
    not also "pop" and "rock" unless those are named elsewhere.
    """
    if not isinstance(answer, str):
        return []
    names: list[tuple[str, str]] = []  # (normalised name, label)
    for label in labels:
        for name in [label, *((synonyms or {}).get(label, ()))]:
            names.append((normalise_text(name), label))
    words = normalise_text(answer).split()
    taken = [False] * len(words)
    hits: list[tuple[int, str]] = []
    # Longest names first (in words, then characters once squashed).
    for name, label in sorted(names, key=lambda x: (-len(x[0].split()), -len(x[0]))):
        squashed = name.replace(" ", "")
        if not squashed:
            continue
        for i in range(len(words)):
            if taken[i]:
                continue
            # A name may be written with more or fewer spaces than the vocabulary gives it.
            for j in range(i + 1, min(len(words), i + 6) + 1):
                if any(taken[i:j]):
                    break
                joined = "".join(words[i:j])
                if joined == squashed:
                    hits.append((i, label))
                    for k in range(i, j):
                        taken[k] = True
                    break
                if len(joined) >= len(squashed):
                    break
    seen, ordered = set(), []
    for _, label in sorted(hits):
        if label not in seen:
            seen.add(label)
            ordered.append(label)
    return ordered


def parse_label_strict(answer: str, labels: Iterable[str], synonyms: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """CMI-Bench's strict reading: the one label the answer names, or None when it names none or
    several."""
    found = find_labels(answer, labels, synonyms)
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------
# Instruments

_NEGATION = re.compile(r"\b(?:no|not|without|never|nor|absent|lack|lacks|lacking|none|neither|isn t|aren t|"
                       r"doesn t|don t|can t|cannot|free of|minus)\b")
_NOT_A_NEGATION = re.compile(r"\bnot\s+(?:only|just)\b")
_LIST_JOINERS = {"or", "nor", "and", "either", "any", "a", "an", "the"}
_SENTENCE_BREAK = re.compile(r"[.;:!?]|\bbut\b|\bhowever\b|\bwhereas\b|\bwhile\b")


def _plural_forms(name: str) -> list[str]:
    forms = [name]
    if not name.endswith("s"):
        forms.append(name + ("es" if name.endswith(("sh", "ch", "x")) else "s"))
    return forms


def parse_instruments(answer: str, vocabulary: Mapping[str, Sequence[str]]) -> set[str] | None:
    """The set of vocabulary labels the answer says are heard; None for an empty answer (an
    answer that names no instrument of the vocabulary parses to the empty set).

    ``vocabulary`` maps each label to its other names (``{"contrabass": ["double bass"]}``);
    names match as whole words, plurals too, longest first ("bass clarinet" is not "bass"). A
    mention is negated when a negation ("no", "not", "without", "n't", ...) stands between it
    and the previous mention of its sentence ("no vocals, just piano"), and a mention joined to
    a negated one by "or"/"nor" ("without drums or bass") is negated too.
    """
    if not isinstance(answer, str) or not answer.strip():
        return None
    names = sorted(
        {(form, label) for label, others in vocabulary.items() for name in [label, *others]
         for form in _plural_forms(normalise_text(name)) if form},
        key=lambda x: (-len(x[0]), x[0]))
    found: set[str] = set()
    for sentence in _SENTENCE_BREAK.split(answer.lower().replace("n't", " n t").replace("'", " ")):
        text = " " + normalise_text(sentence.replace(" n t", "n t")) + " "
        mentions: list[tuple[int, int, str]] = []
        for form, label in names:
            for m in re.finditer(rf"(?<= ){re.escape(form)}(?= )", text):
                if not any(a < m.end() and m.start() < b for a, b, _ in mentions):
                    mentions.append((m.start(), m.end(), label))
        mentions.sort()
        previous_end, previous_negated = 0, False
        for start, end, label in mentions:
            between = _NOT_A_NEGATION.sub(" ", text[previous_end:start])
            if _NEGATION.search(between):
                negated = True
            elif previous_end and set(between.split()) <= _LIST_JOINERS and between.split():
                negated = previous_negated and bool(set(between.split()) & {"or", "nor"})
            else:
                negated = False
            if not negated:
                found.add(label)
            previous_end, previous_negated = end, negated
    return found


# ---------------------------------------------------------------------------------------------
# Beat times


def parse_times(answer: str, max_time: float | None = None) -> list[float] | None:
    """The numbers in ``answer`` read as times in seconds, sorted (CMI-Bench's beat protocol:
    anything that is not a number is dropped); None when there is no number at all."""
    if not isinstance(answer, str):
        return None
    values = [float(m.group()) for m in re.finditer(r"(?<![\w.])\d+(?:\.\d+)?", answer)]
    if max_time is not None:
        values = [v for v in values if v <= max_time]
    if not values:
        return None
    return sorted(values)
