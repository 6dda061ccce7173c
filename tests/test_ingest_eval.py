"""The evaluation-set adapters (GiantSteps Key/Tempo, GTZAN, MedleyDB) on tiny fake corpora built
in tmp_path with each dataset's real layout and annotation formats."""

from __future__ import annotations

import logging
from pathlib import Path

import mir_eval
import pytest
import yaml

from pipeline.ingest import DatasetLayoutError, get_adapter
from pipeline.ingest import giantsteps, gtzan, medleydb
from pipeline.records import check_id, parse_record


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llark" and r.levelno == logging.WARNING]


def _check_eval_record(record, dataset: str) -> None:
    assert record.dataset == dataset
    assert check_id(record.id) == record.id and "." not in record.id
    assert record.split == "test"
    assert record.task_families == []
    assert record.crop_policy == "paper"
    assert Path(record.audio_path).is_absolute()
    assert parse_record(record.to_json()) == record


# ---------------------------------------------------------------------------------------------
# GiantSteps Key


def _giantsteps_key(root: Path) -> Path:
    # Real files: annotations/key/{id}.LOFI.key holds e.g. "Bb minor" with no newline.
    for track, key in [("1234749", "Bb major"), ("981591", "Bb minor"), ("677299", "Gb major\n"),
                       ("3833050", "f# MINOR"), ("555", "- -"), ("556", "")]:
        _touch(root / "annotations" / "key" / f"{track}.LOFI.key", key)
    for track in ["1234749", "981591", "677299", "555", "556", "777"]:
        _touch(root / "audio" / f"{track}.LOFI.mp3")
    _touch(root / "annotations" / "genre" / "1234749.LOFI.genre", "progressive-house")
    return root


def test_giantsteps_key_records(tmp_path, caplog):
    root = _giantsteps_key(tmp_path / "giantsteps-key-dataset")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("giantsteps_key").prepare(root)
    by_id = {r.id: r for r in records}
    assert [r.id for r in records] == sorted(by_id)
    assert set(by_id) == {"giantsteps_key-1234749", "giantsteps_key-981591", "giantsteps_key-677299",
                          "giantsteps_key-3833050"}
    for record in records:
        _check_eval_record(record, "giantsteps_key")
        mir_eval.key.validate_key(record.annotations["key_mir_eval"])
    first = by_id["giantsteps_key-1234749"].annotations
    assert first == {"key": "Bb major", "key_mir_eval": "Bb major", "genre": "progressive-house"}
    assert by_id["giantsteps_key-677299"].annotations["key"] == "Gb major"
    assert by_id["giantsteps_key-3833050"].annotations["key_mir_eval"] == "F# minor"
    assert by_id["giantsteps_key-1234749"].audio_path == str((root / "audio" / "1234749.LOFI.mp3").resolve())
    # A label without audio still becomes a record; the ingest stage reports its audio missing.
    assert not Path(by_id["giantsteps_key-3833050"].audio_path).exists()
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "giantsteps_key" in warnings[0] and "3 tracks" in warnings[0]
    assert "2 with an unreadable key label" in warnings[0] and "1 without a key label" in warnings[0]


@pytest.mark.parametrize(
    "label, expected",
    [("Eb minor", "Eb minor"), ("c# MAJOR", "C# major"), ("BB Minor", "Bb minor"), ("Cb major", "B major"),
     ("  A major \n", "A major")],
)
def test_mir_eval_key_normalises(label, expected):
    assert giantsteps.mir_eval_key(label) == expected
    assert mir_eval.key.weighted_score(expected, giantsteps.mir_eval_key(label)) == 1.0


@pytest.mark.parametrize("label", ["H major", "Eb dorian", "Eb", "", "E#b minor", "minor Eb"])
def test_mir_eval_key_rejects(label):
    with pytest.raises(ValueError):
        giantsteps.mir_eval_key(label)


def test_giantsteps_key_missing_folder(tmp_path):
    _touch(tmp_path / "audio" / "1.LOFI.mp3")
    with pytest.raises(DatasetLayoutError, match=r"annotations/key"):
        giantsteps.prepare_key(tmp_path)


# ---------------------------------------------------------------------------------------------
# GiantSteps Tempo


