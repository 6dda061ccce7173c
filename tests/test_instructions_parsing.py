"""Reading Q/A pairs out of model replies, and the filter that drops the ones breaking the rules."""

import json

import pytest

from pipeline.instructions.filtering import REASONS, FilterSettings, filter_pairs
from pipeline.instructions.metadata import identifier_like_keys
from pipeline.instructions.parsing import UnusableReply, parse_reply
from pipeline.instructions.prompts import load_prompt_set

PAIRS = [{"question": "What key is it in?", "answer": "It is in A minor."},
         {"question": "Is there a piano?", "answer": "Yes, a piano plays the melody."},
         {"question": "How fast is it?", "answer": "About 96 BPM."}]


@pytest.mark.parametrize("reply", [
    json.dumps(PAIRS),
    "Sure! Here you go:\n```json\n" + json.dumps(PAIRS, indent=2) + "\n```\nAnything else? [happy to help]",
    "```\n" + json.dumps(PAIRS) + "\n```",
    json.dumps({"pairs": PAIRS}),
    json.dumps({"conversation": PAIRS}),
    "Here are [three] pairs: " + json.dumps(PAIRS) + " -- done.",
])
def test_well_formed_replies_in_their_many_wrappings(reply):
    parsed = parse_reply(reply)
    assert parsed.pairs == PAIRS
    assert not parsed.salvaged


def test_a_single_object_and_other_key_spellings_are_accepted():
    assert parse_reply('{"Question": "Tempo?", "Answer": 120}').pairs == [{"question": "Tempo?", "answer": "120"}]
    assert parse_reply('[{"q": "Key?", "a": "D major"}]').pairs == [{"question": "Key?", "answer": "D major"}]


def test_truncated_reply_keeps_the_complete_pairs():
    text = json.dumps(PAIRS)
    cut = text[: text.index('"question"', text.index("Is there a piano")) + 14]
    parsed = parse_reply(cut)
    assert parsed.pairs == PAIRS[:2] and parsed.salvaged
    fenced = parse_reply("```json\n" + json.dumps({"pairs": PAIRS})[:-30])
    assert fenced.pairs == PAIRS[:2] and fenced.salvaged


def test_malformed_elements_are_skipped_and_reported():
    parsed = parse_reply(json.dumps([PAIRS[0], "not an object", {"question": "no answer"}, PAIRS[1]]))
    assert parsed.pairs == PAIRS[:2]
    assert parsed.salvaged and len(parsed.problems) == 2


@pytest.mark.parametrize("reply,code", [
    ("", "empty_reply"),
    ("   \n", "empty_reply"),
    ("I'm sorry, I can't listen to audio.", "no_json"),
    ("[1, 2, 3]", "no_pairs"),
    ('{"question": "What is the key?", "answer": "It is in C ma', "no_pairs"),
    ('{"note": "nothing here"}', "no_pairs"),
])
def test_replies_with_nothing_usable(reply, code):
    with pytest.raises(UnusableReply) as exc:
        parse_reply(reply)
    assert exc.value.code == code


# ---------------------------------------------------------------------------------------------
# Filtering


@pytest.fixture(scope="module")
def filters():
    prompts = load_prompt_set()
    return FilterSettings(prompts.question_phrases, prompts.answer_phrases)


def test_each_reason_drops_what_it_should_and_keeps_the_pair(filters):
    metadata = {"track.genre_top": "Rock", "tempo_in_beats_per_minute_madmom": 120.0,
                "beat_grid_madmom": [{"time": 0.5, "beat_number": 1}]}
    good = {"question": "What genre is this?", "answer": "It is rock, with a driving beat."}
    pairs = [
        good,
        {"question": "  ", "answer": "Nothing asked."},
        {"question": "What is the tempo?", "answer": "The tempo_in_beats_per_minute_madmom is 120."},
        {"question": "What does genre_top say?", "answer": "Rock."},
        {"question": "Which beat_number starts the bar?", "answer": "One."},
        {"question": "What is the mood?", "answer": "From the metadata, it is energetic."},
        {"question": "What key?", "answer": "The provided data says E minor."},
        {"question": "Who is the artist?", "answer": "A band."},
        {"question": "What is the duration of this clip?", "answer": "25 seconds."},
        {"question": "What instruments?", "answer": "It is not possible to determine that."},
        {"question": "Who plays first?", "answer": "Violin 1 starts, then the cello."},
        {"question": "what GENRE is this??", "answer": "Rock again."},
    ]
    kept, rejected = filter_pairs(pairs, filters, identifier_like_keys(metadata))
    assert kept == [good]
    reasons = [r["reason"] for r in rejected]
    assert reasons == ["empty", "field_name", "field_name", "field_name", "mentions_metadata", "mentions_metadata",
                       "question_phrase", "question_phrase", "answer_phrase", "answer_phrase", "duplicate"]
    assert set(reasons) == set(REASONS)
    assert rejected[1]["detail"] == "tempo_in_beats_per_minute_madmom"
    assert rejected[6]["detail"] == "who is the artist"
    assert rejected[2]["question"] == "What does genre_top say?"  # the pair is kept as it was


def test_phrases_match_whole_words_and_ignore_case_spacing_and_quotes(filters):
    keep = [{"question": "Is the texture packed with layers?", "answer": "Yes, densely."},  # "pack" is not a phrase
            {"question": "Is the melody legato?", "answer": "It is smooth; I can hear it clearly."}]
    drop = [{"question": "What's the\nNAME  of the artist?", "answer": "X."},
            {"question": "Is it sad?", "answer": "It\u2019s impossible to determine the mood, I\u2019m unable to say."}]
    kept, rejected = filter_pairs(keep + drop, filters)
    assert kept == keep
    assert [r["detail"] for r in rejected] == ["name of the artist", "impossible to determine"]


def test_field_names_are_found_at_any_depth_and_plain_words_are_not():
    names = identifier_like_keys({"track.genre_top": "x", "genres": ["y"],
                                  "notes": {"french horn": [{"start": 0.1, "pitch": "C4"}]},
                                  "chords_madmom": [{"start": 0, "end": 1, "chord": "A minor"}]})
    assert names == {"track.genre_top", "genre_top", "chords_madmom"}


def test_the_redactor_removes_keys_from_messages_and_only_the_key_from_replies():
    from pipeline.instructions.chat import Redactor

    redact = Redactor(["sk-live-123456789abcdef"])
    message = ("Incorrect API key provided: sk-live-***cdef. Authorization: Bearer sk-live-123456789abcdef; "
               "retry with sk-live-123456789abcdef")
    cleaned = redact(message)
    assert "123456789" not in cleaned and "sk-live-***" not in cleaned and cleaned.count("[redacted]") == 3
    reply = "The bearer of this melody is the oboe; key sk-live-123456789abcdef."
    assert redact.secrets_only(reply) == "The bearer of this melody is the oboe; key [redacted]."
