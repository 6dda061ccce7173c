"""The offline Q/A writer: grammatical, varied question/answer pairs from a clip's JSON, no model.

It reads the same JSON the language model would get (``metadata.clip_metadata``), turned into
``facts.Facts`` (tempo, key, metre, chords, genres, instruments, vocals, moods, themes, tags, and for
note-level data the order of entrances, registers and density), and writes, with the phrasing
helpers of ``wording``:

- understanding: one pair per property the clip has, plus yes/no questions about instruments
  that are known to play (never about ones that are not listed: a tag list is not exhaustive);
- captioning: one description, built sentence by sentence from the facts;
- reasoning: up to ``REASONING_PAIRS`` answers that combine several facts (tempo and metre
  into how the music moves, key and tempo into its mood, roles of the instruments, where it
  would fit, what to change to make it calmer or livelier, how to play along, how to write more
  of it, in what order the instruments enter).

Every choice of wording and order is drawn from a generator seeded by (seed, clip id, family), so
a run is reproducible and a different seed gives different phrasings. A clip with too little to
say for a family raises ``ItemError("too_little_metadata")``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from pipeline.instructions.facts import Facts, midi_number
from pipeline.instructions.wording import (NUMBER_WORDS, ROLE_PHRASES, capitalise, fmt_bpm, fmt_seconds, genre_phrase,
                                           genre_piece, instrument_role, is_plural, join_words, metre_words,
                                           mode_colour, pace_words, relative_key, with_article)
from pipeline.runner import ItemError

TEMPLATE_VERSION = "2"  # 2: a dataset's beats per bar (its labels) set the metre


REASONING_PAIRS = 4


INSTRUMENT_QUESTIONS = 2


def write_pairs(family: str, facts: Facts, rng: random.Random, caption_questions: tuple[str, ...],
                concise: bool = False) -> list[dict]:
    if family == "understanding":
        pairs = understanding_pairs(facts, rng, concise)
    elif family == "captioning":
        caption = caption_text(facts, rng)
        pairs = [{"question": rng.choice(caption_questions), "answer": caption}] if caption else []
    else:
        pairs = reasoning_pairs(facts, rng)
    if not pairs:
        raise ItemError("too_little_metadata", f"the clip's JSON holds too little to write {family} pairs from")
    return pairs


def item_rng(seed: int, clip_id: str, family: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{clip_id}:{family}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def understanding_pairs(f: Facts, rng: random.Random, concise: bool = False) -> list[dict]:
    """One pair per property (and yes/no instrument questions), in a random order. ``concise``: each
    answer is the bare fact ("Db major.", "115 BPM.", "3/4."), the questions as varied as ever."""
    writers: list[Callable[[Facts, random.Random], tuple[str, str]]] = []
    if f.tempo_bpm:
        writers.append(_tempo_pair)
    if f.key:
        writers.append(rng.choice([_key_pair, _mode_pair]) if f.mode else _key_pair)
    if f.beats_per_bar:
        writers.append(_metre_pair)
    if f.chords:
        writers.append(_chords_pair)
    if f.progression:
        writers.append(_progression_pair)
    if f.genres:
        writers.append(_genre_pair)
    if f.instruments:
        writers.append(_instruments_pair)
    if f.vocals is not None:
        writers.append(_vocals_pair)
    if f.moods:
        writers.append(_mood_pair)
    if f.themes:
        writers.append(_theme_pair)
    if f.tags:
        writers.append(_tags_pair)
    pairs = []
    for w in writers:
        question, answer = w(f, rng)  # drawn in either style: the same questions, seed for seed
        pairs.append(_pair(question, CONCISE_ANSWERS[w](f) if concise else answer))
    for instrument in rng.sample(f.instruments, min(INSTRUMENT_QUESTIONS, len(f.instruments))):
        question, answer = _has_instrument_pair(instrument, rng)
        pairs.append(_pair(question, "Yes." if concise else answer))
    rng.shuffle(pairs)
    return pairs


def _tempo_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    bpm, (pace, pace_phrase) = fmt_bpm(f.tempo_bpm), pace_words(f.tempo_bpm)
    question = rng.choice([
        "What is the tempo of this piece in beats per minute?", "How fast is this music?",
        "Roughly what BPM is this track?", "What tempo is this clip played at?",
        "Can you estimate the tempo of this song?", "Is this a fast or a slow piece?",
    ])
    answer = rng.choice([
        f"The tempo is about {bpm} BPM, {pace_phrase}.",
        f"It moves at roughly {bpm} beats per minute, which is {pace}.",
        f"It is {pace}: about {bpm} beats per minute.",
        f"I'd put it at around {bpm} BPM, {pace_phrase}.",
    ])
    return question, answer


def _key_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([
        "What key is this piece in?", "Which key is this music in?", "What is the key of this song?",
        "In what key is this clip?", "What is the tonal centre of this music?",
    ])
    answers = [f"It is in {f.key}.", f"The music is in {f.key}, with {f.tonic} as its home note."]
    if f.mode:
        relative = relative_key(f.key)
        answers.append(f"{f.key[0].upper()}{f.key[1:]}: the tonic is {f.tonic} and the mode is {f.mode}.")
        if relative:
            answers.append(f"It is in {f.key}, whose relative {'major' if f.mode == 'minor' else 'minor'} is {relative}.")
    return question, rng.choice(answers)


def _mode_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([
        "Is this in a major or a minor key?", "Does this piece use a major or a minor mode?",
        "Is the tonality of this clip major or minor?",
    ])
    colour = mode_colour(f.mode)
    answer = rng.choice([
        f"It is in a {f.mode} key, {f.key}, which gives it {colour}.",
        f"{f.mode.capitalize()}: the key is {f.key}.",
        f"The music is in {f.key}, so the tonality is {f.mode}.",
    ])
    return question, answer


def _metre_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    n = f.beats_per_bar
    signature, word, feel = metre_words(n)
    question = rng.choice([
        "What is the time signature of this piece?", "How many beats are there in each bar?",
        "What metre is this music in?", "How is the beat grouped in this clip?",
    ])
    answer = rng.choice([
        f"It is in {signature}, with {word} beats to the bar.",
        f"The music is in {signature} time: {word} beats per bar, {feel}.",
        f"The beats fall in groups of {word}, so the time signature is {signature}.",
    ])
    return question, answer


def _chords_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    shown = f.chords[:6]
    chord_list = join_words(shown) + (", among others" if len(f.chords) > len(shown) else "")
    question = rng.choice([
        "What chords are played in this clip?", "Which chords do you hear?", "Can you name the chords in this excerpt?",
        "How does the harmony move in this clip?", "What chords does this passage use?",
    ])
    if len(shown) == 1:
        return question, rng.choice([f"It stays on {shown[0]} throughout.", f"The harmony rests on a single chord, {shown[0]}."])
    pace = f", changing about every {fmt_seconds(f.seconds_per_chord)}" if f.seconds_per_chord else ""
    answer = rng.choice([
        f"The harmony moves through {chord_list}.",
        f"I hear {chord_list}{pace}.",
        f"The chords are {chord_list}.",
        f"It moves between {chord_list}{pace}.",
    ])
    return question, answer


def _progression_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([
        "What chord progression does this piece use?", "Can you describe the chord progression in Roman numerals?",
        "Which progression does the harmony repeat?",
    ])
    size = len(f.progression.split("–"))
    in_key = f" in {f.key}" if f.key else ""
    answer = rng.choice([
        f"It repeats a {NUMBER_WORDS.get(size, str(size))}-chord progression{in_key}: {f.progression}.",
        f"The progression is {f.progression}{in_key}, played over and over.",
    ])
    return question, answer


def _genre_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    main, others = f.genres[0], f.genres[1:3]
    question = rng.choice([
        "What genre is this music?", "How would you classify the style of this track?", "What kind of music is this?",
        "Which genre does this clip belong to?", "What style of music is this?",
    ])
    extra = f", with elements of {join_words(others)}" if others else ""
    answer = rng.choice([
        f"This is {genre_phrase(main)}{extra}.",
        f"I would call it {genre_phrase(main)}{extra}.",
        f"It is best described as {genre_phrase(main)}{extra}.",
    ])
    return question, answer


def _instruments_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    listed = join_words([with_article(i) for i in f.instruments[:6]])
    question = rng.choice([
        "Which instruments can you hear?", "What instruments play in this clip?",
        "List the instruments you hear in this recording.", "What is the instrumentation of this piece?",
        "Which instruments are playing?",
    ])
    answers = [f"I can hear {listed}.", f"The clip features {listed}."]
    if f.instruments_complete:
        answers.append(f"The instrumentation is {join_words(f.instruments)}.")
    else:
        answers.append(f"Among the instruments, I can hear {listed}.")
    return question, rng.choice(answers)


def _has_instrument_pair(instrument: str, rng: random.Random) -> tuple[str, str]:
    thing = with_article(instrument)
    verb = "Are" if is_plural(instrument) else "Is"
    question = rng.choice([
        f"{verb} there {thing} in this clip?", f"Can you hear {thing} in this recording?",
        f"Does this piece feature {thing}?",
    ])
    answer = rng.choice([
        f"Yes, there {verb.lower()} {thing} in this clip.", f"Yes, you can hear {thing}.",
        f"Yes: {thing} {'are' if is_plural(instrument) else 'is'} part of the sound.",
    ])
    return question, answer


def _vocals_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([
        "Are there vocals in this clip?", "Does anyone sing in this track?",
        "Is this music instrumental, or does it have vocals?",
    ])
    if not f.vocals:
        return question, rng.choice([
            "No, it is instrumental: nobody sings.", "No, there are no vocals; the music is purely instrumental.",
        ])
    voice = f" {f.voice}" if f.voice else ""
    return question, rng.choice([
        f"Yes, there are{voice} vocals.", f"Yes, a{voice} voice can be heard singing.",
        f"It has vocals{': the voice is ' + f.voice if f.voice else ''}.",
    ])


def _mood_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    moods = join_words(f.moods[:4])
    question = rng.choice([
        "What mood does this music convey?", "How would you describe the feel of this track?",
        "What is the emotional character of this clip?",
    ])
    return question, rng.choice([f"It feels {moods}.", f"The mood is {moods}.", f"It comes across as {moods}."])


def _theme_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    themes = join_words(f.themes[:4])
    question = rng.choice([
        "What themes or uses is this music associated with?", "What kind of setting would this track suit?",
    ])
    return question, rng.choice([f"It is associated with {themes}.", f"It would suit themes such as {themes}."])


def _tags_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    tags = ", ".join(f.tags[:8])
    question = rng.choice([
        "Which tags would describe this clip?", "Give a few descriptive tags for this music.",
        "How would you tag this track?",
    ])
    return question, rng.choice([f"{tags[0].upper()}{tags[1:]}.", f"Tags that fit: {tags}.", f"I would tag it {tags}."])


def _sentence(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}."


# The understanding answers with nothing but the fact (a small model learns the facts from the
# audio far sooner when the answer's wording does not vary).
CONCISE_ANSWERS: dict[Callable, Callable[[Facts], str]] = {
    _tempo_pair: lambda f: f"{round(f.tempo_bpm)} BPM.",
    _key_pair: lambda f: _sentence(f.key),
    _mode_pair: lambda f: f"{f.mode.capitalize()}: {f.key}.",
    _metre_pair: lambda f: f"{metre_words(f.beats_per_bar)[0]}.",
    _chords_pair: lambda f: _sentence(join_words(f.chords[:6])),
    _progression_pair: lambda f: f"{f.progression}.",
    _genre_pair: lambda f: _sentence(f.genres[0]),
    _instruments_pair: lambda f: _sentence(join_words(f.instruments[:6])),
    _vocals_pair: lambda f: (f"Yes: {f.voice} vocals." if f.voice else "Yes.") if f.vocals else "No, it is instrumental.",
    _mood_pair: lambda f: _sentence(join_words(f.moods[:4])),
    _theme_pair: lambda f: _sentence(join_words(f.themes[:4])),
    _tags_pair: lambda f: _sentence(", ".join(f.tags[:8])),
}


def caption_text(f: Facts, rng: random.Random) -> str:
    sentences = [s for s in (_opening_sentence(f, rng),) if s]
    more = [s for s in (_pulse_sentence(f, rng), _harmony_sentence(f, rng), _character_sentence(f, rng)) if s]
    rng.shuffle(more)
    sentences += more + _notes_sentences(f, rng)
    if len(sentences) < 2:
        return ""
    return " ".join(sentences)


def _opening_sentence(f: Facts, rng: random.Random) -> str:
    instruments = join_words([with_article(i) for i in f.instruments[:5]])
    if f.genres:
        genre = f.genres[0]
        if instruments:
            return capitalise(rng.choice([
                f"{genre_piece(genre)} featuring {instruments}.",
                f"this is {genre_phrase(genre)}, with {instruments}.",
            ]))
        return capitalise(rng.choice([f"this is {genre_phrase(genre)}.", f"{genre_piece(genre)}."]))
    if instruments:
        ensemble = f" for {f.ensemble.lower()}" if f.ensemble else ""
        return capitalise(rng.choice([f"a piece{ensemble}, played here by {instruments}.",
                                      f"{instruments} play together in this excerpt."]))
    return ""


def _pulse_sentence(f: Facts, rng: random.Random) -> str:
    if not f.tempo_bpm:
        return ""
    bpm, (pace, pace_phrase) = fmt_bpm(f.tempo_bpm), pace_words(f.tempo_bpm)
    if f.beats_per_bar:
        signature, word, feel = metre_words(f.beats_per_bar)
        return rng.choice([
            f"It moves at about {bpm} BPM in {signature}, {pace_phrase}.",
            f"The tempo is {pace}, around {bpm} beats per minute, with {word} beats to the bar.",
        ])
    return rng.choice([f"The tempo is {pace}, about {bpm} BPM.", f"It moves at about {bpm} beats per minute."])


def _harmony_sentence(f: Facts, rng: random.Random) -> str:
    chords = join_words(f.chords[:5]) if len(f.chords) >= 2 else ""
    if f.key and chords:
        return rng.choice([f"It is in {f.key}, and the harmony moves through {chords}.",
                           f"The harmony, in {f.key}, moves through {chords}."])
    if f.key:
        return rng.choice([f"It is in {f.key}.", f"The key is {f.key}, which gives it {mode_colour(f.mode)}." if f.mode else f"The key is {f.key}."])
    if chords:
        return f"The harmony moves through {chords}."
    return ""


def _character_sentence(f: Facts, rng: random.Random) -> str:
    parts = []
    if f.moods:
        parts.append(rng.choice([f"The mood is {join_words(f.moods[:3])}.", f"It sounds {join_words(f.moods[:3])}."]))
    if f.vocals is False:
        parts.append("It is instrumental.")
    elif f.vocals:
        parts.append(f"A{' ' + f.voice if f.voice else ''} voice sings over the music.")
    return " ".join(parts)


def _notes_sentences(f: Facts, rng: random.Random) -> list[str]:
    out = []
    if len(f.entrances) >= 2:
        (first, t0), (second, t1) = f.entrances[0], f.entrances[1]
        if t1 - t0 < 0.5:
            out.append(rng.choice([f"The {first} and the {second} begin together.", f"The {first} and the {second} start at once."]))
        else:
            out.append(rng.choice([
                f"The {first} opens the excerpt, and the {second} joins about {fmt_seconds(t1 - t0)} later.",
                f"The {first} begins alone; the {second} enters after about {fmt_seconds(t1 - t0)}.",
            ]))
    elif len(f.entrances) == 1:
        out.append(f"The {f.entrances[0][0]} plays on its own throughout.")
    if f.registers:
        instrument, (low, high) = max(f.registers.items(), key=lambda kv: (midi_number(kv[1][1]) or 0))
        out.append(rng.choice([f"The {instrument} reaches highest, ranging from {low} up to {high}.",
                               f"The highest part belongs to the {instrument}, between {low} and {high}."]))
    if f.notes_per_second:
        density = "busy" if f.notes_per_second > 8 else "moderately busy" if f.notes_per_second > 3 else "sparse"
        out.append(f"The texture is {density}, with about {round(f.notes_per_second)} notes per second.")
    return out


def reasoning_pairs(f: Facts, rng: random.Random) -> list[dict]:
    candidates = []
    if f.tempo_bpm and f.beats_per_bar:
        candidates.append(_movement_pair)
    if f.mode and f.tempo_bpm:
        candidates.append(_mood_reasoning_pair)
    if f.key and (f.chords or f.tempo_bpm):
        candidates.append(_play_along_pair)
    if (f.genres or f.moods) and f.tempo_bpm:
        candidates.append(_setting_pair)
    if f.tempo_bpm and (f.key or f.instruments or f.genres):
        candidates.append(_change_pair)
    if len(f.instruments) >= 2:
        candidates.append(_roles_pair)
    if len(f.entrances) >= 2:
        candidates.append(_entrances_pair)
    if sum(bool(x) for x in (f.genres, f.tempo_bpm, f.key, f.instruments)) >= 3:
        candidates.append(_recipe_pair)
    chosen = rng.sample(candidates, min(REASONING_PAIRS, len(candidates)))
    return [_pair(*writer(f, rng)) for writer in chosen]


def _movement_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    bpm, pace_phrase = fmt_bpm(f.tempo_bpm), pace_words(f.tempo_bpm)[1]
    signature, word, feel = metre_words(f.beats_per_bar)
    question = rng.choice([
        "Would this music work for dancing, and why?", "How does the rhythm of this piece shape the way it feels?",
        "What kind of movement does the pulse of this music suggest?",
    ])
    if f.beats_per_bar == 3:
        verdict = "The three-beat bar suggests a swaying, waltz-like movement rather than a straight dance beat."
    elif f.tempo_bpm < 90:
        verdict = "That suits slow dancing, swaying or simply listening better than an energetic dance floor."
    elif f.tempo_bpm <= 135:
        verdict = "That sits in the range of most dance music, so it would work well for dancing."
    else:
        verdict = "It is fast enough for energetic dancing, although many dancers would move at half that speed."
    answer = f"At about {bpm} BPM in {signature}, it has {pace_phrase} and {feel}. {verdict}"
    return question, answer


def _mood_reasoning_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    bpm, pace_phrase = fmt_bpm(f.tempo_bpm), pace_words(f.tempo_bpm)[1]
    lively = f.tempo_bpm >= 108
    combined = {("major", True): "bright and energetic", ("major", False): "warm and relaxed",
                ("minor", True): "urgent, even driving", ("minor", False): "melancholy and reflective"}[(f.mode, lively)]
    question = rng.choice([
        "How do the key and tempo work together to create the mood of this piece?",
        "What gives this music its emotional character?",
        "Why does this clip feel the way it does?",
    ])
    tempo_effect = "adds energy and momentum" if lively else "lets the music breathe"
    answer = (f"The {f.mode} key ({f.key}) gives it {mode_colour(f.mode)}, and {pace_phrase} at about {bpm} BPM "
              f"{tempo_effect}. Together they make it feel {combined}.")
    if f.moods:
        answer += f" That fits its {join_words(f.moods[:2])} character."
    return question, answer


def _play_along_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([
        "What would a musician need to know to play along with this clip?",
        "I want to jam along with this track. What should I know?",
        "How would you prepare to accompany this piece?",
    ])
    parts = [f"Play in {f.key}" + (f": the chords are {join_words(f.chords[:5])}." if len(f.chords) >= 2 else ".")]
    if f.tempo_bpm:
        count = f"count {NUMBER_WORDS.get(f.beats_per_bar, str(f.beats_per_bar))} beats to the bar" if f.beats_per_bar else "keep a steady count"
        parts.append(f"Set a metronome to about {fmt_bpm(f.tempo_bpm)} BPM and {count}.")
    if f.mode:
        scale = f"{f.tonic} major pentatonic" if f.mode == "major" else f"{f.tonic} minor pentatonic"
        parts.append(f"For improvising, the {f.tonic} {f.mode} scale, or the simpler {scale} scale, fits over most of it.")
    return question, " ".join(parts)


SETTINGS_BY_GENRE = (  # (words in the genre, settings, the energy those settings want)
    (("classical", "baroque", "opera", "medieval", "chamber"), "a quiet dinner, a concert hall, or focused work and study", "calm"),
    (("ambient", "new age", "drone", "soundscape"), "meditation, studying, or the background of a film or documentary", "calm"),
    (("electronic", "techno", "house", "trance", "dance", "edm", "drum and bass", "disco"), "a club, a party or a workout", "lively"),
    (("rock", "metal", "punk"), "a drive, a workout or a live concert", "lively"),
    (("jazz", "blues", "lounge", "soul"), "a bar, a relaxed dinner or a late evening", "relaxed"),
    (("folk", "country", "singer-songwriter", "waltz", "ballad"), "a road trip, a small café or a gathering of friends", "relaxed"),
    (("hip-hop", "rap", "r&b", "funk"), "a party, a commute or a workout", "lively"),
    (("pop",), "a party, a commute or background listening at home", "lively"),
)


def _setting_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    genre = f.genres[0] if f.genres else None
    bpm = f.tempo_bpm
    pace, _ = pace_words(bpm)
    match = next(((s, e) for words, s, e in SETTINGS_BY_GENRE if genre and any(w in genre.lower() for w in words)), None)
    if match is None:
        energy = "lively" if bpm >= 115 else "calm" if bpm < 90 else "relaxed"
        settings = {"lively": "a party, exercise or a drive", "calm": "studying, reading or winding down in the evening",
                    "relaxed": "background listening at home or at work"}[energy]
    else:
        settings, energy = match
    question = rng.choice([
        "In what situations might someone listen to this music?", "Where would this track fit well, and why?",
        "What kind of setting suits this music?",
    ])
    tempo = f"its {pace} tempo (about {fmt_bpm(bpm)} BPM)"
    fits = {"calm": bpm < 100, "relaxed": 70 <= bpm < 125, "lively": bpm >= 100}[energy]
    reasons = ([f"its {genre} style"] if genre else []) + ([tempo] if fits or not genre else [])
    if f.moods:
        reasons.append(f"its {join_words(f.moods[:2])} mood")
    answer = f"It would suit {settings}: {join_words(reasons)} {'fit' if len(reasons) > 1 else 'fits'} that kind of setting."
    if genre and not fits:
        answer += (f" At about {fmt_bpm(bpm)} BPM it is {pace}, so it would bring more energy than is usual there."
                   if energy != "lively" else f" At about {fmt_bpm(bpm)} BPM it is {pace}, a calmer choice than is usual there.")
    return question, answer


def _change_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    bpm = f.tempo_bpm
    has_beat = any(instrument_role(i) == "beat" for i in f.instruments)
    if bpm < 110:
        question = rng.choice(["How could a producer make this track feel more energetic?",
                               "What would you change to make this music livelier?"])
        steps = [f"raise the tempo from about {fmt_bpm(bpm)} to around {fmt_bpm(round(bpm * 1.2))} BPM"]
        steps.append("add a busier drum pattern" if has_beat else "add drums or percussion with a clear backbeat")
        if f.mode == "minor":
            steps.append(f"move the harmony towards {relative_key(f.key) or 'a major key'} for a brighter colour")
        else:
            steps.append("push the bass and the rhythm section forward in the mix")
    else:
        question = rng.choice(["How could a producer make this track feel calmer?",
                               "What would you change to make this music more relaxed?"])
        steps = [f"slow the tempo from about {fmt_bpm(bpm)} to around {fmt_bpm(round(bpm * 0.75))} BPM"]
        steps.append("thin out the drums or replace them with soft percussion" if has_beat else "keep the rhythm sparse")
        soft = next((i for i in f.instruments if instrument_role(i) in ("harmony", "melody")), None)
        steps.append(f"let the {soft} carry the music with longer, sustained notes" if soft else "favour sustained pads and soft, long notes")
    answer = f"To do that, {join_words(steps)}. Each change works on a different layer: pace, rhythm and colour."
    return question, answer


def _roles_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice(["How do the instruments work together in this piece?",
                           "What role does each instrument play here?"])
    clauses, colour = [], []
    for instrument in f.instruments[:5]:
        role = instrument_role(instrument)
        if role is None:
            colour.append(instrument)
            continue
        singular, plural = rng.choice(ROLE_PHRASES[role])
        clauses.append(f"the {instrument} {plural if is_plural(instrument) else singular}")
    if colour:
        clauses.append(f"the {join_words(colour)} add{'' if len(colour) > 1 or is_plural(colour[0]) else 's'} colour")
    if len(clauses) < 2:
        clauses.append("together they form a full, layered sound")
    return question, capitalise(join_words(clauses)) + "."


def _entrances_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice(["Which instrument enters first, and how does the texture build?",
                           "Do the instruments all start together?"])
    (first, t0), rest = f.entrances[0], f.entrances[1:]
    together = [name for name, t in rest if t - t0 < 0.5]
    later = [(name, t) for name, t in rest if t - t0 >= 0.5]
    if together and not later:
        return question, f"Yes: the {join_words([first, *together])} start together, so the full texture is there from the first moment."
    opening = f"The {join_words([first, *together])} start{'' if together else 's'} the excerpt"
    steps = [f"the {name} joins after about {fmt_seconds(t - t0)}" for name, t in later[:3]]
    answer = f"{opening}; {join_words(steps)}. The texture thickens as each part enters."
    return question, answer


def _recipe_pair(f: Facts, rng: random.Random) -> tuple[str, str]:
    question = rng.choice([
        "Write instructions for composing a new piece in the style of this one.",
        "How would you describe this music to a composer who should write more of it?",
    ])
    parts = []
    style = genre_phrase(f.genres[0]) if f.genres else "a piece"
    head = f"Write {style}" if f.genres else "Write a piece"
    if f.key:
        head += f" in {f.key}"
    if f.tempo_bpm:
        head += f" at about {fmt_bpm(f.tempo_bpm)} BPM"
    if f.beats_per_bar:
        head += f" in {metre_words(f.beats_per_bar)[0]}"
    parts.append(head + ".")
    if f.instruments:
        parts.append(f"Score it for {join_words(f.instruments[:5])}.")
    if len(f.chords) >= 2:
        parts.append(f"Build the harmony on {join_words(f.chords[:4])}.")
    if f.moods:
        parts.append(f"Aim for {with_article(join_words(f.moods[:2]))} mood.")
    return question, " ".join(parts)


def _pair(question: str, answer: str) -> dict[str, str]:
    return {"question": question, "answer": answer}