def _giantsteps_tempo(root: Path) -> Path:
    v2 = {"1120171": "174.0", "1118326": "170.0\n", "3041381": "0.0", "3041383": "0.0", "999": "n/a"}
    v1 = {"1120171": "87.0", "1118326": "171.419", "3041381": "130", "3041383": "128", "999": "120"}
    for track, bpm in v2.items():
        _touch(root / "annotations_v2" / "tempo" / f"{track}.LOFI.bpm", bpm)
        _touch(root / "annotations_v2" / "mirex" / f"{track}.LOFI.mirex", f"{bpm}\t{bpm}\t1.0")
    for track, bpm in v1.items():
        _touch(root / "annotations" / "tempo" / f"{track}.LOFI.bpm", bpm)
        _touch(root / "audio" / f"{track}.LOFI.mp3")
    _touch(root / "annotations" / "genre" / "1120171.LOFI.genre", "drum-and-bass")
    return root


def test_giantsteps_tempo_v2_default_drops_zero_bpm(tmp_path, caplog):
    root = _giantsteps_tempo(tmp_path)
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("giantsteps_tempo").prepare(root)
    by_id = {r.id: r for r in records}
    assert list(by_id) == ["giantsteps_tempo-1118326", "giantsteps_tempo-1120171"]
    for record in records:
        _check_eval_record(record, "giantsteps_tempo")
    assert by_id["giantsteps_tempo-1120171"].annotations == {
        "tempo_bpm": 174.0, "tempo_labels": "v2", "genre": "drum-and-bass"}
    assert by_id["giantsteps_tempo-1118326"].annotations == {"tempo_bpm": 170.0, "tempo_labels": "v2"}
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "giantsteps_tempo" in warnings[0]
    assert "2 labelled 0 BPM" in warnings[0] and "1 with an unreadable v2 tempo label" in warnings[0]


def test_giantsteps_tempo_v1_labels(tmp_path, caplog):
    root = _giantsteps_tempo(tmp_path)
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = giantsteps.prepare_tempo(root, labels="v1")
    tempi = {r.id: r.annotations["tempo_bpm"] for r in records}
    assert tempi == {"giantsteps_tempo-1118326": 171.419, "giantsteps_tempo-1120171": 87.0,
                     "giantsteps_tempo-3041381": 130.0, "giantsteps_tempo-3041383": 128.0,
                     "giantsteps_tempo-999": 120.0}
    assert {r.annotations["tempo_labels"] for r in records} == {"v1"}
    assert _warnings(caplog) == []


def test_giantsteps_tempo_audio_without_label_is_counted(tmp_path, caplog):
    root = _giantsteps_tempo(tmp_path)
    _touch(root / "audio" / "4242.LOFI.mp3")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = giantsteps.prepare_tempo(root)
    assert "giantsteps_tempo-4242" not in {r.id for r in records}
    assert "1 without a v2 tempo label" in _warnings(caplog)[0]


def test_giantsteps_tempo_bad_options_and_layout(tmp_path):
    root = _giantsteps_tempo(tmp_path / "ok")
    with pytest.raises(DatasetLayoutError, match="labels must be"):
        giantsteps.prepare_tempo(root, labels="v3")
    _touch(tmp_path / "no_v2" / "audio" / "1.LOFI.mp3")
    with pytest.raises(DatasetLayoutError, match=r"annotations_v2/tempo"):
        giantsteps.prepare_tempo(tmp_path / "no_v2")
    _touch(tmp_path / "no_audio" / "annotations_v2" / "tempo" / "1.LOFI.bpm", "120")
    with pytest.raises(DatasetLayoutError, match=r"no_audio/audio"):
        giantsteps.prepare_tempo(tmp_path / "no_audio")


# ---------------------------------------------------------------------------------------------
# GTZAN


