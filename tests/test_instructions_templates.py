"""The offline template writer: deterministic, varied, grammatical pairs from each dataset's JSON."""

import json
import re

import pytest

from instructions_fixtures import FEATURES, clip, every_dataset, write_clips
from pipeline.instructions.metadata import clip_metadata
from pipeline.instructions.prompts import load_prompt_set
from pipeline.instructions.run import InstructionsConfig, plan_run, run_instructions
from pipeline.instructions.stage import build_items, write_with_templates
from pipeline.instructions.stage import read_instruction_records as read_records
from pipeline.instructions.facts import clip_facts, readable_chord, readable_key
from pipeline.instructions.wording import relative_key, with_article
from pipeline.runner import ItemError, StageConfigError


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    path = write_clips(tmp_path_factory.mktemp("c") / "c.jsonl", [clip("fma")])
    return plan_run(InstructionsConfig(input=path, output=path.with_name("o.jsonl"), backend="template")).settings


def items_for(records, settings, tmp_path):
    rows, _ = build_items(write_clips(tmp_path / "clips.jsonl", records), settings)
    return rows


def all_pairs(records, settings, tmp_path, seed=None):
    if seed is not None:
        settings = type(settings)(**{**settings.__dict__, "seed": seed})
    return {row["id"]: write_with_templates(row, settings) for row in items_for(records, settings, tmp_path)}


def test_every_dataset_and_family_gets_grammatical_pairs(settings, tmp_path):
    records = all_pairs(every_dataset(1) + every_dataset(2), settings, tmp_path)
    assert len(records) == 28
    for record in records.values():
        assert record["pairs"], record["id"]
        assert record["_rejected"] == [], (record["id"], record["_rejected"])
        for pair in record["pairs"]:
            for text in pair.values():
                assert text[0].isupper() and text.rstrip()[-1] in ".?", text
                assert "  " not in text and "{" not in text and "None" not in text, text
                assert not re.search(r"\b(a [aeiou]\w+ (?!unit)|an [bcdfghjklmnpqrstvwxz]\w+)", text), text
                assert "_" not in text, text  # no field name or raw label
    understanding = [r for r in records.values() if r["task_family"] == "understanding"]
    assert all(len(r["pairs"]) >= 5 for r in understanding)
    assert {r["backend"] for r in records.values()} == {"template", "given"}


def test_same_seed_same_pairs_other_seed_other_wording(settings, tmp_path):
    records = every_dataset(1)
    first, again = all_pairs(records, settings, tmp_path), all_pairs(records, settings, tmp_path)
    other = all_pairs(records, settings, tmp_path, seed=7)
    assert first == again
    changed = [k for k in first if first[k]["pairs"] != other[k]["pairs"]]
    assert len(changed) >= len(first) - 2
    assert other["fma-000001-understanding"]["prompt_version"].endswith("seed7")


def test_wording_varies_across_clips(settings, tmp_path):
    records = all_pairs([clip("mtg_jamendo", n) for n in range(40)], settings, tmp_path)
    tempo_answers = {p["answer"].replace("121.3", "X") for r in records.values() for p in r["pairs"] if "121.3" in p["answer"]
                     and r["task_family"] == "understanding"}
    questions = {p["question"] for r in records.values() for p in r["pairs"]}
    assert len(tempo_answers) >= 4 and len(questions) >= 30


def test_answers_state_the_facts_of_the_clip(settings, tmp_path):
    records = all_pairs([clip("magnatagatune"), clip("musicnet"), clip("mtg_jamendo")], settings, tmp_path)
    magna = " ".join(p["answer"] for p in records["magnatagatune-000001-understanding"]["pairs"])
    assert "121.3" in magna and "F# minor" in magna and "4/4" in magna and "harpsichord" in magna
    assert "instrumental" in magna  # the "no vocals" tag
    mtg = " ".join(p["answer"] for p in records["mtgjamendo-000001-understanding"]["pairs"])
    assert "an electric guitar" in mtg and "hip-hop" in mtg and "energetic" in mtg
    reasoning = records["musicnet-000001-reasoning"]["pairs"]
    assert 2 <= len(reasoning) <= 4 and all(len(p["answer"].split()) >= 15 for p in reasoning)


def test_concise_answers_are_the_bare_facts_with_the_same_questions(settings, tmp_path):
    records = [clip("magnatagatune"), clip("mtg_jamendo")]
    full = all_pairs(records, settings, tmp_path)
    concise_settings = type(settings)(**{**settings.__dict__, "concise": True})
    concise = all_pairs(records, concise_settings, tmp_path)
    magna = concise["magnatagatune-000001-understanding"]
    answers = [p["answer"] for p in magna["pairs"]]
    assert "121 BPM." in answers and "4/4." in answers
    assert "F# minor." in answers or "Minor: F# minor." in answers
    bad = [a for a in answers if not (len(a.split()) <= 12 and a.endswith(".") and not a[0].islower())]
    assert not bad, bad
    assert [p["question"] for p in magna["pairs"]] == [p["question"] for p in full["magnatagatune-000001-understanding"]["pairs"]]
    assert "-concise-" in magna["prompt_version"] and "-concise-" not in full["magnatagatune-000001-understanding"]["prompt_version"]
    # Reasoning keeps its sentences.
    assert concise["mtgjamendo-000001-reasoning"]["pairs"] == full["mtgjamendo-000001-reasoning"]["pairs"]


