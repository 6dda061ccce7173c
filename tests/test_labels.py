import json

import pytest

from pipeline.ingest import get_adapter, labels_of, with_labels
from pipeline.labels import Labels, normalise_key
from pipeline.records import ClipRecord, InvalidRecord, parse_record


@pytest.mark.parametrize("text, key", [
    ("Eb minor", "Eb minor"), ("eb minor", "Eb minor"), ("F#:min", "F# minor"), ("Am", "A minor"),
    ("C", "C major"), ("c# Minor", "C# minor"), ("B flat major", "Bb major"), ("G maj", "G major"),
])
def test_keys_are_normalised(text, key):
    assert normalise_key(text) == key


@pytest.mark.parametrize("text", ["H major", "minor", "Eb dorian", "12"])
def test_an_unknown_key_spelling_is_refused(text):
    with pytest.raises(ValueError):
        normalise_key(text)


def test_labels_validate_and_deduplicate():
    labels = Labels(genres=["rock", " rock", "pop"], tags=["a", "a"], key="d minor", tempo_bpm=120)
    assert labels.genres == ["rock", "pop"] and labels.tags == ["a"] and labels.key == "D minor"
    for bad in ({"tempo_bpm": 0}, {"beats_per_bar": 0}, {"complete": ["keys"]}, {"colour": "red"}):
        with pytest.raises(ValueError):
            Labels(**bad)


def test_lenient_labels_leave_out_only_the_bad_fields():
    labels = Labels.lenient(key="not a key", tempo_bpm=0, genre="jazz", tags=None)
    assert labels.to_dict() == {"genre": "jazz"}


def test_records_carry_labels_compactly_and_old_records_still_load():
    record = ClipRecord(id="a", dataset="x", split="train", audio_path="/a.wav", labels={"key": "eb minor"})
    assert json.loads(record.to_json())["labels"] == {"key": "Eb minor"}
    old = {"id": "b", "dataset": "x", "split": "train", "audio_path": "/b.wav", "annotations": {"genre": "rock"}}
    assert parse_record(old).labels is None
    assert "labels" not in json.loads(parse_record(old).to_json())
    with pytest.raises(InvalidRecord, match="labels"):
        parse_record({**old, "labels": {"tempo_bpm": -3}})


def test_records_written_before_labels_get_them_from_their_adapter():
    old = ClipRecord(id="gtzan-jazz-00001", dataset="gtzan", split="test", audio_path="/j.wav",
                     annotations={"genre": "jazz"})
    labels = labels_of(old)
    assert labels.genre == "jazz" and labels.vocabularies["genre"][:2] == ["blues", "classical"]
    assert labels_of(old.model_dump()) == labels  # a plain dict as read from JSONL
    unknown = ClipRecord(id="c", dataset="someone_elses", split="train", audio_path="/c.wav")
    assert labels_of(unknown).is_empty()


def test_cropping_narrows_the_labels_to_the_window():
    adapter = get_adapter("demo")
    record = ClipRecord(id="demo-1", dataset="demo", split="train", audio_path="/d.flac", annotations={
        "genre": "waltz", "tempo_bpm": 120.0, "key": "Db major", "beats_per_bar": 3, "instruments": ["piano"],
        "beats": [{"time": t, "beat_number": 1} for t in (1.0, 2.0, 31.0, 32.5)]})
    assert labels_of(record).beats is None  # the track's beats are not the clip's
    clip = record.model_copy(update={"annotations": {**record.annotations,
                                                     "in_clip": adapter.window_annotations(record, 30.0, 55.0)}})
    labels = with_labels(clip).labels
    assert labels["beats"] == [1.0, 2.5] and labels["key"] == "Db major" and labels["beats_per_bar"] == 3


def test_musicnet_and_medleydb_instruments_are_those_heard_in_the_clip():
    for dataset, field in (("musicnet", "instruments"), ("medleydb", "instrument_families")):
        record = ClipRecord(id=f"{dataset}-1", dataset=dataset, split="test", audio_path="/m.wav",
                            annotations={field: ["piano", "violin"], "in_clip": {field: ["violin"]}})
        labels = labels_of(record)
        assert labels.instruments == ["violin"] and "instruments" in labels.complete
        assert labels.instrument_vocabulary in ("musicnet", "general_midi")


def test_every_adapter_derives_labels_from_its_annotations():
    cases = {
        "giantsteps_key": ({"key": "eb minor", "key_mir_eval": "Eb minor", "genre": "techno"},
                           {"key": "Eb minor", "genres": ["techno"]}),
        "giantsteps_tempo": ({"tempo_bpm": 174.0}, {"tempo_bpm": 174.0}),
        "musiccaps": ({"caption": "A calm piano piece.", "aspect_list": ["piano", "calm"]},
                      {"caption": "A calm piano piece.", "tags": ["piano", "calm"]}),
        "yt8m_musictextclips": ({"caption": "Loud drums."}, {"caption": "Loud drums."}),
        "fma": ({"track": {"genre_top": "Rock", "genres": ["Rock", "Punk"], "tags": ["loud"], "language_code": "en"}},
                {"genre": "Rock", "genres": ["Rock", "Punk"], "tags": ["loud"], "lyrics_language": "en"}),
        "mtg_jamendo": ({"genres": ["pop"], "instruments": ["guitar"], "moods": ["happy"], "tags": ["genre---pop"]},
                        {"genres": ["pop"], "instruments": ["guitar"], "instrument_vocabulary": "mtg_jamendo",
                         "moods": ["happy"], "tags": ["genre---pop"]}),
        "magnatagatune": ({"tags": ["guitar", "slow"]}, {"tags": ["guitar", "slow"]}),
    }
    for dataset, (annotations, expected) in cases.items():
        record = ClipRecord(id=f"{dataset}-1", dataset=dataset, split="train", audio_path="/x.wav",
                            annotations=annotations)
        assert labels_of(record).to_dict() == expected, dataset
