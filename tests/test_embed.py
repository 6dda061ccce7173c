import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import llark.cli
from pipeline.embed import embed_stage, make_settings, prepare_embeddings_dir, to_output_dtype
from pipeline.encoders import jukebox as jb
from pipeline.encoders import read_manifest
from pipeline.records import ClipRecord, read_jsonl
from pipeline.runner import InlineExecutor, ItemError, LocalExecutor, StageConfigError, run_stage

SR = 44_100


def cli(argv, monkeypatch):
    return llark.cli.main(argv)


def write_clip(path, seconds, freq=220.0):
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, (0.4 * np.sin(2 * np.pi * freq * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2).astype(np.float32),
             SR, subtype="PCM_16")


@pytest.fixture
def clips(tmp_path):
    rows = []
    for k, seconds in enumerate([2.0, 3.05, 1.5]):
        wav = tmp_path / "wav" / f"c{k}.wav"
        wav.parent.mkdir(exist_ok=True)
        write_clip(wav, seconds, 200.0 + 100 * k)
        rows.append(ClipRecord(id=f"clip-{k}", dataset="fixture", split="train", audio_path=str(wav),
                               task_families=["understanding"], start_s=0.0, end_s=seconds,
                               clip_path=str(wav)).model_dump(mode="json", exclude_none=True))
    rows.append({**rows[0], "id": "gone", "clip_path": str(tmp_path / "wav" / "gone.wav")})
    rows.append({k: v for k, v in rows[1].items() if k != "clip_path"} | {"id": "uncropped"})
    path = tmp_path / "clips.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_features_embeddings_with_manifest_records_and_errors(tmp_path, clips):
    settings = make_settings("features", tmp_path / "emb")
    manifest = prepare_embeddings_dir(settings)
    summary = run_stage(embed_stage(settings), clips, tmp_path / "emb" / "embeddings.jsonl",
                        executor=InlineExecutor(), progress=False)
    assert (summary.done, summary.failed_total) == (3, 2)
    assert read_manifest(tmp_path / "emb") == manifest
    assert (manifest["name"], manifest["dim"], manifest["dtype"], manifest["frame_rate_hz"]) == ("features", 128, "float16", 10.0)
    records = read_jsonl(tmp_path / "emb" / "embeddings.jsonl")
    assert [r["id"] for r in records] == ["clip-0", "clip-1", "clip-2"]
    for record, frames in zip(records, [20, 31, 15]):
        array = np.load(record["embedding_path"], allow_pickle=False)
        assert array.shape == (frames, 128) == (record["frames"], record["dim"]) and array.dtype == np.float16
        assert record["embedding_path"] == str(tmp_path / "emb" / "fixture" / f"{record['id']}.npy")
    errors = {e["id"]: e["code"] for e in read_jsonl(tmp_path / "emb" / "embeddings.errors.jsonl")}
    assert errors == {"gone": "missing_file", "uncropped": "no_clip"}


def test_resume_skips_done_clips_and_workers_give_the_same_arrays(tmp_path, clips):
    settings = make_settings("features", tmp_path / "a")
    prepare_embeddings_dir(settings)
    run_stage(embed_stage(settings), clips, tmp_path / "a" / "embeddings.jsonl", executor=InlineExecutor(), progress=False)
    first = tmp_path / "a" / "fixture" / "clip-0.npy"
    stamp = first.stat().st_mtime_ns
    again = run_stage(embed_stage(settings), clips, tmp_path / "a" / "embeddings.jsonl",
                      executor=InlineExecutor(), progress=False, retry_failed=False)
    assert (again.done, again.skipped) == (0, 5) and first.stat().st_mtime_ns == stamp

    other = make_settings("features", tmp_path / "b")
    prepare_embeddings_dir(other)
    run_stage(embed_stage(other), clips, tmp_path / "b" / "embeddings.jsonl", executor=LocalExecutor(2), progress=False)
    for k in range(3):
        a = np.load(tmp_path / "a" / "fixture" / f"clip-{k}.npy")
        b = np.load(tmp_path / "b" / "fixture" / f"clip-{k}.npy")
        assert np.array_equal(a, b)


def test_a_directory_holding_another_encoder_configuration_is_refused(tmp_path):
    prepare_embeddings_dir(make_settings("features", tmp_path / "emb", dtype="float16"))
    with pytest.raises(StageConfigError, match="another encoder configuration.*dtype"):
        prepare_embeddings_dir(make_settings("features", tmp_path / "emb", dtype="float32"))


