"""Running a trained model over an evaluation set, then scoring its answers.

Evaluation set: clip records (the crop stage's ``clips.jsonl`` or ``augmented.jsonl``) with
their embeddings (the embed stage's directory: ``embeddings.jsonl`` and ``encoder.json``). Each
record gets one question per task that has a reference for it. The tasks are a registry
(:mod:`llark.evaluate.tasks`): each task's module gives its question, its references, its parser
and its scorer, and the driver here treats every task the same way. The built-in ones:

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

A clip's normalised ``labels`` block, where it has one, comes before these fields. Instruments
use the annotations of the window the model heard (``annotations.in_clip``) where the crop stage
wrote them. Genre labels are the vocabulary the clips' labels carry (kept in ``run.json``), else the
dataset's own (GTZAN's ten; MedleyDB's genres as they occur in the evaluated records; the demo's
five styles).

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
from typing import Any, Callable, Sequence

import numpy as np

from llark.evaluate import tasks as registry
from llark.evaluate.tasks import DEFAULT_MAX_NEW_TOKENS, Context, EvalConfigError
from pipeline.files import check_same_settings, drop_torn_tail, json_line, write_json, write_jsonl

log = logging.getLogger("llark")

CONDITIONS = ("real", "shuffled")
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"


def generations_file(out_dir: Path, condition: str) -> Path:
    return out_dir / ("generations.jsonl" if condition == "real" else f"generations.{condition}.jsonl")


def predictions_file(out_dir: Path, condition: str) -> Path:
    return out_dir / ("predictions.jsonl" if condition == "real" else f"predictions.{condition}.jsonl")


def max_new_tokens_defaults() -> dict[str, int]:
    """The registered tasks' answer lengths where they differ from the default."""
    return {t.name: t.max_new_tokens for t in registry.registered() if t.max_new_tokens != DEFAULT_MAX_NEW_TOKENS}


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
    embedding_path: str | dict[str, str]  # {encoder: path} for a model of several encoders
    # The label vocabulary the clip carries for this task; it goes to run.json, not into the rows.
    vocabulary: list[str] | None = None

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "vocabulary"}


def label_vocabularies(items: Sequence[EvalItem]) -> dict[str, list[str]]:
    """``{"task/dataset": labels}`` of the vocabularies the clips carry, labels in first-seen order."""
    out: dict[str, dict[str, None]] = {}
    for item in items:
        if item.vocabulary:
            out.setdefault(f"{item.task}/{item.dataset}", {}).update(dict.fromkeys(item.vocabulary))
    return {group: list(labels) for group, labels in out.items()}


Embeddings = Path | dict[str, Path]  # the embed stage's directory, or one per encoder of a fusion model


def read_embedding_indexes(embeddings: Embeddings) -> tuple[dict[str, Any], Any]:
    """``{clip id: .npy path}`` and the encoder.json of one directory; for ``{encoder: directory}``,
    ``{clip id: {encoder: .npy path}}`` over the clips every directory holds, and the encoder.json
    of each."""
    if not isinstance(embeddings, dict):
        return read_embedding_index(Path(embeddings))
    read = {name: read_embedding_index(Path(d)) for name, d in embeddings.items()}
    common = set.intersection(*(set(paths) for paths, _ in read.values()))
    paths = {clip: {name: read[name][0][clip] for name in read} for clip in common}
    return paths, {name: manifest for name, (_, manifest) in read.items()}


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


