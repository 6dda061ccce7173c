"""Running a trained model over an evaluation set, then scoring its answers.

Evaluation set: clip records (the crop stage's ``clips.jsonl`` or ``augmented.jsonl``) with
their embeddings (the embed stage's directory: ``embeddings.jsonl`` and ``encoder.json``). Each
record gets one question per task its dataset has a reference for:

===========  ===========================================  =====================================
task         datasets (reference field)                   question (the papers' prompts)
===========  ===========================================  =====================================
key          giantsteps_key (key_mir_eval), demo (key)    What is the key of this song?
tempo        giantsteps_tempo, demo (tempo_bpm)           What is the tempo of this song?
genre        gtzan, medleydb, demo (genre)                What genre is this song?
instruments  musicnet, medleydb (families), demo          List the instruments you hear in this
                                                          clip, including vocals and drums.
captions     musiccaps (caption)                          Describe the contents of the provided
                                                          audio in detail.
beats        demo (beat times in the clip)                CMI-Bench's beat prompt
metre        demo (beats_per_bar)                         What is the time signature of this song?
===========  ===========================================  =====================================

Instruments use the annotations of the window the model heard (``annotations.in_clip``) where
the crop stage wrote them. Genre labels are the dataset's own (GTZAN's ten; MedleyDB's genres as
they occur in the evaluated records; the demo's five styles).

Two phases. **Generate**: every item's answer, written to ``generations[.shuffled].jsonl`` as it
comes (a rerun with the same settings skips the items already there). **Score**: parse every
answer, score it, and write ``predictions[.shuffled].jsonl`` (question, reference, answer, parsed
value, score, unparseable), ``summary.json`` and the report. Scoring alone can be rerun
(:func:`score_run`). An unparseable answer counts as wrong.

The control (``shuffle=True``): the same questions with each clip's embedding replaced by another
clip's (a random derangement over the evaluated clips, seeded). A model that uses the audio
falls to chance there; a model that answers from the question alone scores the same on both.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from llark.evaluate import beats as beats_metric
from llark.evaluate import captions as captions_metric
from llark.evaluate import genre as genre_metric
from llark.evaluate import instruments as instruments_metric
from llark.evaluate import key as key_metric
from llark.evaluate import metre as metre_metric
from llark.evaluate import parse
from llark.evaluate import tempo as tempo_metric
from pipeline.files import check_same_settings, drop_torn_tail, write_json, write_jsonl

log = logging.getLogger("llark")

TASKS = ("key", "tempo", "genre", "instruments", "captions", "beats", "metre")
PROMPTS = {
    "key": "What is the key of this song?",
    "tempo": "What is the tempo of this song?",
    "genre": "What genre is this song?",
    "instruments": "List the instruments you hear in this clip, including vocals and drums.",
    "captions": "Describe the contents of the provided audio in detail.",
    "beats": "Identify and list the timestamps of all beats in this audio track. Use the format of "
             "'0.0s,0.54s,1.0s, ...'",
    "metre": "What is the time signature of this song?",
}
# Long answers need room; the others are a sentence.
MAX_NEW_TOKENS = {"captions": 256, "beats": 384}
DEFAULT_MAX_NEW_TOKENS = 64
CONDITIONS = ("real", "shuffled")
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
# What each task's summary row shows, in order.
HEADLINE = {
    "key": ("mirex", "accuracy"), "tempo": ("acc2", "acc1"), "genre": ("acc1_embedding", "acc_strict"),
    "instruments": ("f1", "precision", "recall"), "metre": ("accuracy",), "beats": ("f_measure",),
    "captions": ("bleu_4", "meteor", "rouge_l", "cider"),
}


class EvalConfigError(ValueError):
    """An evaluation that cannot run as asked; the message says what to change."""


def generations_file(out_dir: Path, condition: str) -> Path:
    return out_dir / ("generations.jsonl" if condition == "real" else f"generations.{condition}.jsonl")


def predictions_file(out_dir: Path, condition: str) -> Path:
    return out_dir / ("predictions.jsonl" if condition == "real" else f"predictions.{condition}.jsonl")


# ---------------------------------------------------------------------------------------------
# References per dataset


def _in_clip(annotations: dict, key: str):
    in_clip = annotations.get("in_clip") or {}
    return in_clip.get(key) if key in in_clip else annotations.get(key)


def reference(task: str, dataset: str, annotations: dict) -> Any | None:
    """The task's reference for a clip of ``dataset`` (JSON-serialisable), or None when it has none."""
    a = annotations
    if task == "key" and dataset in ("giantsteps_key", "demo"):
        key = a.get("key_mir_eval") or a.get("key")
        return " ".join(key.split()) if isinstance(key, str) else None
    if task == "tempo" and dataset in ("giantsteps_tempo", "demo"):
        bpm = a.get("tempo_bpm")
        return float(bpm) if isinstance(bpm, (int, float)) and bpm > 0 else None
    if task == "genre" and dataset in ("gtzan", "medleydb", "demo"):
        return a.get("genre") if isinstance(a.get("genre"), str) and a.get("genre") else None
    if task == "instruments":
        if dataset == "musicnet":
            found = _in_clip(a, "instruments")
        elif dataset == "medleydb":
            found = _in_clip(a, "instrument_families")
        elif dataset == "demo":
            found = a.get("instruments")
        else:
            return None
        return sorted(found) if isinstance(found, list) else None
    if task == "captions" and dataset == "musiccaps":
        caption = a.get("caption")
        return [caption] if isinstance(caption, str) and caption.strip() else None
    if task == "beats" and dataset == "demo":
        beats = (a.get("in_clip") or {}).get("beats")
        return [round(float(b["time"]), 6) for b in beats] if beats else None
    if task == "metre" and dataset == "demo":
        n = a.get("beats_per_bar")
        return int(n) if isinstance(n, int) and n > 0 else None
    return None