def test_values_float16_cannot_hold_are_an_error_not_inf():
    assert to_output_dtype(np.full((2, 3), 1000.0, np.float32), "float16").dtype == np.float16
    with pytest.raises(ItemError) as exc:
        to_output_dtype(np.full((2, 3), 1e6, np.float32), "float16")
    assert exc.value.code == "dtype_overflow"
    assert to_output_dtype(np.full((2, 3), 1e6, np.float32), "float32").max() == 1e6
    with pytest.raises(ItemError) as exc:
        to_output_dtype(np.array([[np.nan]], np.float32), "float32")
    assert exc.value.code == "non_finite_embedding"


def test_jukebox_embeddings_on_the_tiny_model(tmp_path, clips):
    weights = tmp_path / "weights"
    jb.write_random_weights(weights, jb.JUKEBOX_TINY)
    settings = make_settings("jukebox", tmp_path / "emb", options={
        "weights_dir": str(weights), "architecture": "tiny", "layer": 2})
    manifest = prepare_embeddings_dir(settings)
    assert (manifest["name"], manifest["layer"], manifest["dim"]) == ("jukebox", 2, 32)
    assert manifest["config"]["weights"][jb.PRIOR_FILE] == (weights / jb.PRIOR_FILE).stat().st_size
    assert {"torch", "jukebox-infer"} <= set(manifest["packages"])
    run_stage(embed_stage(settings), clips, tmp_path / "emb" / "embeddings.jsonl", executor=InlineExecutor(), progress=False)
    records = read_jsonl(tmp_path / "emb" / "embeddings.jsonl")
    assert [r["frames"] for r in records] == [20, 31, 15]
    array = np.load(records[1]["embedding_path"], allow_pickle=False)
    assert array.shape == (31, 32) and array.dtype == np.float16 and np.isfinite(array).all()