def test_concise_answers_are_refused_for_a_language_model_backend(tmp_path):
    path = write_clips(tmp_path / "c.jsonl", [clip("fma")])
    with pytest.raises(StageConfigError, match="--concise-answers"):
        plan_run(InstructionsConfig(input=path, output=tmp_path / "o.jsonl", backend="openai", concise_answers=True),
                 environ={"OPENAI_API_KEY": "sk-test"})


def test_musicnet_captions_come_from_the_notes(settings, tmp_path):
    records = all_pairs([clip("musicnet", captioning=True)], settings, tmp_path)
    (record,) = records.values()
    (pair,) = record["pairs"]
    assert pair["question"] in load_prompt_set().caption_questions
    caption = pair["answer"]
    assert re.search(r"The piano (begins alone|opens the excerpt)", caption)
    assert "violin" in caption and "2 seconds" in caption and "F#5" in caption


def test_given_captions_are_kept_word_for_word(settings, tmp_path):
    records = all_pairs([clip("musiccaps", 3), clip("yt8m_musictextclips", 3)], settings, tmp_path)
    caps = {r["dataset"]: r for r in records.values()}
    assert caps["musiccaps"]["pairs"][0]["answer"] == "A mellow jazz trio plays a slow ballad, take 3."
    assert caps["musiccaps"]["backend"] == "given" and caps["musiccaps"]["model"] == "musiccaps-captions"
    assert caps["yt8m_musictextclips"]["pairs"][0]["question"] in load_prompt_set().caption_questions


def test_a_clip_without_features_still_gets_pairs_and_an_empty_one_fails(settings, tmp_path):
    rows = items_for([clip("mtg_jamendo", features=False)], settings, tmp_path)
    record = write_with_templates(rows[0], settings)
    assert record["pairs"] and not any("BPM" in p["answer"] for p in record["pairs"])
    bare = clip("fma", features=False, annotations={"track_id": 5, "track": {}, "album": {}, "artist": {}})
    (row, _) = items_for([bare], settings, tmp_path)
    with pytest.raises(ItemError) as exc:
        write_with_templates(row, settings)
    assert exc.value.code == "too_little_metadata"


def test_music_words():
    assert readable_chord("F#:min") == "F# minor" and readable_chord("G:7") == "G dominant seventh"
    assert readable_chord("A major") == "A major" and readable_chord("N") is None
    assert readable_key("f#:minor") == "F# minor" and readable_key("Bb major") == "Bb major"
    assert relative_key("C minor") == "Eb major" and relative_key("A minor") == "C major"
    assert relative_key("D major") == "B minor" and relative_key("F major") == "D minor"
    assert [with_article(w) for w in ("oboe", "violin", "ukulele", "drums", "percussion")] == [
        "an oboe", "a violin", "a ukulele", "drums", "percussion"]


def test_facts_prefer_the_datasets_own_values_over_estimates():
    record = clip("demo")  # annotations: D major, 112 BPM, 3/4; estimates: F# minor, 121.3 BPM, 4/4
    facts = clip_facts(clip_metadata(record), "demo")
    assert (facts.key, facts.tempo_bpm, facts.beats_per_bar) == ("D major", 112.0, 3)
    facts = clip_facts(clip_metadata(clip("fma")), "fma")
    assert (facts.key, facts.tempo_bpm, facts.beats_per_bar) == ("F# minor", 121.3, 4)
    assert facts.chords == ["F# minor", "D major", "A major", "E major"]
    assert facts.tags == ["chill beats", "lofi"]  # the URL tag is left out


def test_the_stage_writes_records_that_satisfy_the_contract(tmp_path):
    inp = write_clips(tmp_path / "clips.jsonl", every_dataset(1) + [{"id": "broken"}])
    lines = []
    failed = run_instructions(InstructionsConfig(input=inp, output=tmp_path / "out.jsonl", backend="template",
                                                 executor="inline", progress=False), say=lines.append)
    records = read_records(tmp_path / "out.jsonl")
    assert failed == 1 and len(records) == 14
    assert [r["clip_id"] for r in records][:2] == ["fma-000001", "fma-000001"]
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [e["code"] for e in errors] == ["invalid_clip"] and "broken" in errors[0]["reason"]
    assert any("14 instruction records (template 12, given 2)" in line for line in lines)
    assert FEATURES["key_madmom"] in (tmp_path / "out.jsonl").read_text()