def instrument_vocabulary(dataset: str) -> dict[str, list[str]]:
    name = {"musicnet": "musicnet", "medleydb": "general_midi", "demo": "demo"}.get(dataset)
    if name is None:
        raise EvalConfigError(f"no instrument vocabulary for dataset {dataset!r}")
    return instruments_metric.VOCABULARIES[name]


def genre_vocabulary(dataset: str, references: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(labels, label texts) of a dataset's genre task."""
    if dataset == "gtzan":
        return list(genre_metric.GTZAN_LABELS), dict(genre_metric.GTZAN_LABEL_TEXTS)
    if dataset == "demo":
        from pipeline.demo_data import STYLES

        return [s.name for s in STYLES], {}
    return sorted(set(references)), {}


# ---------------------------------------------------------------------------------------------
# Items


@dataclass
class EvalItem:
    item: str  # "<clip id>:<task>"
    clip_id: str
    dataset: str
    split: str
    task: str
    question: str
    reference: Any
    embedding_path: str


def read_embedding_index(embeddings_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """``{clip id: .npy path}`` from the embed stage's directory, and its encoder.json."""
    from pipeline.encoders import read_manifest
    from pipeline.records import read_jsonl
    from pipeline.runner import StageConfigError

    try:
        manifest = read_manifest(embeddings_dir)
    except StageConfigError as exc:
        raise EvalConfigError(str(exc)) from None
    index_file = embeddings_dir / "embeddings.jsonl"
    if not index_file.is_file():
        raise EvalConfigError(f"{index_file} does not exist: run `llark embed` on the evaluation clips first")
    paths = {}
    for row in read_jsonl(index_file):
        path = Path(row["embedding_path"])
        paths[row["id"]] = str(path if path.is_absolute() else embeddings_dir / path)
    return paths, manifest


def build_items(clips: Path, embeddings_dir: Path, tasks: Sequence[str], splits: Sequence[str] | None = None,
                prompts: dict[str, str] | None = None, limit: int | None = None,
                datasets: Sequence[str] | None = None) -> list[EvalItem]:
    """One item per (clip, task) with a reference and an embedding; clips without an embedding
    are counted and left out (the embed stage's error file says why)."""
    from pipeline.records import read_records

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise EvalConfigError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    prompts = {**PROMPTS, **(prompts or {})}
    paths, _ = read_embedding_index(embeddings_dir)
    items, missing = [], 0
    for record in read_records(clips):
        if splits and record.split not in splits:
            continue
        if datasets and record.dataset not in datasets:
            continue
        wanted = [(t, reference(t, record.dataset, record.annotations)) for t in tasks]
        wanted = [(t, r) for t, r in wanted if r is not None]
        if not wanted:
            continue
        if record.id not in paths:
            missing += 1
            continue
        for task, ref in wanted:
            items.append(EvalItem(f"{record.id}:{task}", record.id, record.dataset, record.split, task,
                                  prompts[task], ref, paths[record.id]))
        if limit is not None and len({i.clip_id for i in items}) >= limit:
            break
    if missing:
        log.warning("evaluate: %d clips with references have no embedding and are left out", missing)
    if not items:
        raise EvalConfigError(f"no clip in {clips} (splits {list(splits or []) or 'all'}) has a reference for "
                              f"{', '.join(tasks)} and an embedding in {embeddings_dir}")
    return items


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of ``range(n)`` with no fixed point (n >= 2)."""
    if n < 2:
        raise EvalConfigError("the shuffled-audio control needs at least two clips")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def audio_sources(items: Sequence[EvalItem], condition: str, seed: int) -> dict[str, str]:
    """``{clip id: clip id whose embedding it gets}``: itself, or another clip under ``shuffled``."""
    clips = sorted({i.clip_id for i in items})
    if condition == "real":
        return {c: c for c in clips}
    order = derangement(len(clips), seed)
    return {c: clips[int(j)] for c, j in zip(clips, order)}


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class RunSettings:
    checkpoint: str
    clips: str
    embeddings: str
    tasks: list[str]
    splits: list[str] | None
    prompts: dict[str, str]
    generation: dict[str, Any]
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    shuffle_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_done(path: Path) -> dict[str, dict]:
    from pipeline.records import iter_jsonl

    done = {}
    if path.is_file():
        for line in iter_jsonl(path):
            if line.obj is not None and "item" in line.obj:
                done[line.obj["item"]] = line.obj
    return done


def check_encoder_matches(model_encoder: dict | None, manifest: dict) -> None:
    """Refuse embeddings of another encoder than the projector was trained on."""
    from pipeline.encoders import FRAME_FIELDS, describe_differences, manifest_differences

    if not model_encoder:
        return
    differences = manifest_differences(model_encoder, manifest, FRAME_FIELDS)
    if differences:
        raise EvalConfigError("the evaluation embeddings come from another encoder than the model was trained on: "
                              + describe_differences(differences))


def generate(llark, items: Sequence[EvalItem], out_dir: Path, condition: str, settings: RunSettings,
             batch_size: int = 8, progress: bool = True) -> Path:
    """Answer every item (resuming a file written with the same settings); return the file."""
    from llark.inference import GenerationSettings, read_frames

    path = generations_file(out_dir, condition)
    drop_torn_tail(path)  # appending then starts on a fresh line
    done = _read_done(path)
    sources = audio_sources(items, condition, settings.shuffle_seed)
    todo = [i for i in items if i.item not in done]
    if done:
        log.info("evaluate (%s audio): %d items already answered in %s, %d to go", condition, len(items) - len(todo),
                 path, len(todo))
    embedding_of = {i.clip_id: i.embedding_path for i in items}
    # Batches of one task share a prompt length, so little padding.
    todo.sort(key=lambda i: (i.task, i.clip_id))
    started, answered = time.perf_counter(), 0
    with open(path, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            max_new = max(settings.max_new_tokens.get(i.task, DEFAULT_MAX_NEW_TOKENS) for i in batch)
            gen = GenerationSettings(**{**settings.generation, "max_new_tokens": max_new})
            audio = [read_frames(embedding_of[sources[i.clip_id]], llark.encoder_dim) for i in batch]
            answers = llark.answer([i.question for i in batch], audio, gen)
            for item, answer in zip(batch, answers):
                row = {**item.__dict__, "answer": answer, "audio": condition, "audio_from": sources[item.clip_id]}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            answered += len(batch)
            if progress:
                rate = answered / (time.perf_counter() - started)
                log.info("evaluate (%s audio): %d/%d answered, %.2f items/s", condition, answered, len(todo), rate)
    return path


# ---------------------------------------------------------------------------------------------
# Scoring


def _group(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["dataset"]), []).append(row)
    return groups


def score_rows(rows: Sequence[dict], embed: Callable[[list[str]], np.ndarray] | None = None) -> tuple[list[dict], dict]:
    """Parse and score generated rows; returns (rows with parsed/score/unparseable, metrics per
    ``"task/dataset"``). ``embed`` is needed for genre (default: :class:`genre.SentenceEmbedder`)."""
    scored: list[dict] = []
    metrics: dict[str, dict] = {}
    for (task, dataset), group in sorted(_group(rows).items()):
        answers = [r["answer"] for r in group]
        refs = [r["reference"] for r in group]
        extra: list[dict] = [{} for _ in group]
        if task == "key":
            parsed = [parse.parse_key(a) for a in answers]
            result = key_metric.evaluate(refs, parsed)
            scores = [key_metric.weighted_score(r, p) for r, p in zip(refs, parsed)]
        elif task == "tempo":
            parsed = [parse.parse_tempo(a) for a in answers]
            result = tempo_metric.evaluate(refs, parsed)
            scores = [float(tempo_metric.acc2(r, p)) for r, p in zip(refs, parsed)]
            extra = [{"acc1": tempo_metric.acc1(r, p)} for r, p in zip(refs, parsed)]
        elif task == "metre":
            parsed = [parse.parse_metre(a) for a in answers]
            result = metre_metric.evaluate(refs, parsed)
            scores = [float(r == p) for r, p in zip(refs, parsed)]
        elif task == "genre":
            labels, texts = genre_vocabulary(dataset, refs)
            if embed is None:
                embed = genre_metric.SentenceEmbedder()
            nearest = genre_metric.nearest_labels(answers, labels, embed, texts)
            strict = genre_metric.strict_labels(answers, labels, texts)
            result = genre_metric.evaluate(refs, nearest, strict, labels)
            result["labels"] = labels
            result["unparseable_strict"] = sum(s is None for s in strict)
            parsed = nearest
            scores = [float(r == p) for r, p in zip(refs, nearest)]
            extra = [{"parsed_strict": s, "correct_strict": r == s, "unparseable_strict": s is None}
                     for r, s in zip(refs, strict)]
        elif task == "instruments":
            vocabulary = instrument_vocabulary(dataset)
            found = [parse.parse_instruments(a, vocabulary) for a in answers]
            ref_sets = [set(r) & set(vocabulary) for r in refs]
            outside = sorted({x for r in refs for x in r} - set(vocabulary))
            if outside:
                log.warning("evaluate: instruments/%s: reference labels outside the vocabulary are not scored: %s",
                            dataset, ", ".join(outside))
            result = instruments_metric.evaluate(ref_sets, found, vocabulary)
            parsed = [sorted(f) if f is not None else None for f in found]
            scores = [instruments_metric.item_f1(r, f) for r, f in zip(ref_sets, found)]
        elif task == "beats":
            parsed = [parse.parse_times(a) for a in answers]
            result = beats_metric.evaluate([np.array(r) for r in refs],
                                           [None if p is None else np.array(p) for p in parsed])
            scores = [beats_metric.f_measure(np.array(r), None if p is None else np.array(p))
                      for r, p in zip(refs, parsed)]
        elif task == "captions":
            parsed = [a if a and a.strip() else None for a in answers]
            try:
                result = captions_metric.evaluate(refs, parsed)
                per_item = result.pop("per_item")
                scores = per_item["meteor"]
                extra = [{k: v[i] for k, v in per_item.items()} for i in range(len(group))]
            except captions_metric.MetricUnavailable as exc:
                result = {"unavailable": str(exc)}
                scores = [None] * len(group)
        else:
            raise EvalConfigError(f"unknown task {task!r} in the generations")
        unparseable = [p is None for p in parsed]
        result["unparseable"] = sum(unparseable)
        result["n"] = len(group)
        # A model that ignores the audio tends to give one answer to every clip.
        result["distinct_parsed"] = len({json.dumps(p, sort_keys=True) for p in parsed if p is not None})
        metrics[f"{task}/{dataset}"] = result
        for row, p, s, u, e in zip(group, parsed, scores, unparseable, extra):
            scored.append({**row, "parsed": p, "score": s, "unparseable": u, **e})
    return scored, metrics


def _jsonable(metrics: dict) -> dict:
    from llark.evaluate.stats import Estimate

    def convert(x):
        if isinstance(x, Estimate):
            return x.to_dict()
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [convert(v) for v in x]
        if isinstance(x, (np.floating, np.integer)):
            return x.item()
        return x

    return convert(metrics)


def score_run(out_dir: str | os.PathLike, embed: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """Score every condition generated in ``out_dir``; write predictions, summary.json and the report."""
    from llark.evaluate import report
    from pipeline.records import read_jsonl

    out_dir = Path(out_dir)
    run = json.loads((out_dir / RUN_JSON).read_text(encoding="utf-8")) if (out_dir / RUN_JSON).is_file() else {}
    summary: dict[str, Any] = {"run": run, "conditions": {}}
    scored_by_condition = {}
    for condition in CONDITIONS:
        path = generations_file(out_dir, condition)
        if not path.is_file():
            continue
        rows = read_jsonl(path)
        if not rows:
            continue
        needs_embed = embed is None and any(r["task"] == "genre" for r in rows)
        if needs_embed:
            embed = genre_metric.SentenceEmbedder()
        scored, metrics = score_rows(rows, embed)
        write_jsonl(predictions_file(out_dir, condition), scored)
        summary["conditions"][condition] = _jsonable(metrics)
        scored_by_condition[condition] = scored
    if not summary["conditions"]:
        raise EvalConfigError(f"{out_dir} holds no generations to score")
    if any(g.startswith("genre/") for c in summary["conditions"].values() for g in c):
        summary["genre_embedding_model"] = (getattr(embed, "name", None) or getattr(embed, "__name__", None)
                                            or type(embed).__name__)
    write_json(out_dir / SUMMARY_JSON, summary)
    report.write_report(out_dir, summary, scored_by_condition)
    return summary


def evaluate(llark, clips: Path, embeddings_dir: Path, out_dir: Path, tasks: Sequence[str],
             splits: Sequence[str] | None = None, prompts: dict[str, str] | None = None,
             generation: dict[str, Any] | None = None, max_new_tokens: dict[str, int] | None = None,
             shuffle_control: bool = False, shuffle_seed: int = 0, batch_size: int = 8, limit: int | None = None,
             datasets: Sequence[str] | None = None, overwrite: bool = False,
             embed: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """Generate (real audio, and shuffled audio with ``shuffle_control``) and score; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _, manifest = read_embedding_index(embeddings_dir)
    check_encoder_matches(llark.encoder_identity, manifest)
    items = build_items(clips, embeddings_dir, tasks, splits, prompts, limit, datasets)
    settings = RunSettings(
        checkpoint=str(llark.source), clips=str(clips), embeddings=str(embeddings_dir), tasks=list(tasks),
        splits=list(splits) if splits else None, prompts={t: PROMPTS[t] for t in tasks} | (prompts or {}),
        generation=dict(generation or {}), max_new_tokens={**MAX_NEW_TOKENS, **(max_new_tokens or {})},
        shuffle_seed=shuffle_seed)
    run_file = out_dir / RUN_JSON
    if run_file.is_file() and not overwrite:
        check_same_settings(f"the evaluation in {out_dir}", json.loads(run_file.read_text(encoding="utf-8")),
                            settings.to_dict(), "use --overwrite to start over, or another --out", EvalConfigError)
    if overwrite:
        for condition in CONDITIONS:
            for p in (generations_file(out_dir, condition), predictions_file(out_dir, condition)):
                p.unlink(missing_ok=True)
    write_json(run_file, settings.to_dict())
    conditions = ["real", "shuffled"] if shuffle_control else ["real"]
    for condition in conditions:
        generate(llark, items, out_dir, condition, settings, batch_size=batch_size)
    if not shuffle_control:
        generations_file(out_dir, "shuffled").unlink(missing_ok=True)
        predictions_file(out_dir, "shuffled").unlink(missing_ok=True)
    return score_run(out_dir, embed)