@pytest.mark.parametrize(
    "folder, ext", [("genres", ".au"), ("genres_original", ".wav"), ("Data/genres_original", ".wav")]
)
def test_gtzan_layouts(tmp_path, caplog, folder, ext):
    genres_dir = tmp_path / folder
    for genre in gtzan.GENRES:
        _touch(genres_dir / genre / f"{genre}.00000{ext}")
    _touch(genres_dir / "blues" / f"blues.00099{ext}")
    _touch(genres_dir / "blues" / f"rock.00003{ext}")  # not its folder's genre
    _touch(genres_dir / "jazz" / f"jazz.54{ext}")  # not five digits
    _touch(genres_dir / "pop" / "pop.00001.mp3")  # not this layout's extension
    _touch(genres_dir / "input.mf")  # the original release's file lists are not genre folders
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("gtzan").prepare(tmp_path)
    assert len(records) == 11
    for record in records:
        _check_eval_record(record, "gtzan")
        assert Path(record.audio_path).is_file()
    by_id = {r.id: r for r in records}
    assert [r.id for r in records] == sorted(by_id)
    assert by_id["gtzan-blues-00000"].annotations == {"genre": "blues"}
    assert by_id["gtzan-blues-00099"].audio_path == str((genres_dir / "blues" / f"blues.00099{ext}").resolve())
    assert by_id["gtzan-hiphop-00000"].annotations == {"genre": "hiphop"}
    assert {r.annotations["genre"] for r in records} == set(gtzan.GENRES)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "gtzan: skipped 3 files" in warnings[0]


def test_gtzan_missing_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"genres.*genres_original"):
        gtzan.prepare(tmp_path)
    (tmp_path / "genres").mkdir()
    with pytest.raises(DatasetLayoutError, match="blues"):
        gtzan.prepare(tmp_path)


def test_gtzan_missing_genre_folder_is_reported(tmp_path, caplog):
    _touch(tmp_path / "genres" / "rock" / "rock.00000.au")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = gtzan.prepare(tmp_path)
    assert [r.id for r in records] == ["gtzan-rock-00000"]
    assert "blues" in _warnings(caplog)[0]


# ---------------------------------------------------------------------------------------------
# MedleyDB

HOP_S = 2048 / 44100  # the activation files' frame step


def _metadata(artist: str, title: str, stems: dict[str, tuple]) -> str:
    """A METADATA.yaml in MedleyDB's own shape (quoted 'yes'/'no', stems with raw tracks)."""
    doc = {
        "album": "", "artist": artist, "composer": [artist], "excerpt": "no", "genre": "Singer/Songwriter",
        "has_bleed": "no", "instrumental": "no", "mix_filename": f"{artist}_{title}_MIX.wav",
        "origin": "Independent Artist", "title": title, "version": 1.2,
        "stems": {
            sid: {"component": component, "filename": f"STEM_{sid}.wav", "instrument": instrument,
                  "raw": {"R01": {"filename": f"RAW_{sid}_01.wav", "instrument": instrument}}}
            for sid, (instrument, component) in stems.items()
        },
    }
    return yaml.safe_dump(doc, sort_keys=True)


def _activation_csv(n_frames: int, active: dict[str, list[tuple[float, float]]], columns: list[str]) -> str:
    """An ACTIVATION_CONF.lab: header ``time,S01,...``, one row per 2048-sample hop, 4 decimals;
    a stem is at 0.9 inside its intervals and 0.05 elsewhere (0.5 exactly at an interval's start)."""
    lines = ["time," + ",".join(columns)]
    for k in range(n_frames):
        t = k * HOP_S
        values = []
        for stem in columns:
            spans = active.get(stem, [])
            if any(abs(t - a) < HOP_S / 2 for a, _ in spans):
                values.append(0.5)
            else:
                values.append(0.9 if any(a <= t < b for a, b in spans) else 0.05)
        lines.append(f"{t:.4f}," + ",".join(f"{v:.4f}" for v in values))
    return "\n".join(lines) + "\n"


STEMS = {
    "S01": ("drum set", ""),
    "S02": ("kick drum", ""),
    "S03": ("electric bass", "bass"),
    "S04": ("male singer", "melody"),
    "S05": (["female singer", "vocalists"], ""),
    "S06": ("synthesizer", "melody"),
    "S07": ("yangqin", ""),
    "S08": ("kazoo", ""),
    "S09": ("mandolin", ""),
}


