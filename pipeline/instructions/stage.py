"""Items, per-item functions and records of the instructions stage.

An item is one (clip, task family) pair: ``{"id": "<clip_id>-<family>", "clip_id", "task_family",
"dataset", "split", "metadata"}``, where ``metadata`` is the clip's JSON (``metadata.py``). Items
are written to ``<OUT stem>.items.jsonl`` and run by the shared runner, so resume, the ledger,
error records and input-ordered output come from ``pipeline.runner``.

Per-item functions: ``write_with_templates`` (sync, any executor) and ``answer_with_llm``
(async, ``AsyncExecutor``). Both return one instruction record with two private keys that
``finalize_outputs`` moves out of the output: ``_rejected`` (the pairs the filter dropped, with
reasons) and ``_reply`` (whether the reply was salvaged, its finish reason).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.contracts import INSTRUCTION_FIELDS, InstructionRecord
from pipeline.instructions.filtering import FilterSettings, filter_pairs
from pipeline.instructions.metadata import clip_metadata, identifier_like_keys
from pipeline.instructions.parsing import UnusableReply, parse_reply
from pipeline.instructions.facts import clip_facts
from pipeline.instructions.templates import TEMPLATE_VERSION, item_rng, write_pairs
from pipeline.records import InvalidRecord, check_id, iter_jsonl, parse_record
from pipeline.runner import ItemError, errors_path

STAGE_NAME = "instructions"
TEMPLATE_MODEL = "llark-template-writer"


@dataclass(frozen=True)
class WriterSettings:
    """Everything an instruction record depends on; recorded in the runner's ledger, so that a
    rerun with other settings is refused instead of mixing two kinds of records in one output."""

    writer: str  # "template" or "llm"
    families: tuple[str, ...]
    reasoning_clips_per_dataset: int
    seed: int
    filters: FilterSettings
    caption_questions: tuple[str, ...]
    captions_as_given: tuple[str, ...]
    template_version: str = TEMPLATE_VERSION
    models: dict[str, str] = field(default_factory=dict)  # llm: family -> model
    prompt_versions: dict[str, str] = field(default_factory=dict)  # llm: "dataset/family" -> version
    max_output_tokens: dict[str, int] = field(default_factory=dict)
    temperature: float | None = None
    concise: bool = False  # template writer: understanding answers that state only the fact


# ---------------------------------------------------------------------------------------------
# Items


@dataclass
class ItemsSummary:
    clips: int = 0
    invalid_clips: int = 0
    items: Counter = field(default_factory=Counter)  # by family
    no_family: int = 0
    reasoning_left_out: int = 0


def item_id(clip_id: str, family: str) -> str:
    candidate = f"{clip_id}-{family}"
    if len(candidate) <= 200:
        return candidate
    digest = hashlib.sha1(candidate.encode("utf-8")).hexdigest()[:8]
    return f"{clip_id[:180]}-{digest}-{family}"


def build_items(clips_path: Path, settings: WriterSettings) -> tuple[list[dict], ItemsSummary]:
    """The items for every valid clip and selected family; a clip line that is not a valid clip
    record becomes an item that fails with the reason (so it shows in the errors file)."""
    summary = ItemsSummary()
    clips: list[tuple[int, dict]] = []
    bad: list[dict] = []
    for line in iter_jsonl(clips_path):
        summary.clips += 1
        try:
            if line.error:
                raise InvalidRecord(line.error)
            record = parse_record(line.obj).model_dump(mode="json", exclude_none=True)
        except InvalidRecord as exc:
            summary.invalid_clips += 1
            raw_id = line.obj.get("id") if line.obj else None
            bad.append({"id": f"line-{line.number}", "invalid_clip": f"line {line.number} (id {raw_id!r}): {exc}"})
            continue
        clips.append((line.number, record))
    reasoning_kept = _reasoning_subsample(clips, settings)
    rows = []
    for _, record in clips:
        families = [f for f in record.get("task_families", []) if f in settings.families]
        if not record.get("task_families"):
            summary.no_family += 1
        metadata = None
        for family in families:
            if family == "reasoning" and record["id"] not in reasoning_kept:
                summary.reasoning_left_out += 1
                continue
            metadata = metadata if metadata is not None else clip_metadata(record)
            rows.append({"id": item_id(record["id"], family), "clip_id": record["id"], "task_family": family,
                         "dataset": record["dataset"], "split": record["split"], "metadata": metadata})
            summary.items[family] += 1
    return rows + bad, summary


def _reasoning_subsample(clips: list[tuple[int, dict]], settings: WriterSettings) -> set[str]:
    """At most ``reasoning_clips_per_dataset`` reasoning clips per dataset (the paper: 25k), the
    same ones on every run: those whose seeded hash of the id is smallest."""
    by_dataset: dict[str, list[str]] = {}
    for _, record in clips:
        if "reasoning" in record.get("task_families", []):
            by_dataset.setdefault(record["dataset"], []).append(record["id"])
    limit = settings.reasoning_clips_per_dataset
    kept: set[str] = set()
    for ids in by_dataset.values():
        if limit <= 0 or len(ids) <= limit:
            kept.update(ids)
        else:
            ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{settings.seed}:{i}".encode()).hexdigest())
            kept.update(ranked[:limit])
    return kept


def write_items(rows: list[dict], path: Path) -> None:
    from pipeline.records import write_jsonl

    write_jsonl(path, rows)


# ---------------------------------------------------------------------------------------------
# Per-item functions


def _check_item(row: dict) -> None:
    if "invalid_clip" in row:
        raise ItemError("invalid_clip", row["invalid_clip"])


def is_given_caption(row: dict, settings: WriterSettings) -> bool:
    return (row["task_family"] == "captioning" and row["dataset"] in settings.captions_as_given
            and isinstance(row["metadata"].get("caption"), str))


def given_caption_record(row: dict, settings: WriterSettings) -> dict:
    """A dataset's own caption as the answer to a caption request drawn from the question list."""
    rng = item_rng(settings.seed, row["clip_id"], "given-caption")
    pairs = [{"question": rng.choice(settings.caption_questions), "answer": row["metadata"]["caption"]}]
    digest = hashlib.sha256("\n".join(settings.caption_questions).encode("utf-8")).hexdigest()[:8]
    return finish_record(row, pairs, settings, backend="given", model=f"{row['dataset']}-captions",
                         prompt_version=f"caption-questions-{digest}-seed{settings.seed}")


