"""``llark evaluate`` over an evaluation set: items from clip records and embeddings, the
shuffled-audio control, resume, predictions, summary, report and confusion matrices; the
command on a tiny exported model; the task registry (references, labels, a task added by a test)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llark.evaluate import run as eval_run
from llark.evaluate import stats, tasks
from llark.evaluate.report import confusion, summary_table

KEYS = ["C major", "A minor", "Eb major", "F# minor", "G major", "D minor"]
TEMPI = [120.0, 90.0, 75.0, 140.0, 100.0, 132.0]
METRES = [4, 3, 4, 3, 4, 3]
GENRES = ["rock", "waltz", "ballad", "folk", "electronic", "waltz"]
INSTRUMENTS = [["bass", "drums", "guitar"], ["piano", "strings"], ["piano", "bass"], ["guitar", "drums"],
               ["synth_pad", "drums"], ["organ"]]
DIM = 16


def _manifest(dim: int = DIM) -> dict:
    return {"manifest_version": 1, "name": "features", "layer": None, "frame_rate_hz": 10.0, "dim": dim,
            "dtype": "float16", "config": {"fixture": True}, "packages": {}}


def make_eval_set(root: Path, n: int = 6) -> tuple[Path, Path]:
    from pipeline.records import ClipRecord

    clips, emb = root / "clips.jsonl", root / "embeddings"
    (emb / "demo").mkdir(parents=True)
    (emb / "encoder.json").write_text(json.dumps(_manifest()))
    lines, index = [], []
    for i in range(n):
        cid = f"demo-{i:05d}"
        beats = [{"time": round(0.5 * b, 3), "beat_number": b % METRES[i] + 1} for b in range(1, 9)]
        record = ClipRecord(id=cid, dataset="demo", split="test" if i % 2 else "valid", audio_path=f"/x/{cid}.flac",
                            clip_path=f"/x/{cid}.wav", start_s=0.0, end_s=15.0, annotations={
                                "key": KEYS[i], "tempo_bpm": TEMPI[i], "beats_per_bar": METRES[i],
                                "genre": GENRES[i], "instruments": INSTRUMENTS[i], "in_clip": {"beats": beats}})
        lines.append(record.to_json())
        path = emb / "demo" / f"{cid}.npy"
        np.save(path, np.full((5, DIM), i, dtype=np.float16), allow_pickle=False)
        index.append(json.dumps({"id": cid, "dataset": "demo", "split": record.split, "embedding_path": str(path),
                                 "frames": 5, "dim": DIM, "dtype": "float16", "encoder": "features"}))
    # A clip with no embedding is left out, and a training clip is not asked about with --split.
    lines.append(ClipRecord(id="demo-99999", dataset="demo", split="test", audio_path="/x/y.flac",
                            annotations={"key": "C major"}).to_json())
    clips.write_text("\n".join(lines) + "\n")
    (emb / "embeddings.jsonl").write_text("\n".join(index) + "\n")
    return clips, emb


class OracleModel:
    """Answers from the audio: the clip index is the embedding's value, the answer that clip's truth."""

    source = "oracle"
    encoder_identity = {k: v for k, v in _manifest().items() if k not in ("manifest_version", "packages")}
    encoder_dim = DIM
    audio_states = None

    def __init__(self):
        self.calls = 0

    def answer(self, questions, audios, settings=None):
        self.calls += len(questions)
        out = []
        for q, a in zip(questions, audios):
            i = int(round(float(a[0, 0])))
            if "key" in q:
                out.append(f"It is in {KEYS[i]}.")
            elif "tempo" in q:
                out.append(f"About {TEMPI[i]:g} BPM.")
            elif "time signature" in q:
                out.append(f"It is in {METRES[i]}/4.")
            elif "genre" in q:
                out.append(f"This is {GENRES[i]}.")
            elif "instruments" in q:
                out.append("I hear " + " and ".join(x.replace("_", " ") for x in INSTRUMENTS[i]) + ".")
            else:
                out.append(", ".join(f"{0.5 * b:.2f}s" for b in range(1, 9)))
        return out


def bag_of_words(texts):
    vocabulary = ["rock", "waltz", "ballad", "folk", "electronic"]
    out = np.array([[t.lower().count(v) for v in vocabulary] for t in texts], dtype=float) + 1e-3
    return out / np.linalg.norm(out, axis=1, keepdims=True)


TASKS = ["key", "tempo", "metre", "genre", "instruments", "beats"]


def test_build_items(tmp_path):
    clips, emb = make_eval_set(tmp_path)
    items = eval_run.build_items(clips, emb, ["key", "tempo"], splits=["valid", "test"])
    assert len(items) == 12  # 6 clips with embeddings x 2 tasks; demo-99999 has none
    assert {i.question for i in items} == {tasks.get("key").prompt, tasks.get("tempo").prompt}
    assert items[0].reference == "C major" and items[1].reference == 120.0
    assert len(eval_run.build_items(clips, emb, ["key"], splits=["valid"])) == 3
    with pytest.raises(eval_run.EvalConfigError, match="unknown tasks"):
        eval_run.build_items(clips, emb, ["loudness"])
    with pytest.raises(eval_run.EvalConfigError, match="has a reference"):
        eval_run.build_items(clips, emb, ["captions"])


def test_derangement_moves_every_clip():
    for seed in range(20):
        p = eval_run.derangement(7, seed)
        assert sorted(p.tolist()) == list(range(7)) and not (p == np.arange(7)).any()
    assert eval_run.derangement(5, 3).tolist() == eval_run.derangement(5, 3).tolist()


def test_evaluate_real_and_shuffled(tmp_path):
    clips, emb = make_eval_set(tmp_path)
    out = tmp_path / "eval"
    model = OracleModel()
    summary = eval_run.evaluate(model, clips, emb, out, TASKS, splits=["valid", "test"], shuffle_control=True,
                                batch_size=4, embed=bag_of_words)
    real, shuffled = summary["conditions"]["real"], summary["conditions"]["shuffled"]
    assert real["key/demo"]["mirex"]["value"] == 1.0
    assert real["tempo/demo"]["acc2"]["value"] == 1.0
    assert real["metre/demo"]["accuracy"]["value"] == 1.0
    assert real["genre/demo"]["acc1_embedding"]["value"] == 1.0 and real["genre/demo"]["acc_strict"]["value"] == 1.0
    assert real["instruments/demo"]["f1"]["value"] == 1.0
    assert real["beats/demo"]["f_measure"]["value"] == 1.0
    # Every clip hears another clip's audio, and these six keys are all different.
    assert shuffled["key/demo"]["accuracy"]["value"] == 0.0
    assert shuffled["key/demo"]["mirex"]["value"] < 0.5
    assert model.calls == 2 * 6 * len(TASKS)

    predictions = [json.loads(x) for x in (out / "predictions.shuffled.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 * len(TASKS)
    assert all(p["audio_from"] != p["clip_id"] and p["audio"] == "shuffled" for p in predictions)
    row = next(p for p in (json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines())
               if p["task"] == "key" and p["clip_id"] == "demo-00003")
    assert row["question"] == "What is the key of this song?" and row["reference"] == "F# minor"
    assert row["parsed"] == "F# minor" and row["score"] == 1.0 and row["unparseable"] is False

    report = (out / "report.md").read_text()
    assert "| key | demo | mirex | 1.000 [" in report and "shuffled audio" in report
    for name in ("confusion_key_demo_real.png", "confusion_genre_demo_shuffled.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["conditions"]["real"]["key/demo"]["n"] == 6

    # A rerun with the same settings resumes: nothing is asked again.
    again = OracleModel()
    eval_run.evaluate(again, clips, emb, out, TASKS, splits=["valid", "test"], shuffle_control=True, batch_size=4,
                      embed=bag_of_words)
    assert again.calls == 0
    with pytest.raises(eval_run.EvalConfigError, match="other settings"):
        eval_run.evaluate(again, clips, emb, out, ["key"], splits=["valid", "test"], embed=bag_of_words)


def test_resume_after_a_killed_run(tmp_path):
    clips, emb = make_eval_set(tmp_path)
    out = tmp_path / "eval"
    eval_run.evaluate(OracleModel(), clips, emb, out, ["key"], embed=bag_of_words)
    generations = out / "generations.jsonl"
    lines = generations.read_text().splitlines(keepends=True)
    generations.write_text("".join(lines[:4]) + lines[4][:25])  # two answers lost, one cut in half
    again = OracleModel()
    summary = eval_run.evaluate(again, clips, emb, out, ["key"], embed=bag_of_words)
    assert again.calls == 2
    assert summary["conditions"]["real"]["key/demo"]["mirex"]["value"] == 1.0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6


def test_unparseable_answers_count_as_wrong(tmp_path):
    clips, emb = make_eval_set(tmp_path)

    class Mumbler(OracleModel):
        def answer(self, questions, audios, settings=None):
            return ["I could not say." for _ in questions]

    summary = eval_run.evaluate(Mumbler(), clips, emb, tmp_path / "eval", ["key", "tempo"], embed=bag_of_words)
    real = summary["conditions"]["real"]
    assert real["key/demo"]["unparseable"] == 6 and real["key/demo"]["mirex"]["value"] == 0.0
    assert real["tempo/demo"]["acc2"]["value"] == 0.0 and real["tempo/demo"]["acc2"]["high"] > 0
    assert "| 6 | 6 |" in summary_table(summary)


def test_embeddings_of_another_encoder_are_refused(tmp_path):
    clips, emb = make_eval_set(tmp_path)
    model = OracleModel()
    model.encoder_identity = {**model.encoder_identity, "config": {"fixture": False}}
    with pytest.raises(eval_run.EvalConfigError, match="another encoder"):
        eval_run.evaluate(model, clips, emb, tmp_path / "eval", ["key"], embed=bag_of_words)


def test_confusion_matrix():
    m = confusion(["a", "a", "b"], ["a", None, "c"], ["a", "b"])
    assert m.tolist() == [[1, 0, 1], [0, 0, 1]]


def test_evaluate_command_on_a_tiny_model(tmp_path, capsys):
    """The command end to end: a tiny random model answers (nonsense), everything is written."""
    from test_ask import FEATURES_DIM, export_tiny_model, features_identity

    from llark.commands import evaluate as evaluate_command

    clips, emb = make_eval_set(tmp_path)
    manifest = {**features_identity(), "manifest_version": 1, "packages": {}}
    (emb / "encoder.json").write_text(json.dumps(manifest))
    for i in range(6):
        np.save(emb / "demo" / f"demo-{i:05d}.npy", np.full((4, FEATURES_DIM), i, dtype=np.float16))
    model = export_tiny_model(tmp_path / "final")
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers())
    out = tmp_path / "eval"
    args = parser.parse_args(["evaluate", str(model), "--clips", str(clips), "--embeddings", str(emb), "--out",
                              str(out), "--tasks", "key,tempo,metre", "--split", "valid,test", "--shuffle-control",
                              "--max-new-tokens", "key=4", "--max-new-tokens", "tempo=4", "--max-new-tokens",
                              "metre=4", "--limit", "4"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| key | demo | mirex |" in printed and "report:" in printed
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["task"] for r in rows} == {"key", "tempo", "metre"}
    assert all(set(r) >= {"question", "reference", "answer", "parsed", "score", "unparseable"} for r in rows)
    args = parser.parse_args(["evaluate", "--out", str(out), "--rescore"])
    assert args.func(args) == 0


@pytest.mark.parametrize("task, dataset, annotations, expected", [
    ("key", "giantsteps_key", {"key": "eb MINOR", "key_mir_eval": "Eb minor"}, "Eb minor"),
    ("tempo", "giantsteps_tempo", {"tempo_bpm": 174.0, "tempo_labels": "v2"}, 174.0),
    ("genre", "gtzan", {"genre": "hiphop"}, "hiphop"),
    ("instruments", "medleydb", {"instrument_families": ["drums", "piano", "vocals"],
                                 "in_clip": {"instrument_families": ["piano"]}}, ["piano"]),
    ("instruments", "medleydb", {"instrument_families": ["drums", "vocals"]}, ["drums", "vocals"]),
    ("instruments", "musicnet", {"instruments": ["cello", "piano", "violin"],
                                 "in_clip": {"instruments": ["violin", "piano"], "notes": []}}, ["piano", "violin"]),
    ("captions", "musiccaps", {"caption": "A calm piano piece."}, ["A calm piano piece."]),
    ("metre", "demo", {"beats_per_bar": 3}, 3),
    ("beats", "demo", {"in_clip": {"beats": [{"time": 0.25, "beat_number": 1}]}}, [0.25]),
    ("key", "gtzan", {"genre": "rock"}, None),  # GTZAN has no key labels
    ("tempo", "giantsteps_tempo", {"tempo_bpm": 0}, None),
])
def test_references_of_ingested_datasets(task, dataset, annotations, expected):
    from pipeline.records import ClipRecord

    record = ClipRecord(id="clip", dataset=dataset, split="test", audio_path="/x/clip.wav", annotations=annotations)
    assert tasks.get(task).reference(record) == expected


def test_labels_come_before_annotations():
    record = SimpleNamespace(dataset="somewhere", annotations={"key": "C major"},
                             labels={"key": "Eb  minor", "tempo_bpm": 96, "genre": "Jazz",
                                     "vocabularies": {"genre": ["Jazz", "Rock"]}})
    assert tasks.get("key").reference(record) == "Eb minor"
    assert tasks.get("tempo").reference(record) == 96.0
    assert tasks.get("metre").reference(record) is None
    assert tasks.get("genre").vocabulary(record) == ["Jazz", "Rock"]
    rows = [{"item": "a:genre", "clip_id": "a", "dataset": "somewhere", "task": "genre", "reference": "Jazz",
             "answer": "Smooth jazz."}]
    _, metrics, notes = eval_run.score_rows(rows, bag_of_words, {"genre/somewhere": ["Jazz", "Rock"]})
    assert metrics["genre/somewhere"]["labels"] == ["Jazz", "Rock"]
    assert notes == {"genre_embedding_model": "bag_of_words"}


# ---------------------------------------------------------------------------------------------
# A task added by one file: registered here, it runs through the whole driver.


def _pace(record):
    bpm = record.annotations.get("tempo_bpm")
    return None if bpm is None else ("fast" if bpm >= 100 else "slow")


def _score_pace(rows, context):
    refs, parsed = tasks.columns(rows)
    correct = [r == p for r, p in zip(refs, parsed)]
    return [{"score": float(c)} for c in correct], {"accuracy": stats.accuracy(correct)}


PACE = tasks.Task(name="pace", prompt="Is this song fast or slow?", reference=_pace,
                  parse=tasks.each(lambda a: next((w for w in ("fast", "slow") if w in a.lower()), None)),
                  score=_score_pace, headline=("accuracy",), max_new_tokens=8)


@pytest.fixture
def pace_task():
    tasks.register(PACE)
    yield PACE
    del tasks.REGISTRY[PACE.name]


def test_a_registered_task_runs_through_the_driver(tmp_path, pace_task):
    clips, emb = make_eval_set(tmp_path)

    class Pacer(OracleModel):
        def answer(self, questions, audios, settings=None):
            assert settings.max_new_tokens == 8
            return ["Rather fast." if TEMPI[int(round(float(a[0, 0])))] >= 100 else "Slow." for a in audios]

    assert "pace" in tasks.names() and tasks.names()[0] == "key"
    out = tmp_path / "eval"
    summary = eval_run.evaluate(Pacer(), clips, emb, out, ["pace"], embed=bag_of_words)
    real = summary["conditions"]["real"]["pace/demo"]
    assert real["accuracy"]["value"] == 1.0 and real["n"] == 6 and real["distinct_parsed"] == 2
    assert json.loads((out / "run.json").read_text())["max_new_tokens"]["pace"] == 8
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["parsed"] for r in rows} == {"fast", "slow"} and all(r["score"] == 1.0 for r in rows)
    assert "| pace | demo | accuracy | 1.000 [" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(tasks.Task(**{**PACE.__dict__, "prompt": "Fast?"}))