def _medleydb(root: Path) -> Path:
    # Track 1: the release layout (metadata beside the mix, activations under Instrument_Activations).
    track = "LizNelson_Rainfall"
    _touch(root / "Audio" / track / f"{track}_MIX.wav")
    _touch(root / "Audio" / track / f"{track}_METADATA.yaml", _metadata("Liz Nelson", "Rainfall", STEMS))
    activations = {
        "S01": [(0.0, 5.0)], "S02": [(0.0, 5.0)], "S03": [(0.0, 30.0)], "S04": [(10.0, 12.0)],
        "S05": [(20.0, 21.0)], "S06": [(25.0, 26.0)], "S09": [(15.0, 16.0)],
    }
    _touch(root / "Annotations" / "Instrument_Activations" / "ACTIVATION_CONF" / f"{track}_ACTIVATION_CONF.lab",
           _activation_csv(int(30 / HOP_S), activations, list(STEMS)))
    # Track 2: metadata in Metadata/, no activation file.
    track = "MusicDelta_Beatles"
    _touch(root / "Audio" / track / f"{track}_MIX.wav")
    _touch(root / "Metadata" / f"{track}_METADATA.yaml",
           _metadata("MusicDelta", "Beatles", {"S01": ("piano", ""), "S02": ("violin section", "")}))
    # Track 3: the medleydb package's annotation folder, with a stem missing from the activations.
    track = "AimeeNorwich_Child"
    _touch(root / "Audio" / track / f"{track}_MIX.wav")
    _touch(root / "Metadata" / f"{track}_METADATA.yaml",
           _metadata("Aimee Norwich", "Child", {"S01": ("acoustic guitar", ""), "S02": ("flute", "melody")}))
    _touch(root / "Annotations" / f"{track}_ANNOTATIONS" / f"{track}_ACTIVATION_CONF.lab",
           _activation_csv(int(10 / HOP_S), {"S01": [(0.0, 2.0)]}, ["S01"]))
    # Tracks 4 and 5: no metadata, broken metadata.
    _touch(root / "Audio" / "Nobody_NoMeta" / "Nobody_NoMeta_MIX.wav")
    _touch(root / "Audio" / "Broken_Yaml" / "Broken_Yaml_MIX.wav")
    _touch(root / "Audio" / "Broken_Yaml" / "Broken_Yaml_METADATA.yaml", "stems: [unclosed\n")
    return root


@pytest.fixture
def medleydb_records(tmp_path, caplog):
    root = _medleydb(tmp_path / "MedleyDB")
    with caplog.at_level(logging.WARNING, logger="llark"):
        records = get_adapter("medleydb").prepare(root)
    return {r.id: r for r in records}, _warnings(caplog), root


def test_medleydb_records_and_families(medleydb_records):
    by_id, _, root = medleydb_records
    assert list(by_id) == ["medleydb-AimeeNorwich_Child", "medleydb-LizNelson_Rainfall",
                           "medleydb-MusicDelta_Beatles"]
    for record in by_id.values():
        _check_eval_record(record, "medleydb")
    rain = by_id["medleydb-LizNelson_Rainfall"]
    assert rain.audio_path == str((root / "Audio" / "LizNelson_Rainfall" / "LizNelson_Rainfall_MIX.wav").resolve())
    ann = rain.annotations
    assert (ann["artist"], ann["title"], ann["genre"], ann["instrumental"]) == (
        "Liz Nelson", "Rainfall", "Singer/Songwriter", False)
    # Drum set and kick drum are one instrument; the singers are vocals, apart from the rest.
    assert ann["instrument_families"] == ["bass", "drums", "guitar", "synth lead", "vocals"]
    stems = ann["stems"]
    assert stems["S01"] == {"instrument": "drum set", "family": "drums", "families": ["drums"], "component": ""}
    assert stems["S02"]["family"] == "drums"
    assert stems["S03"]["family"] == "bass"
    assert stems["S04"]["family"] == "vocals" and stems["S04"]["component"] == "melody"
    assert stems["S05"]["instrument"] == ["female singer", "vocalists"] and stems["S05"]["families"] == ["vocals"]
    assert stems["S06"]["family"] == "synth lead"
    assert stems["S07"]["family"] is None  # no General MIDI program: ignored, as the paper does
    assert stems["S08"] == {"instrument": "kazoo", "family": None, "families": [], "component": ""}
    assert stems["S09"]["family"] == "guitar"  # guitar-like, as the paper maps mandolin
    assert ann["activation_path"].endswith("ACTIVATION_CONF/LizNelson_Rainfall_ACTIVATION_CONF.lab")
    beatles = by_id["medleydb-MusicDelta_Beatles"].annotations
    assert beatles["instrument_families"] == ["ensemble", "piano"]
    assert "activation_path" not in beatles
    assert by_id["medleydb-AimeeNorwich_Child"].annotations["activation_path"].endswith(
        "AimeeNorwich_Child_ANNOTATIONS/AimeeNorwich_Child_ACTIVATION_CONF.lab")