def test_embed_verb_and_its_configuration_errors(tmp_path, clips, monkeypatch, capsys):
    out = tmp_path / "emb"
    assert cli(["embed", str(clips), "--embeddings-dir", str(out), "--executor", "inline", "--no-progress"], monkeypatch) == 0
    assert len(read_jsonl(out / "embeddings.jsonl")) == 3 and (out / "encoder.json").is_file()
    assert cli(["embed", str(clips), "--embeddings-dir", str(out), "--executor", "inline", "--no-progress",
                "--strict"], monkeypatch) == 1  # two clips failed

    empty = tmp_path / "no-weights"
    empty.mkdir()
    fresh = tmp_path / "jukebox-emb"
    assert cli(["embed", str(clips), "--embeddings-dir", str(fresh), "--encoder", "jukebox",
                "--weights-dir", str(empty)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "--weights-dir" in err and "vqvae.pth.tar" in err and "prior_level_2.pth.tar" in err
    assert not fresh.exists()
    assert cli(["embed", str(clips), "--embeddings-dir", str(fresh), "--layer", "36"], monkeypatch) == 2
    assert "--layer" in capsys.readouterr().err and not fresh.exists()
    with pytest.raises(SystemExit):
        cli(["embed", str(clips), "--embeddings-dir", str(fresh), "--encoder", "beats"], monkeypatch)
    assert "invalid choice" in capsys.readouterr().err
    assert cli(["embed", str(clips), "--embeddings-dir", str(out), "--dtype", "float32"], monkeypatch) == 2
    assert "another encoder configuration" in capsys.readouterr().err


@pytest.fixture
def many_clips(tmp_path):
    """Seven clips of 1 to 4 s (3 to 11 windows of the tiny Jukebox's 0.37 s context), with two
    unreadable rows between them."""
    rows = []
    for k, seconds in enumerate([2.0, 1.2, 3.05, 1.0, 2.5, 1.5, 4.0]):
        wav = tmp_path / "wav" / f"m{k}.wav"
        wav.parent.mkdir(exist_ok=True)
        write_clip(wav, seconds, 150.0 + 70 * k)
        rows.append(ClipRecord(id=f"m-{k}", dataset="fixture", split="train", audio_path=str(wav),
                               task_families=["understanding"], start_s=0.0, end_s=seconds,
                               clip_path=str(wav)).model_dump(mode="json", exclude_none=True))
    rows.insert(2, {**rows[0], "id": "gone", "clip_path": str(tmp_path / "wav" / "gone.wav")})
    rows.insert(5, {k: v for k, v in rows[1].items() if k != "clip_path"} | {"id": "uncropped"})
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def embed_with(tmp_path, clips, name, encoder, options, batch_size, **run):
    settings = make_settings(encoder, tmp_path / name, options=options)
    prepare_embeddings_dir(settings)
    summary = run_stage(embed_stage(settings, batch_size=batch_size), clips, tmp_path / name / "embeddings.jsonl",
                        progress=False, **{"executor": InlineExecutor(), **run})
    return settings, summary


def assert_same_embeddings(a, b):
    records_a, records_b = read_jsonl(a / "embeddings.jsonl"), read_jsonl(b / "embeddings.jsonl")
    assert [r["id"] for r in records_a] == [r["id"] for r in records_b] and len(records_a) == 7
    for ra, rb in zip(records_a, records_b):
        path_a, path_b = Path(ra.pop("embedding_path")), Path(rb.pop("embedding_path"))
        assert ra == rb and path_a != path_b and path_a.read_bytes() == path_b.read_bytes()
    errors = lambda d: [(e["id"], e["code"]) for e in read_jsonl(d / "embeddings.errors.jsonl")]
    assert errors(a) == errors(b) == [("gone", "missing_file"), ("uncropped", "no_clip")]


def test_features_batch_4_gives_byte_identical_arrays(tmp_path, many_clips):
    embed_with(tmp_path, many_clips, "one", "features", {}, 1)
    _, summary = embed_with(tmp_path, many_clips, "four", "features", {}, 4, executor=LocalExecutor(2))
    assert (summary.done, summary.failed_total) == (7, 2)
    assert_same_embeddings(tmp_path / "one", tmp_path / "four")


def test_jukebox_batch_4_gives_byte_identical_arrays_and_resumes_across_batch_sizes(tmp_path, many_clips, monkeypatch):
    weights = tmp_path / "weights"
    jb.write_random_weights(weights, jb.JUKEBOX_TINY)
    options = {"weights_dir": str(weights), "architecture": "tiny", "layer": 3, "device": "cpu"}
    calls = []
    real = jb.JukeboxEncoder.encode_batch
    monkeypatch.setattr(jb.JukeboxEncoder, "encode_batch",
                        lambda self, clips: calls.append(len(clips)) or real(self, clips))
    embed_with(tmp_path, many_clips, "one", "jukebox", {**options, "batch_windows": 2}, 1)
    assert calls == [1] * 7
    calls.clear()
    _, summary = embed_with(tmp_path, many_clips, "four", "jukebox", {**options, "batch_windows": 8}, 4)
    assert sorted(calls) == [1, 3, 3] and summary.done == 7  # batches of 4 rows, one unreadable in two of them
    assert_same_embeddings(tmp_path / "one", tmp_path / "four")
    array = np.load(tmp_path / "four" / "fixture" / "m-6.npy", allow_pickle=False)
    assert array.shape == (40, 32) and np.abs(array).max() > 0

    # A run stopped part-way with batches of 4 resumes with batches of 2 and other --batch-windows.
    _, first = embed_with(tmp_path, many_clips, "resumed", "jukebox", {**options, "batch_windows": 8}, 4, limit=4)
    _, rest = embed_with(tmp_path, many_clips, "resumed", "jukebox", {**options, "batch_windows": 1}, 2)
    assert first.done + first.failed_total == 4 and rest.skipped == 3 and rest.done + first.done == 7
    assert_same_embeddings(tmp_path / "one", tmp_path / "resumed")


def test_embed_verb_batch_size(tmp_path, many_clips, monkeypatch, capsys):
    out = tmp_path / "emb"
    assert cli(["embed", str(many_clips), "--embeddings-dir", str(out), "--executor", "inline", "--no-progress",
                "--batch-size", "4"], monkeypatch) == 0
    embed_with(tmp_path, many_clips, "one", "features", {}, 1)
    assert_same_embeddings(tmp_path / "one", out)
    assert cli(["embed", str(many_clips), "--embeddings-dir", str(out), "--batch-size", "0"], monkeypatch) == 2
    assert "--batch-size" in capsys.readouterr().err