def build_items(clips: Path, embeddings_dir: Embeddings, tasks: Sequence[str], splits: Sequence[str] | None = None,
                prompts: dict[str, str] | None = None, limit: int | None = None,
                datasets: Sequence[str] | None = None) -> list[EvalItem]:
    """One item per (clip, task) with a reference and an embedding; clips without an embedding
    are counted and left out (the embed stage's error file says why)."""
    from pipeline.records import read_records

    known = registry.names()
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        raise EvalConfigError(f"unknown tasks {unknown}; choose from {', '.join(known)}")
    chosen = [registry.get(name) for name in tasks]
    prompts = {**{task.name: task.prompt for task in chosen}, **(prompts or {})}
    paths, _ = read_embedding_indexes(embeddings_dir)
    items, missing = [], 0
    for record in read_records(clips):
        if splits and record.split not in splits:
            continue
        if datasets and record.dataset not in datasets:
            continue
        wanted = [(task, task.reference(record)) for task in chosen]
        wanted = [(task, ref) for task, ref in wanted if ref is not None]
        if not wanted:
            continue
        if record.id not in paths:
            missing += 1
            continue
        for task, ref in wanted:
            items.append(EvalItem(f"{record.id}:{task.name}", record.id, record.dataset, record.split, task.name,
                                  prompts[task.name], ref, paths[record.id],
                                  task.vocabulary(record) if task.vocabulary else None))
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
    embeddings: str | dict[str, str]
    tasks: list[str]
    splits: list[str] | None
    prompts: dict[str, str]
    generation: dict[str, Any]
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    shuffle_seed: int = 0
    vocabularies: dict[str, list[str]] = field(default_factory=dict)  # see label_vocabularies

    def to_dict(self) -> dict[str, Any]:
        # Without label vocabularies run.json holds no such key, as for clips that carry none.
        return {k: v for k, v in self.__dict__.items() if k != "vocabularies" or v}


def _read_done(path: Path) -> dict[str, dict]:
    from pipeline.records import iter_jsonl

    done = {}
    if path.is_file():
        for line in iter_jsonl(path):
            if line.obj is not None and "item" in line.obj:
                done[line.obj["item"]] = line.obj
    return done


def check_encoder_matches(model_encoder: dict | list | None, manifest: dict) -> None:
    """Refuse embeddings of another encoder than the projector was trained on; for a model of several
    encoders, ``manifest`` is ``{encoder: encoder.json}`` and each is checked, a missing one named."""
    from pipeline.encoders import FRAME_FIELDS, describe_differences, manifest_differences

    if not model_encoder:
        return
    several = "name" not in manifest  # {encoder: manifest}
    if isinstance(model_encoder, list) and not several:
        names = [str(e.get("key")) for e in model_encoder]
        raise EvalConfigError(f"the model reads several encoders ({', '.join(names)}) and --embeddings gives one "
                              "directory: give " + " ".join(f"--embeddings {n}=DIR" for n in names))
    if several and not isinstance(model_encoder, list):
        raise EvalConfigError(f"the model reads one encoder ({model_encoder.get('name')}) and --embeddings gives "
                              f"{len(manifest)}: give one --embeddings DIR")
    pairs = [(e.get("key"), e) for e in model_encoder] if several else [(None, model_encoder)]
    for name, expected in pairs:
        if name is not None and name not in manifest:
            raise EvalConfigError(f"--embeddings: no {name}=DIR, and the model reads encoder {name!r} "
                                  f"(given: {', '.join(sorted(manifest))})")
        differences = manifest_differences(expected, manifest[name] if name else manifest, FRAME_FIELDS)
        if differences:
            raise EvalConfigError("the evaluation embeddings" + (f" of {name!r}" if name else "") + " come from "
                                  "another encoder than the model was trained on: " + describe_differences(differences))


def read_clip_frames(llark, path: str | dict[str, str]):
    """The frames the model takes for one clip: one array, or ``{encoder: array}``."""
    from llark.inference import read_frames

    if isinstance(path, dict):
        return {name: read_frames(p, llark.encoder_dims[name]) for name, p in path.items()}
    return read_frames(path, llark.encoder_dim, llark.audio_states)


def generate(llark, items: Sequence[EvalItem], out_dir: Path, condition: str, settings: RunSettings,
             batch_size: int = 8, progress: bool = True) -> Path:
    """Answer every item (resuming a file written with the same settings); return the file."""
    from llark.inference import GenerationSettings

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
            audio = [read_clip_frames(llark, embedding_of[sources[i.clip_id]]) for i in batch]
            answers = llark.answer([i.question for i in batch], audio, gen)
            for item, answer in zip(batch, answers):
                fh.write(json_line({**item.row(), "answer": answer, "audio": condition,
                                    "audio_from": sources[item.clip_id]}))
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


