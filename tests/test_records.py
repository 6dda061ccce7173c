import json

import pytest

from pipeline.records import ClipRecord, InvalidRecord, check_id, make_id, parse_record, read_records, write_jsonl


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "..", "a..b", ".hidden", "a\x00b", "a\\b", "blues.00000", "with space", "x" * 201, "-lead", None, 17],
)
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(InvalidRecord):
        check_id(bad)


def test_make_id_is_safe_stable_and_collision_free():
    a = make_id("gtzan", "blues.00000")
    assert a == make_id("gtzan", "blues.00000")
    assert check_id(a) == a and "." not in a
    # Names that clean to the same text still get different ids.
    assert make_id("fma", "a/b") != make_id("fma", "a_b")
    assert make_id("fma", "a b") != make_id("fma", "a.b")
    assert make_id("fma", 2) == "fma-2"  # clean names stay readable
    assert check_id(make_id("mtg_jamendo", "../../etc/passwd"))
    assert len(make_id("x", "y" * 500)) <= 200


def test_record_validation_names_the_field():
    base = {"id": "demo-1", "dataset": "demo", "split": "train", "audio_path": "/a.wav"}
    assert parse_record(base).id == "demo-1"
    with pytest.raises(InvalidRecord, match="split"):
        parse_record({**base, "split": "training"})
    with pytest.raises(InvalidRecord, match="end_s"):
        parse_record({**base, "start_s": 10, "end_s": 5})
    with pytest.raises(InvalidRecord, match="crop_policy 'given'"):
        parse_record({**base, "crop_policy": "given"})
    with pytest.raises(InvalidRecord, match="unexpected|extra"):
        parse_record({**base, "tempo": 120})
    with pytest.raises(InvalidRecord, match="task_families"):
        parse_record({**base, "task_families": ["understanding", "understanding"]})
    with pytest.raises(InvalidRecord, match="not a valid clip record: Expecting property name"):
        parse_record('{"id": "x", ')


def test_jsonl_round_trip_keeps_annotations_as_given(tmp_path):
    rec = ClipRecord(
        id="fma-2", dataset="fma", split="valid", audio_path="/d/000/000002.mp3",
        annotations={"genres": [21, 811], "title": "Food", "nested": {"é": 1.5}},
        task_families=["understanding", "reasoning"],
    )
    write_jsonl(tmp_path / "r.jsonl", [rec, rec.model_copy(update={"id": "fma-3"})])
    back = read_records(tmp_path / "r.jsonl")
    assert back[0] == rec and back[1].id == "fma-3"
    line = (tmp_path / "r.jsonl").read_text().splitlines()[0]
    assert "start_s" not in json.loads(line)  # unset fields are left out, not written as null


def test_read_records_names_the_bad_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a", "dataset": "demo", "split": "train", "audio_path": "x"}\n{"id": "b/"}\n')
    with pytest.raises(InvalidRecord, match="line 2"):
        read_records(p)