def write_with_templates(row: dict, settings: WriterSettings) -> dict:
    """Per-item function of the template writer."""
    _check_item(row)
    if is_given_caption(row, settings):
        return given_caption_record(row, settings)
    facts = clip_facts(row["metadata"], row["dataset"])
    rng = item_rng(settings.seed, row["clip_id"], row["task_family"])
    pairs = write_pairs(row["task_family"], facts, rng, settings.caption_questions, settings.concise)
    style = "-concise" if settings.concise else ""
    return finish_record(row, pairs, settings, backend="template", model=TEMPLATE_MODEL,
                         prompt_version=f"templates-v{settings.template_version}{style}-seed{settings.seed}")


async def answer_with_llm(row: dict, runtime) -> dict:
    """Per-item function of the language-model writers (``runtime``: ``llm.LLMRuntime``)."""
    _check_item(row)
    settings: WriterSettings = runtime.settings
    if is_given_caption(row, settings):
        return given_caption_record(row, settings)
    request = runtime.request_for(row)
    reply = await runtime.reply_for(request)
    try:
        parsed = parse_reply(reply.text)
    except UnusableReply as exc:
        raise ItemError(
            "unusable_reply",
            f"{exc} (finish reason {reply.finish_reason}); raw reply: {json.dumps(reply.text, ensure_ascii=False)}",
        ) from None
    return finish_record(row, parsed.pairs, settings, backend=reply.backend, model=request.model,
                         prompt_version=request.prompt_version, metadata_json=request.body["messages"][1]["content"],
                         reply_info={"salvaged": parsed.salvaged, "finish_reason": reply.finish_reason})