def score_rows(rows: Sequence[dict], embed: Callable[[list[str]], np.ndarray] | None = None,
               vocabularies: dict[str, list[str]] | None = None) -> tuple[list[dict], dict, dict]:
    """Parse and score generated rows with their tasks; returns (rows with parsed/score/unparseable,
    metrics per ``"task/dataset"``, the tasks' notes for the summary). ``embed`` is the text embedder
    of tasks that compare answers by meaning (genre; default :class:`genre.SentenceEmbedder`);
    ``vocabularies`` the label vocabularies the clips carry, per ``"task/dataset"``."""
    known = registry.names()
    scored: list[dict] = []
    metrics: dict[str, dict] = {}
    notes: dict[str, Any] = {}
    for (name, dataset), group in sorted(_group(rows).items()):
        if name not in known:
            raise EvalConfigError(f"unknown task {name!r} in the generations")
        task = registry.REGISTRY[name]
        context = Context(dataset, (vocabularies or {}).get(f"{name}/{dataset}"), embed, notes)
        parsed = task.parse(group, context)
        group = [{**row, "parsed": p} for row, p in zip(group, parsed)]
        per_row, result = task.score(group, context)
        result["unparseable"] = sum(p is None for p in parsed)
        result["n"] = len(group)
        # A model that ignores the audio tends to give one answer to every clip.
        result["distinct_parsed"] = len({json.dumps(p, sort_keys=True) for p in parsed if p is not None})
        metrics[f"{name}/{dataset}"] = result
        for row, p, done in zip(group, parsed, per_row):
            extra = {k: v for k, v in done.items() if k != "score"}
            scored.append({**row, "score": done["score"], "unparseable": p is None, **extra})
    return scored, metrics, notes


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
    notes: dict[str, Any] = {}
    scored_by_condition = {}
    for condition in CONDITIONS:
        path = generations_file(out_dir, condition)
        if not path.is_file():
            continue
        rows = read_jsonl(path)
        if not rows:
            continue
        scored, metrics, condition_notes = score_rows(rows, embed, run.get("vocabularies"))
        notes.update(condition_notes)
        write_jsonl(predictions_file(out_dir, condition), scored)
        summary["conditions"][condition] = _jsonable(metrics)
        scored_by_condition[condition] = scored
    if not summary["conditions"]:
        raise EvalConfigError(f"{out_dir} holds no generations to score")
    summary.update(notes)
    write_json(out_dir / SUMMARY_JSON, summary)
    report.write_report(out_dir, summary, scored_by_condition)
    return summary


def evaluate(llark, clips: Path, embeddings_dir: Embeddings, out_dir: Path, tasks: Sequence[str],
             splits: Sequence[str] | None = None, prompts: dict[str, str] | None = None,
             generation: dict[str, Any] | None = None, max_new_tokens: dict[str, int] | None = None,
             shuffle_control: bool = False, shuffle_seed: int = 0, batch_size: int = 8, limit: int | None = None,
             datasets: Sequence[str] | None = None, overwrite: bool = False,
             embed: Callable[[list[str]], np.ndarray] | None = None) -> dict:
    """Generate (real audio, and shuffled audio with ``shuffle_control``) and score; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _, manifest = read_embedding_indexes(embeddings_dir)
    check_encoder_matches(llark.encoder_identity, manifest)
    items = build_items(clips, embeddings_dir, tasks, splits, prompts, limit, datasets)
    given = {k: str(v) for k, v in embeddings_dir.items()} if isinstance(embeddings_dir, dict) else str(embeddings_dir)
    settings = RunSettings(
        checkpoint=str(llark.source), clips=str(clips), embeddings=given, tasks=list(tasks),
        splits=list(splits) if splits else None,
        prompts={t: registry.get(t).prompt for t in tasks} | (prompts or {}), generation=dict(generation or {}),
        max_new_tokens={**max_new_tokens_defaults(), **(max_new_tokens or {})}, shuffle_seed=shuffle_seed,
        vocabularies=label_vocabularies(items))
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
