"""Answer parsers on hard cases: enharmonic and spelled-out keys, articles that look like tonics,
tempi in words and ranges, time signatures, instrument lists with "and" and negations."""

from __future__ import annotations

import pytest

from llark.evaluate.parse import (
    find_labels, parse_instruments, parse_key, parse_label_strict, parse_metre, parse_tempo, parse_times,
    words_to_number,
)


@pytest.mark.parametrize("answer, expected", [
    ("The key is C major.", "C major"),
    ("F#m", "F# minor"),
    ("Gbm", "F# minor"),
    ("F sharp minor", "F# minor"),
    ("F♯ minor", "F# minor"),
    ("G♭ major", "F# major"),
    ("E flat minor", "Eb minor"),
    ("e-flat major", "Eb major"),
    ("D# minor", "Eb minor"),
    ("Cb major", "B major"),
    ("E# minor", "F minor"),
    ("B# major", "C major"),
    ("Amin", "A minor"),
    ("C maj", "C major"),
    ("Bb Major", "Bb major"),
    ("I think it is in A Minor.", "A minor"),
    ("Dm", "D minor"),
    ("a minor", "A minor"),
    ("The key is a minor.", "A minor"),
    # "a" the article, then the real key.
    ("It is in a minor key, F minor, which gives it a darker colour.", "F minor"),
    ("There is a major change halfway; the key is D major.", "D major"),
    # A tonic with no mode is major only where it is plainly a key.
    ("It is in the key of D.", "D major"),
    ("Key: Bb", "Bb major"),
    ("Eb", "Eb major"),
    # The first key named wins.
    ("C major, the relative major of A minor.", "C major"),
    ("It is in Aeolian mode on E: E aeolian.", "E minor"),
])
def test_parse_key(answer, expected):
    assert parse_key(answer) == expected


@pytest.mark.parametrize("answer", [
    "I am not sure.",
    "It is a major piece of work.",  # article + adjective
    "The bass line is in D dorian.",  # a mode we do not score
    "Recorded at 10 AM.",  # a capital M is not read as major
    "",
])
def test_parse_key_none(answer):
    assert parse_key(answer) is None


@pytest.mark.parametrize("words, value", [
    (["one", "hundred", "and", "twenty"], 120.0),
    (["a", "hundred", "and", "twenty"], 120.0),
    (["one", "hundred", "twenty"], 120.0),
    (["ninety", "six"], 96.0),
    (["seventy", "five", "point", "five"], 75.5),
    (["twelve"], 12.0),
])
def test_words_to_number(words, value):
    assert words_to_number(words) == value


@pytest.mark.parametrize("words", [["eleven", "five"], ["twenty", "thirty"], ["and"], ["a"], ["one", "point"]])
def test_words_to_number_rejects(words):
    assert words_to_number(words) is None


@pytest.mark.parametrize("answer, expected", [
    ("approximately 120 BPM", 120.0),
    ("around one hundred twenty", 120.0),
    ("around one hundred twenty beats per minute", 120.0),
    ("a hundred and twenty bpm", 120.0),
    ("ninety-six BPM", 96.0),
    ("~140bpm", 140.0),
    ("The tempo is about 114.6 BPM, a lively, upbeat pace.", 114.6),
    ("It moves at roughly 122.5 beats per minute, which is lively.", 122.5),
    ("between 118 and 122 BPM", 120.0),
    ("118-122 BPM", 120.0),
    ("It is in 3/4 and 120 BPM.", 120.0),  # the 4 of 3/4 does not start a range
    ("In 4/4 at 96.", 96.0),  # no unit: the first plausible number that is not a time signature
    ("It has 4 beats per bar and a tempo of 132", 132.0),
    ("one hundred twenty-five point five bpm", 125.5),
])
def test_parse_tempo(answer, expected):
    assert parse_tempo(answer) == pytest.approx(expected)


@pytest.mark.parametrize("answer", ["It is fast.", "Recorded in 1985.", "It is in 3/4.", ""])
def test_parse_tempo_none(answer):
    assert parse_tempo(answer) is None


@pytest.mark.parametrize("answer, expected", [
    ("It is in 3/4, with three beats to the bar.", 3),
    ("Common time: four beats per bar.", 4),
    ("It has a three-beat bar.", 3),
    ("It has 4 beats in each measure.", 4),
    ("6/8", 2),
    ("12/8 shuffle", 4),
    ("The time signature is 4 / 4.", 4),
    ("triple metre", 3),
    ("waltz time", 3),
])
def test_parse_metre(answer, expected):
    assert parse_metre(answer) == expected


def test_parse_metre_none():
    assert parse_metre("A waltz-like feel.") is None
    assert parse_metre("It is at 120 BPM.") is None


VOCABULARY = {
    "piano": [], "drums": ["drum kit", "percussion"], "vocals": ["voice", "singer", "singing"],
    "bass": ["bass guitar"], "guitar": [], "clarinet": ["bass clarinet"], "synth_bass": ["synth bass"],
}


@pytest.mark.parametrize("answer, expected", [
    ("I hear piano, bass and drums.", {"piano", "bass", "drums"}),
    ("Piano and drums and a bass guitar", {"piano", "drums", "bass"}),
    ("The instrumentation is bass, drums, guitar and organ.", {"bass", "drums", "guitar"}),
    ("no vocals, just piano and drums", {"piano", "drums"}),
    ("It is played without drums or bass, only a guitar.", {"guitar"}),
    ("There isn't any singing; the piano leads.", {"piano"}),
    ("I don't hear drums. A guitar plays.", {"guitar"}),
    ("not only piano but also drums", {"piano", "drums"}),
    ("A bass clarinet and two guitars.", {"clarinet", "guitar"}),  # longest name first
    ("A synth bass under the drum kit.", {"synth_bass", "drums"}),
    ("Nothing I can name.", set()),
])
def test_parse_instruments(answer, expected):
    assert parse_instruments(answer, VOCABULARY) == expected


def test_parse_instruments_empty_answer_is_unparseable():
    assert parse_instruments("", VOCABULARY) is None
    assert parse_instruments("   ", VOCABULARY) is None


def test_find_labels_and_strict():
    labels = ["hiphop", "pop", "rock", "pop rock", "blues"]
    assert find_labels("This is Hip-Hop.", labels) == ["hiphop"]
    assert find_labels("hip hop", labels) == ["hiphop"]
    assert find_labels("pop rock, and also some rock", labels) == ["pop rock", "rock"]
    assert find_labels("poprock", labels) == ["pop rock"]
    assert find_labels("a rocking tune", labels) == []  # whole words only
    assert parse_label_strict("The predicted genre is blues.", labels) == "blues"
    assert parse_label_strict("rock or blues", labels) is None
    assert parse_label_strict("Jazz.", labels) is None


def test_parse_times():
    assert parse_times("0.1s, 1.19s, 2.25s, 3") == [0.1, 1.19, 2.25, 3.0]
    assert parse_times("2.0 s, 0.5 s, 1.0s") == [0.5, 1.0, 2.0]
    assert parse_times("beats at 0.5s, x, 1.0ss") == [0.5, 1.0]
    assert parse_times("no beats") is None