def test_medleydb_warnings(medleydb_records):
    _, warnings, _ = medleydb_records
    skipped = [w for w in warnings if "skipped" in w]
    assert len(skipped) == 1
    assert "2 tracks" in skipped[0] and "1 without a METADATA.yaml" in skipped[0]
    assert "1 with an unreadable METADATA.yaml" in skipped[0]
    unmapped = [w for w in warnings if "General MIDI" in w]
    assert len(unmapped) == 1 and "kazoo" in unmapped[0] and "yangqin" not in unmapped[0]


@pytest.mark.parametrize(
    "start, end, expected",
    [
        (0.0, 5.0, ["bass", "drums"]),
        (5.5, 9.5, ["bass"]),
        (9.0, 13.0, ["bass", "vocals"]),
        (14.9, 16.5, ["bass", "guitar"]),
        (19.0, 22.0, ["bass", "vocals"]),
        (24.0, 29.0, ["bass", "synth lead"]),
    ],
)
def test_medleydb_window_annotations_follow_activations(medleydb_records, start, end, expected):
    by_id, _, _ = medleydb_records
    adapter = get_adapter("medleydb")
    assert adapter.window_annotations is medleydb.window_annotations
    got = adapter.window_annotations(by_id["medleydb-LizNelson_Rainfall"], start, end)
    assert got == {"instrument_families": expected}


def test_medleydb_window_is_half_open_and_threshold_inclusive(medleydb_records):
    by_id, _, _ = medleydb_records
    record = by_id["medleydb-LizNelson_Rainfall"]
    # The vocals reach exactly 0.5 at the frame nearest 10 s (its time as written in the file).
    frame_10 = float(f"{round(10.0 / HOP_S) * HOP_S:.4f}")
    assert "vocals" in medleydb.window_annotations(record, frame_10, frame_10 + 0.01)["instrument_families"]
    assert "vocals" not in medleydb.window_annotations(record, 6.0, frame_10)["instrument_families"]


def test_medleydb_window_fallbacks(medleydb_records):
    by_id, _, _ = medleydb_records
    # No activation file: the track's own families, whatever the window.
    beatles = by_id["medleydb-MusicDelta_Beatles"]
    assert medleydb.window_annotations(beatles, 100.0, 125.0) == {"instrument_families": ["ensemble", "piano"]}
    # A stem with no column in the activation file counts as active.
    child = by_id["medleydb-AimeeNorwich_Child"]
    assert medleydb.window_annotations(child, 0.0, 1.0) == {"instrument_families": ["guitar", "pipe"]}
    assert medleydb.window_annotations(child, 5.0, 8.0) == {"instrument_families": ["pipe"]}


def test_medleydb_family_table():
    assert medleydb.instrument_family("Drum Set") == "drums"
    assert medleydb.instrument_family("drum machine") == "drums"
    assert medleydb.instrument_family("female rapper") == "vocals"
    assert medleydb.instrument_family("lap steel guitar") == "guitar"
    assert medleydb.instrument_family("synthesizer", "bass") == "bass"
    assert medleydb.instrument_family("synthesizer") == "synth pad"
    assert medleydb.instrument_family("guzheng") is None
    assert medleydb.instrument_family("Main System") is None
    families = {f for f in medleydb.GM_FAMILY.values() if f is not None}
    assert families <= {"piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble",
                        "brass", "reed", "pipe", "synth lead", "synth pad", "synth effects", "ethnic",
                        "percussive", "sound effects", "drums", "vocals"}


def test_medleydb_missing_audio_folder(tmp_path):
    _touch(tmp_path / "Metadata" / "A_B_METADATA.yaml", _metadata("A", "B", {"S01": ("piano", "")}))
    with pytest.raises(DatasetLayoutError, match=r"Audio"):
        medleydb.prepare(tmp_path)
