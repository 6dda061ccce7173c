"""The training-dataset adapters (FMA, MTG-Jamendo, MagnaTagATune, MusicNet, MusicCaps,
YouTube8M-MusicTextClips), each on a tiny tree written in the dataset's real on-disk format."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from pipeline.ingest import DatasetLayoutError, get_adapter
from pipeline.ingest.common import find_audio, occurrence_ids, parse_literal_list
from pipeline.records import ClipRecord

UNDERSTAND = ["understanding", "reasoning"]


def write_csv(path: Path, rows: list[list], **fmt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, **fmt).writerows(rows)
    return path


def by_id(records: list[ClipRecord]) -> dict[str, ClipRecord]:
    return {r.id: r for r in records}


def skipped_line(caplog, dataset: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{dataset}: skipped")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# common helpers


def test_parse_literal_list_is_safe():
    assert parse_literal_list("[21, 811]") == [21, 811]
    assert parse_literal_list("['indie', 'lo-fi']") == ["indie", "lo-fi"]
    assert parse_literal_list("") == []
    for bad in ("__import__('os').system('true')", "[1, 2", "{'a': 1}", "42"):
        with pytest.raises(ValueError):
            parse_literal_list(bad)


def test_find_audio_prefers_an_existing_file(tmp_path):
    (tmp_path / "abc.mp3").write_bytes(b"")
    assert find_audio(tmp_path, "abc") == tmp_path / "abc.mp3"
    assert find_audio(tmp_path, "missing") == tmp_path / "missing.wav"
    (tmp_path / "abc.m4a").write_bytes(b"")  # soundfile cannot read it, so it is never chosen
    assert find_audio(tmp_path, "abc", (".wav", ".flac")) == tmp_path / "abc.wav"


def test_occurrence_ids_number_repeats():
    assert occurrence_ids("ds", ["a", "b", "a"]) == ["ds-a", "ds-b", "ds-a-2"]


# ---------------------------------------------------------------------------------------------
# FMA

FMA_COLUMNS = [
    ("album", c) for c in ("comments", "date_created", "date_released", "engineer", "favorites", "id",
                           "information", "listens", "producer", "tags", "title", "tracks", "type")
] + [
    ("artist", c) for c in ("active_year_begin", "active_year_end", "associated_labels", "bio", "comments",
                            "date_created", "favorites", "id", "latitude", "location", "longitude", "members",
                            "name", "related_projects", "tags", "website", "wikipedia_page")
] + [("set", "split"), ("set", "subset")] + [
    ("track", c) for c in ("bit_rate", "comments", "composer", "date_created", "date_recorded", "duration",
                           "favorites", "genre_top", "genres", "genres_all", "information", "interest",
                           "language_code", "license", "listens", "lyricist", "number", "publisher", "tags",
                           "title")
]

FMA_GENRES = [
    ["genre_id", "#tracks", "parent", "title", "top_level"],
    [12, 32923, 0, "Rock", 12],
    [21, 8389, 0, "Hip-Hop", 21],
    [25, 9261, 12, "Punk", 12],
    [811, 1479, 21, "Hip-Hop Beats", 21],
]


def fma_row(track_id, split, subset, **fields):
    values = {
        ("album", "tags"): "[]", ("artist", "tags"): "[]", ("track", "tags"): "[]",
        ("track", "genres"): "[]", ("track", "genres_all"): "[]",
        ("set", "split"): split, ("set", "subset"): subset,
    }
    for key, value in fields.items():
        group, name = key.split("__")
        values[(group, name)] = value
    return [track_id] + [values.get(col, "") for col in FMA_COLUMNS]


def make_fma(root: Path) -> Path:
    rows = [
        [""] + [g for g, _ in FMA_COLUMNS],
        [""] + [n for _, n in FMA_COLUMNS],
        ["track_id"] + [""] * len(FMA_COLUMNS),
        fma_row(2, "training", "small", album__title="AWOL - A Way Of Life", album__tags="[]",
                artist__name="AWOL", artist__latitude="40.0583238", artist__tags="['awol']",
                artist__bio="<p>A Way Of Life, A Way Of Thinking</p>\nsecond line",
                track__title="Food", track__duration="168", track__genre_top="Hip-Hop",
                track__genres="[21]", track__genres_all="[21]", track__tags="[]", track__listens="1293"),
        fma_row(5, "validation", "medium", track__title="This World", track__duration="206",
                track__genres="[21, 811]", track__genres_all="[21, 811]", track__tags="['lo-fi', 'beats']"),
        fma_row(10, "test", "large", track__title="Freeway", track__duration="161",
                track__genre_top="Rock", track__genres="[25]", track__genres_all="[12, 25]"),
        fma_row(20, "training", "small", track__title="Bad duration", track__duration="long"),
        fma_row(140, "training", "small", track__title="Bad genres", track__genres="[21"),
        fma_row("", "training", "small", track__title="No id"),
    ]
    write_csv(root / "fma_metadata" / "tracks.csv", rows)
    write_csv(root / "fma_metadata" / "genres.csv", FMA_GENRES)
    return root


def test_fma_reads_tracks_splits_and_annotations(tmp_path, caplog):
    root = make_fma(tmp_path / "fma")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("fma").prepare(root)
    assert [r.id for r in records] == ["fma-2", "fma-5", "fma-10"]
    rec = by_id(records)
    assert [rec[i].split for i in ("fma-2", "fma-5", "fma-10")] == ["train", "valid", "test"]
    assert rec["fma-2"].task_families == UNDERSTAND
    assert rec["fma-5"].task_families == UNDERSTAND
    assert rec["fma-10"].task_families == []
    assert rec["fma-2"].audio_path == str((root / "fma_large" / "000" / "000002.mp3").absolute())
    assert rec["fma-2"].crop_policy == "paper"
    assert rec["fma-2"].source_duration_s == 168

    a = rec["fma-2"].annotations
    assert a["track"]["title"] == "Food"
    assert a["track"]["genre_top"] == "Hip-Hop"
    assert a["track"]["genres"] == ["Hip-Hop"] and a["track"]["genre_ids"] == [21]
    assert a["track"]["listens"] == 1293 and a["track"]["duration"] == 168
    assert a["album"]["title"] == "AWOL - A Way Of Life"
    assert a["artist"]["name"] == "AWOL"
    assert a["artist"]["latitude"] == pytest.approx(40.0583238)
    assert a["artist"]["tags"] == ["awol"]
    assert a["artist"]["bio"].endswith("second line")  # a quoted field spanning two lines
    assert "composer" not in a["track"]  # empty fields are left out
    assert "set" not in a
    b = rec["fma-5"].annotations["track"]
    assert b["genres"] == ["Hip-Hop", "Hip-Hop Beats"] and b["genre_ids"] == [21, 811]
    assert b["tags"] == ["lo-fi", "beats"]
    assert rec["fma-10"].annotations["track"]["genres_all"] == ["Rock", "Punk"]

    line = skipped_line(caplog, "fma")
    assert "skipped 3 rows" in line and "without a track id" in line


def test_fma_subsets_nest(tmp_path):
    root = make_fma(tmp_path / "fma")
    prepare = get_adapter("fma").prepare
    assert [r.id for r in prepare(root, subset="small")] == ["fma-2"]
    medium = prepare(root, subset="medium")
    assert [r.id for r in medium] == ["fma-2", "fma-5"]
    assert medium[1].audio_path == str((root / "fma_medium" / "000" / "000005.mp3").absolute())
    assert [r.id for r in prepare(root, subset="full")] == ["fma-2", "fma-5", "fma-10"]
    with pytest.raises(ValueError, match="subset"):
        prepare(root, subset="tiny")


def test_fma_missing_or_malformed_metadata(tmp_path):
    root = make_fma(tmp_path / "fma")
    prepare = get_adapter("fma").prepare
    (root / "fma_metadata" / "genres.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="genres.csv"):
        prepare(root)
    write_csv(root / "fma_metadata" / "genres.csv", FMA_GENRES)
    write_csv(root / "fma_metadata" / "tracks.csv", [["track_id", "title"], [2, "Food"]])
    with pytest.raises(DatasetLayoutError, match="header"):
        prepare(root)
    (root / "fma_metadata" / "tracks.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"fma_metadata[/\\]tracks\.csv"):
        prepare(root)


# ---------------------------------------------------------------------------------------------
# MTG-Jamendo

MTG_HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"


def make_mtg(root: Path, n: int = 30) -> Path:
    lines = [MTG_HEADER]
    lines.append("track_0000214\tartist_000014\talbum_000031\t14/214.mp3\t124.6\tgenre---punkrock"
                 "\tinstrument---guitar\tmood/theme---energetic\tgenre---rock\n")
    for k in range(1, n):
        tid = 1000 + k
        lines.append(f"track_{tid:07d}\tartist_{k:06d}\talbum_{k:06d}\t{tid % 100:02d}/{tid}.mp3\t{60 + k}.0"
                     "\tgenre---pop\n")
    lines.append("track_0009998\tartist_000001\talbum_000001\t98/9998.mp3\tn/a\tgenre---pop\n")
    lines.append("track_0009999\tartist_000001\talbum_000001\n")
    path = root / "data" / "autotagging.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return root


def test_mtg_jamendo_reads_tags_and_paths(tmp_path, caplog):
    root = make_mtg(tmp_path / "mtg")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("mtg_jamendo").prepare(root, test_size=5, split_file=tmp_path / "ids.txt")
    assert len(records) == 30
    assert [r.id for r in records] == sorted(r.id for r in records)
    rec = by_id(records)["mtg_jamendo-track_0000214"]
    assert rec.audio_path == str((root / "audio" / "14" / "214.mp3").absolute())
    a = rec.annotations
    assert a["genres"] == ["punkrock", "rock"]
    assert a["instruments"] == ["guitar"]
    assert a["moods"] == ["energetic"]
    assert a["tags"] == ["genre---punkrock", "instrument---guitar", "mood/theme---energetic", "genre---rock"]
    assert a["duration"] == 124.6 and rec.source_duration_s == 124.6
    assert a["artist_id"] == "artist_000014" and a["album_id"] == "album_000031"
    line = skipped_line(caplog, "mtg_jamendo")
    assert "skipped 2 rows" in line and "duration" in line


def test_mtg_jamendo_test_split_is_fixed_and_reused(tmp_path):
    root = make_mtg(tmp_path / "mtg")
    prepare = get_adapter("mtg_jamendo").prepare
    split_file = tmp_path / "out" / "mtg_jamendo_test_ids.txt"
    records = prepare(root, test_size=7, seed=3, split_file=split_file)
    test = sorted(r.annotations["track_id"] for r in records if r.split == "test")
    assert len(test) == 7
    assert all(r.task_families == [] for r in records if r.split == "test")
    assert all(r.task_families == UNDERSTAND for r in records if r.split == "train")
    assert split_file.read_text().split() == test

    # The same seed draws the same ids without a file; another seed draws others.
    again = prepare(root, test_size=7, seed=3, split_file=tmp_path / "other.txt")
    assert sorted(r.annotations["track_id"] for r in again if r.split == "test") == test
    other = prepare(root, test_size=7, seed=4)
    assert sorted(r.annotations["track_id"] for r in other if r.split == "test") != test

    # An existing split file wins over test_size and seed.
    split_file.write_text("track_0000214\ntrack_0001001\n")
    reused = prepare(root, test_size=7, seed=3, split_file=split_file)
    assert sorted(r.annotations["track_id"] for r in reused if r.split == "test") == ["track_0000214", "track_0001001"]


def test_mtg_jamendo_missing_metadata(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"data[/\\]autotagging\.tsv"):
        get_adapter("mtg_jamendo").prepare(tmp_path)


def test_mtg_jamendo_through_the_ingest_command(tmp_path):
    from pipeline.ingest.run import ingest_dataset

    root = make_mtg(tmp_path / "mtg", n=6)
    audio = root / "audio" / "14" / "214.mp3"
    audio.parent.mkdir(parents=True)
    audio.write_bytes(b"")
    out = tmp_path / "out" / "mtg.jsonl"
    summary = ingest_dataset("mtg_jamendo", root, out, {"test_size": "2", "seed": "1"})
    assert summary.records == 1 and summary.missing_audio == 5
    assert len((tmp_path / "out" / "mtg_jamendo_test_ids.txt").read_text().split()) == 2


# ---------------------------------------------------------------------------------------------
# MagnaTagATune

MTAT_TAGS = ["no voice", "singer", "duet", "plucking", "hard rock", "guitar"]


def make_mtat(root: Path, clip_info: bool = True) -> Path:
    def row(clip_id, tags, path):
        return [clip_id] + [1 if t in tags else 0 for t in MTAT_TAGS] + [path]

    rows = [
        ["clip_id", *MTAT_TAGS, "mp3_path"],
        row(2, {"singer", "guitar"}, "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3"),
        row(6, {"no voice"}, "0/chicago_chamber_orchestra-mozart-02-allegro-88-117.mp3"),
        row(10, {"hard rock", "guitar"}, "c/jag-four_strings-05-tango-146-175.mp3"),
        row(12, set(), "b/mercy_machine-in_your_bed-07-broken-0-29.mp3"),
        row(14, {"duet"}, ""),
        ["x", *[0] * len(MTAT_TAGS), "1/track.mp3"],
        [16, 2, *[0] * (len(MTAT_TAGS) - 1), "2/track.mp3"],
    ]
    write_csv(root / "annotations_final.csv", rows, delimiter="\t", quoting=csv.QUOTE_ALL)
    if clip_info:
        info = [
            ["clip_id", "track_number", "title", "artist", "album", "url", "segmentStart", "segmentEnd",
             "original_url", "mp3_path"],
            [2, 1, "BWV54 - I Aria", "American Bach Soloists", "J.S. Bach Solo Cantatas",
             "http://www.magnatune.com/artists/albums/abs-bachcantatas/", 30, 59,
             "http://he3.magnatune.com/all/01--BWV54%20-%20I%20Aria--ABS.mp3",
             "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3"],
        ]
        write_csv(root / "clip_info_final.csv", info, delimiter="\t", quoting=csv.QUOTE_ALL)
    return root


def test_magnatagatune_tags_splits_and_clip_info(tmp_path, caplog):
    root = make_mtat(tmp_path / "mtat")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("magnatagatune").prepare(root)
    assert [r.id for r in records] == ["magnatagatune-2", "magnatagatune-6", "magnatagatune-10", "magnatagatune-12"]
    rec = by_id(records)
    assert {k: r.split for k, r in rec.items()} == {
        "magnatagatune-2": "test", "magnatagatune-6": "train", "magnatagatune-10": "valid", "magnatagatune-12": "train",
    }
    assert rec["magnatagatune-2"].task_families == []
    assert rec["magnatagatune-10"].task_families == UNDERSTAND
    assert rec["magnatagatune-6"].task_families == UNDERSTAND
    assert rec["magnatagatune-2"].annotations["tags"] == ["singer", "guitar"]
    assert rec["magnatagatune-12"].annotations["tags"] == []
    assert rec["magnatagatune-2"].annotations["title"] == "BWV54 - I Aria"
    assert rec["magnatagatune-2"].annotations["artist"] == "American Bach Soloists"
    assert "title" not in rec["magnatagatune-6"].annotations
    assert rec["magnatagatune-6"].audio_path == str(
        (root / "mp3" / "0" / "chicago_chamber_orchestra-mozart-02-allegro-88-117.mp3").absolute()
    )
    line = skipped_line(caplog, "magnatagatune")
    assert "skipped 3 rows" in line and "without an mp3 path" in line


def test_magnatagatune_without_clip_info_and_missing_annotations(tmp_path):
    root = make_mtat(tmp_path / "mtat", clip_info=False)
    records = get_adapter("magnatagatune").prepare(root, audio_dir=tmp_path / "clips")
    assert len(records) == 4
    assert records[0].audio_path.startswith(str((tmp_path / "clips").absolute()))
    (root / "annotations_final.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="annotations_final.csv"):
        get_adapter("magnatagatune").prepare(root)


# ---------------------------------------------------------------------------------------------
# MusicNet

SR = 44100
LABEL_HEADER = ["start_time", "end_time", "instrument", "note", "start_beat", "end_beat", "note_value"]


def make_musicnet(root: Path) -> Path:
    write_csv(root / "musicnet_metadata.csv", [
        ["id", "composer", "composition", "movement", "ensemble", "source", "transcriber", "catalog_name", "seconds"],
        [1727, "Schubert", "Piano Quintet in A major", "2. Andante", "Piano Quintet", "European Archive",
         "http://tirolmusic.blogspot.com/", "D667", 447],
        [2303, "Bach", "Prelude and Fugue in C major, BWV 846", "1. Prelude", "Solo Piano", "Paul Pitman",
         "Segundo G. Yogore", "WTCI", 122],
        [9999, "Nobody", "Lost", "1", "Solo Piano", "", "", "", 10],
        ["x", "Bad", "Row", "", "", "", "", "", 1],
    ])
    write_csv(root / "musicnet" / "train_labels" / "1727.csv", [
        LABEL_HEADER,
        [0, SR, 1, 60, 0.0, 1.0, "Quarter"],                           # 0-1 s piano, ends as the window starts
        [int(0.5 * SR), int(2.5 * SR), 41, 69, 0.5, 2.0, "Half"],      # 0.5-2.5 s violin
        [2 * SR, 5 * SR, 43, 48, 2.0, 3.0, "Dotted Half"],             # 2-5 s cello, runs past the window
        [3 * SR, 4 * SR, 43, 50, 3.0, 1.0, "Quarter"],                 # starts as the window ends
    ])
    write_csv(root / "musicnet" / "test_labels" / "2303.csv", [
        LABEL_HEADER, [9182, 90078, 1, 53, 4.0, 1.5, "Dotted Quarter"],
    ])
    return root


def test_musicnet_records_and_splits(tmp_path, caplog):
    root = make_musicnet(tmp_path / "mn")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("musicnet").prepare(root)
    assert [r.id for r in records] == ["musicnet-1727", "musicnet-1727-captioning", "musicnet-2303"]
    paper, captioning, test = records
    assert (paper.split, paper.crop_policy, paper.task_families) == ("train", "paper", UNDERSTAND)
    assert (captioning.split, captioning.crop_policy, captioning.task_families) == ("train", "all_windows", ["captioning"])
    assert (test.split, test.crop_policy, test.task_families) == ("test", "paper", [])
    assert paper.audio_path == str((root / "musicnet" / "train_data" / "1727.wav").absolute())
    assert test.audio_path == str((root / "musicnet" / "test_data" / "2303.wav").absolute())
    a = paper.annotations
    assert a["composer"] == "Schubert" and a["movement"] == "2. Andante" and a["seconds"] == 447
    assert a["instruments"] == ["cello", "piano", "violin"]
    assert a["note_count"] == 4
    assert a["labels_path"] == str((root / "musicnet" / "train_labels" / "1727.csv").absolute())
    assert captioning.annotations == a
    assert test.annotations["composition"] == "Prelude and Fugue in C major, BWV 846"
    assert test.annotations["instruments"] == ["piano"]
    assert paper.source_duration_s == 447
    line = skipped_line(caplog, "musicnet")
    assert "skipped 2 rows" in line and "without a labels file" in line


def test_musicnet_window_annotations(tmp_path):
    root = make_musicnet(tmp_path / "mn")
    adapter = get_adapter("musicnet")
    record = adapter.prepare(root)[0]
    got = adapter.window_annotations(record, 1.0, 3.0)
    assert got["instruments"] == ["cello", "violin"]
    assert got["notes"] == [
        {"start_s": 0.0, "end_s": 1.5, "instrument": "violin", "note": 69, "note_value": "Half",
         "start_beat": 0.5, "end_beat": 2.0},
        {"start_s": 1.0, "end_s": 2.0, "instrument": "cello", "note": 48, "note_value": "Dotted Half",
         "start_beat": 2.0, "end_beat": 3.0},
    ]
    assert adapter.window_annotations(record, 10.0, 35.0) == {"notes": [], "instruments": []}
    first = adapter.window_annotations(record, 0.0, 25.0)
    assert [n["note"] for n in first["notes"]] == [60, 69, 48, 50]
    assert first["notes"][-1]["start_s"] == 3.0 and first["notes"][-1]["end_s"] == 4.0


def test_musicnet_missing_files(tmp_path):
    prepare = get_adapter("musicnet").prepare
    with pytest.raises(DatasetLayoutError, match="labels"):
        prepare(tmp_path)
    root = make_musicnet(tmp_path / "mn")
    (root / "musicnet_metadata.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="musicnet_metadata.csv"):
        prepare(root)


# ---------------------------------------------------------------------------------------------
# MusicCaps

MUSICCAPS_HEADER = ["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list", "caption", "author_id",
                    "is_balanced_subset", "is_audioset_eval"]


def make_musiccaps(root: Path) -> Path:
    write_csv(root / "musiccaps-public.csv", [
        MUSICCAPS_HEADER,
        ["-0Gj8-vB1q4", 30, 40, "/m/0140xf,/m/02cjck,/m/04rlf",
         "['low quality', 'sustained strings melody', 'soft female vocal', 'sad']",
         "The low quality recording features a ballad song that contains sustained strings.", 4, "False", "True"],
        ["_IkLUOsNHAA", 0, 10, "/m/011k_j,/m/01kcd",
         "['classical/orchestra', 'cinematic', \"children's choir\"]",
         "In this piece a timpani takes a strong loud position.", 6, "True", "False"],
        ["badwindow01", "start", 10, "/m/04rlf", "['x']", "A caption.", 1, "False", "False"],
        ["badaspects1", 0, 10, "/m/04rlf", "not a list", "A caption.", 1, "False", "False"],
        ["../../etc/x", 0, 10, "/m/04rlf", "['x']", "A caption.", 1, "False", "False"],
    ])
    return root


def test_musiccaps_records(tmp_path, caplog):
    root = make_musiccaps(tmp_path / "mc")
    (root / "audio").mkdir()
    (root / "audio" / "_IkLUOsNHAA.flac").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("musiccaps").prepare(root)
    assert len(records) == 2
    ev, tr = records  # sorted by ytid: '-' sorts before '_'
    assert ev.annotations["ytid"] == "-0Gj8-vB1q4" and tr.annotations["ytid"] == "_IkLUOsNHAA"
    assert (ev.split, ev.task_families) == ("test", [])
    assert (tr.split, tr.task_families) == ("train", ["captioning"])
    assert (ev.crop_policy, ev.start_s, ev.end_s) == ("given", 30.0, 40.0)
    assert ev.annotations["aspect_list"] == ["low quality", "sustained strings melody", "soft female vocal", "sad"]
    assert tr.annotations["aspect_list"] == ["classical/orchestra", "cinematic", "children's choir"]
    assert ev.annotations["audioset_positive_labels"] == ["/m/0140xf", "/m/02cjck", "/m/04rlf"]
    assert ev.annotations["caption"].startswith("The low quality recording")
    assert ev.annotations["author_id"] == 4
    assert ev.annotations["is_balanced_subset"] is False and tr.annotations["is_balanced_subset"] is True
    assert tr.audio_path == str((root / "audio" / "_IkLUOsNHAA.flac").absolute())
    assert ev.audio_path == str((root / "audio" / "-0Gj8-vB1q4.wav").absolute())
    line = skipped_line(caplog, "musiccaps")
    assert "skipped 3 rows" in line and "window" in line


def test_musiccaps_missing_metadata(tmp_path):
    with pytest.raises(DatasetLayoutError, match="musiccaps-public.csv"):
        get_adapter("musiccaps").prepare(tmp_path)


# ---------------------------------------------------------------------------------------------
# YouTube8M-MusicTextClips


def make_yt8m(root: Path, test: bool = True) -> Path:
    write_csv(root / "train.csv", [
        ["video_id", "start", "end", "text"],
        ["Ab12Cd34Ef5", 115.0, 125.0, "An upbeat pop song with a female singer and synths."],
        ["Zz98Yy76Xx5", 60.5, 70.5, "Slow piano ballad, melancholic."],
        ["Bad_window1", 20.0, 10.0, "Backwards window."],
    ])
    if test:
        write_csv(root / "test.csv", [
            ["video_id", "start", "end", "text"],
            ["Mm11Nn22Oo3", 40.0, 50.0, "Heavy metal with distorted guitars and fast drums."],
            ["Ab12Cd34Ef5", 115.0, 125.0, "Catchy pop with a drum machine."],
        ])
    return root


def test_yt8m_musictextclips_records(tmp_path, caplog):
    root = make_yt8m(tmp_path / "yt")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("yt8m_musictextclips").prepare(root)
    assert [r.id for r in records] == [
        "yt8m_musictextclips-Ab12Cd34Ef5",
        "yt8m_musictextclips-Ab12Cd34Ef5-2",
        "yt8m_musictextclips-Mm11Nn22Oo3",
        "yt8m_musictextclips-Zz98Yy76Xx5",
    ]
    assert all(r.split == "train" and r.task_families == ["captioning"] and r.crop_policy == "given" for r in records)
    first, second, metal, ballad = records
    assert first.annotations == {"video_id": "Ab12Cd34Ef5", "original_split": "test",
                                 "caption": "Catchy pop with a drum machine."}
    assert second.annotations["original_split"] == "train"
    assert (ballad.start_s, ballad.end_s) == (60.5, 70.5)
    assert metal.audio_path == str((root / "audio" / "Mm11Nn22Oo3.wav").absolute())
    assert "skipped 1 rows" in skipped_line(caplog, "yt8m_musictextclips")


def test_yt8m_musictextclips_one_file_or_none(tmp_path):
    prepare = get_adapter("yt8m_musictextclips").prepare
    root = make_yt8m(tmp_path / "yt", test=False)
    assert len(prepare(root)) == 2
    with pytest.raises(DatasetLayoutError, match="train.csv"):
        prepare(tmp_path / "empty")