def finish_record(row: dict, pairs: list[dict], settings: WriterSettings, *, backend: str, model: str,
                  prompt_version: str, metadata_json: str | None = None, reply_info: dict | None = None) -> dict:
    field_names = identifier_like_keys(metadata_json if metadata_json is not None else row["metadata"])
    kept, rejected = filter_pairs(pairs, settings.filters, field_names)
    record = {
        "id": row["id"], "clip_id": row["clip_id"], "task_family": row["task_family"], "pairs": kept,
        "backend": backend, "model": model, "prompt_version": prompt_version,
        "dataset": row["dataset"], "split": row["split"],
        "_rejected": rejected,
    }
    if reply_info:
        record["_reply"] = reply_info
    return record


# ---------------------------------------------------------------------------------------------
# Output files


def rejected_path(output: Path) -> Path:
    return errors_path(output).with_name(errors_path(output).name.replace(".errors.jsonl", ".rejected.jsonl"))


def items_path(output: Path) -> Path:
    return errors_path(output).with_name(errors_path(output).name.replace(".errors.jsonl", ".items.jsonl"))


@dataclass
class OutputSummary:
    records: int = 0
    pairs_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    items_with_nothing_kept: int = 0
    salvaged_replies: int = 0
    truncated_replies: int = 0
    by_backend: Counter = field(default_factory=Counter)

    @property
    def pairs_dropped(self) -> int:
        return sum(self.dropped.values())

    def lines(self, rejected: Path) -> list[str]:
        total = self.pairs_kept + self.pairs_dropped
        backends = ", ".join(f"{b} {n}" for b, n in self.by_backend.most_common())
        out = [f"{STAGE_NAME}: {self.records} instruction records ({backends or 'none'}), {self.pairs_kept} pairs kept"]
        if total:
            out.append(f"{STAGE_NAME}: {self.pairs_dropped} of {total} pairs dropped ({100 * self.pairs_dropped / total:.1f}%)"
                       + (f", kept with their reasons in {rejected}" if self.pairs_dropped else ""))
            for reason, n in self.dropped.most_common():
                out.append(f"{STAGE_NAME}:   {reason:18s} {n:8d}  ({100 * n / total:.1f}% of pairs)")
        if self.items_with_nothing_kept:
            out.append(f"{STAGE_NAME}: {self.items_with_nothing_kept} items had every pair dropped and have no record")
        if self.truncated_replies or self.salvaged_replies:
            out.append(f"{STAGE_NAME}: {self.truncated_replies} replies hit the output token limit; "
                       f"{self.salvaged_replies} replies were partly unreadable and their complete pairs kept")
        return out


def finalize_outputs(output: Path) -> OutputSummary:
    """Rewrite the runner's output without the private keys (and without records that kept no
    pair), and write the rejected pairs beside it; both files are replaced whole."""
    from pipeline.records import write_jsonl

    summary = OutputSummary()
    records, rejected = [], []
    for line in iter_jsonl(output):
        if line.error:
            raise ValueError(f"{output}: {line.error}")
        row = line.obj
        for pair in row.get("_rejected", []):
            rejected.append({"id": row["id"], "clip_id": row["clip_id"], "task_family": row["task_family"],
                             "backend": row["backend"], "model": row["model"], "prompt_version": row["prompt_version"],
                             **pair})
            summary.dropped[pair["reason"]] += 1
        reply = row.get("_reply") or {}
        summary.salvaged_replies += bool(reply.get("salvaged"))
        summary.truncated_replies += reply.get("finish_reason") == "length"
        if not row["pairs"]:
            summary.items_with_nothing_kept += 1
            continue
        summary.records += 1
        summary.pairs_kept += len(row["pairs"])
        summary.by_backend[row["backend"]] += 1
        records.append({k: row[k] for k in INSTRUCTION_FIELDS})
    write_jsonl(output, records)
    write_jsonl(rejected_path(output), rejected)
    return summary


def validate_record(record: dict) -> dict:
    """Check one instruction record against the contract; raise ValueError naming the problem."""
    missing = [k for k in INSTRUCTION_FIELDS if k not in record]
    if missing:
        raise ValueError(f"instruction record {record.get('id')!r} lacks {missing}")
    check_id(record["id"])
    try:
        InstructionRecord.model_validate(record)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"instruction record {record['id']}: {problems}") from None
    return record


def read_instruction_records(path: Path) -> list[dict[str, Any]]:
    """Read an instruction-record file, checking every record against the contract."""
    from pipeline.records import read_jsonl

    return [validate_record(r) for r in read_jsonl(path)]
