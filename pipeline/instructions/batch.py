"""The OpenAI Batch API path: prepare, submit, poll, collect (half the price; replies within 24 h).

One invocation of ``llark instructions --backend openai-batch``:

1. collects every batch this output submitted earlier that has finished since;
2. prepares request files for the items that have neither a cached reply nor a batch in flight
   (one model per file, at most ``max_requests`` lines and ``max_bytes`` per file, ``custom_id``
   = the item id), uploads them (``purpose="batch"``) and creates one batch per file
   (``/v1/chat/completions``, ``completion_window="24h"``);
3. unless told not to wait, polls every batch of this output until it reaches a terminal state
   (``completed``, ``failed``, ``expired``, ``cancelled``), then reads both its output and its
   error file (results come in any order and are joined on ``custom_id``) and appends every
   reply to the reply cache. An expired or cancelled batch keeps the replies it finished; the
   rest are submitted again by the next run. Requests that failed are reported as item errors.

Files beside OUT: ``<stem>.batches.jsonl``, an append-only log with one ``submitted`` line per
batch (its id, input file id, local request and key files) and one ``collected`` line once its
results are in the cache; ``<stem>.batches/``, the request files as uploaded and, per file, the
cache key of every ``custom_id``. A batch submitted elsewhere (or whose log was lost) is collected
with ``--batch-id``; its replies are then keyed by today's models and prompt versions.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.instructions.cache import CachedReply, CacheKey, ReplyCache
from pipeline.instructions.chat import Redactor, RequestsRefused
from pipeline.instructions.costs import RESERVE_FACTOR, BudgetExhausted, CostBudget, PriceTable
from pipeline.instructions.llm import PreparedRequest
from pipeline.runner import StageConfigError

log = logging.getLogger("llark")
TERMINAL = ("completed", "failed", "expired", "cancelled")
NOT_FAILURES = ("batch_expired", "batch_cancelled")  # the request was never run: submit it again
ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True)
class BatchSettings:
    poll_interval_s: float = 60.0
    wait: bool = True
    max_wait_s: float | None = None  # stop waiting after this long (batches stay pending)
    max_requests: int = 50_000
    max_bytes: int = 190_000_000  # the limit is 200 MB; leave room for the multipart envelope


@dataclass
class BatchReport:
    submitted_batches: list[str] = field(default_factory=list)
    submitted_requests: int = 0
    left_out_for_cost: int = 0
    collected_batches: list[str] = field(default_factory=list)
    answered: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # item id -> reason
    resubmit: int = 0  # expired/cancelled requests, to go again
    still_pending: list[str] = field(default_factory=list)
    cost_usd: float = 0.0
    statuses: Counter = field(default_factory=Counter)


class BatchLog:
    """``<stem>.batches.jsonl``: what was submitted, and what has been collected."""

    def __init__(self, path: Path):
        self.path = path
        self.submitted: dict[str, dict] = {}
        self.collected: set[str] = set()
        if path.exists():
            for raw in path.read_text(encoding="utf-8").splitlines():
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue  # a line torn by a killed run
                if event.get("event") == "submitted":
                    self.submitted[event["batch_id"]] = event
                elif event.get("event") == "collected":
                    self.collected.add(event["batch_id"])

    def pending(self) -> list[dict]:
        return [e for b, e in self.submitted.items() if b not in self.collected]

    def append(self, event: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**event, "at": round(time.time(), 3)}) + "\n")
        if event["event"] == "submitted":
            self.submitted[event["batch_id"]] = event
        else:
            self.collected.add(event["batch_id"])


def read_keys(path: str | None) -> dict[str, dict]:
    if not path or not Path(path).exists():
        return {}
    keys = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        if raw.strip():
            entry = json.loads(raw)
            keys[entry["custom_id"]] = entry
    return keys


class BatchRunner:
    def __init__(self, client, log_path: Path, work_dir: Path, cache: ReplyCache, prices: PriceTable,
                 redactor: Redactor, settings: BatchSettings, sleep: Callable[[float], None] = time.sleep):
        self.client, self.cache, self.prices, self.redactor, self.settings = client, cache, prices, redactor, settings
        self.book = BatchLog(log_path)
        self.work_dir = work_dir
        self.sleep = sleep

    # -- the three steps

    def pending_item_ids(self) -> set[str]:
        ids: set[str] = set()
        for entry in self.book.pending():
            ids.update(read_keys(entry.get("keys_path")))
        return ids

    def adopt(self, batch_id: str, requests: dict[str, PreparedRequest]) -> None:
        """Collect a batch this output's log does not know (``--batch-id``)."""
        if batch_id in self.book.submitted:
            if batch_id in self.book.collected:
                log.info("batch %s was collected before; collecting it again", batch_id)
                self.book.collected.discard(batch_id)
            return
        batch = self._call(self.client.batches.retrieve, batch_id)
        keys_path = self.work_dir / f"{batch_id}.keys.jsonl"
        _write_keys(keys_path, requests.values())
        log.warning("batch %s is not in %s: its replies are keyed by the current models and prompt versions",
                    batch_id, self.book.path)
        self.book.append({"event": "submitted", "batch_id": batch_id, "input_file_id": batch.input_file_id,
                          "input_path": None, "keys_path": str(keys_path), "model": None, "requests": None})

    def submit(self, requests: list[PreparedRequest], budget: CostBudget, report: BatchReport) -> None:
        affordable = []
        for request in requests:
            price = self.prices.price(request.model)
            worst = price.cost(RESERVE_FACTOR * request.estimated_input_tokens, request.max_output_tokens,
                               discount=self.prices.batch_discount)
            try:
                budget.reserve(worst)
            except BudgetExhausted:
                report.left_out_for_cost = len(requests) - len(affordable)
                log.warning("--max-cost: %d requests are not submitted", report.left_out_for_cost)
                break
            affordable.append(request)
        for model, chunk in self._chunks(affordable):
            stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{len(self.book.submitted):04d}"
            input_path = self.work_dir / f"{stamp}.input.jsonl"
            keys_path = self.work_dir / f"{stamp}.keys.jsonl"
            self.work_dir.mkdir(parents=True, exist_ok=True)
            input_path.write_bytes(b"".join(line for _, line in chunk))
            _write_keys(keys_path, [r for r, _ in chunk])
            with open(input_path, "rb") as fh:
                uploaded = self._call(self.client.files.create, file=fh, purpose="batch")
            batch = self._call(self.client.batches.create, input_file_id=uploaded.id, endpoint=ENDPOINT,
                               completion_window="24h", metadata={"created_by": "llark instructions"})
            self.book.append({"event": "submitted", "batch_id": batch.id, "input_file_id": uploaded.id,
                              "input_path": str(input_path), "keys_path": str(keys_path), "model": model,
                              "requests": len(chunk)})
            report.submitted_batches.append(batch.id)
            report.submitted_requests += len(chunk)
            log.info("submitted batch %s: %d requests for %s", batch.id, len(chunk), model)

    def collect_finished(self, report: BatchReport, wait: bool) -> None:
        """Collect pending batches that are done; with ``wait``, poll until all are (or time runs out)."""
        started = time.monotonic()
        while True:
            waiting = []
            for entry in self.book.pending():
                batch = self._retrieve(entry["batch_id"])
                if batch is None:
                    log.warning("batch %s is unknown to %s; its requests will be submitted again",
                                entry["batch_id"], getattr(self.client, "base_url", "the server"))
                    self.book.append({"event": "collected", "batch_id": entry["batch_id"], "status": "not_found",
                                      "answered": 0, "failed": 0})
                    report.resubmit += len(read_keys(entry.get("keys_path")))
                    continue
                if batch.status in TERMINAL:
                    self._collect(entry, batch, report)
                else:
                    waiting.append(f"{batch.id} ({batch.status}{_counts(batch)})")
            if not waiting or not wait:
                report.still_pending = waiting
                return
            if self.settings.max_wait_s is not None and time.monotonic() - started > self.settings.max_wait_s:
                report.still_pending = waiting
                log.warning("stopped waiting after %.0f s; still running: %s", self.settings.max_wait_s, ", ".join(waiting))
                return
            log.info("waiting for %d batches: %s", len(waiting), ", ".join(waiting))
            self.sleep(self.settings.poll_interval_s)

    # -- details

    def _retrieve(self, batch_id: str):
        """The batch, or None when the server does not know it (a log from another account)."""
        return self._call(self.client.batches.retrieve, batch_id, not_found_ok=True)

    def _collect(self, entry: dict, batch: Any, report: BatchReport) -> None:
        keys = read_keys(entry.get("keys_path"))
        seen: set[str] = set()
        answered = failed = 0
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = self._call(self.client.files.content, file_id).read().decode("utf-8")
            for raw in content.splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                custom_id = line.get("custom_id")
                key = keys.get(custom_id)
                if key is None:
                    log.warning("batch %s: result for unknown custom_id %r ignored", batch.id, custom_id)
                    continue
                seen.add(custom_id)
                reply, problem = self._reply_of(line)
                if reply is not None:
                    self._store(key, reply, report)
                    report.failures.pop(custom_id, None)
                    answered += 1
                elif problem[0] in NOT_FAILURES:
                    report.resubmit += 1
                else:
                    report.failures[custom_id] = f"batch {batch.id}: {problem[1]}"
                    failed += 1
        if batch.status == "failed":
            reasons = "; ".join(self.redactor(f"{e.code}: {e.message}") for e in (batch.errors.data if batch.errors and batch.errors.data else []))
            for custom_id in set(keys) - seen:
                report.failures[custom_id] = f"batch {batch.id} failed: {reasons or 'no reason given'}"
                failed += 1
        else:
            report.resubmit += len(set(keys) - seen)
        report.statuses[batch.status] += 1
        report.answered += answered
        report.collected_batches.append(batch.id)
        self.book.append({"event": "collected", "batch_id": batch.id, "status": batch.status,
                          "answered": answered, "failed": failed})
        log.info("collected batch %s (%s): %d replies, %d failed", batch.id, batch.status, answered, failed)

    def _reply_of(self, line: dict) -> tuple[dict | None, tuple[str, str]]:
        response = line.get("response") or {}
        error = line.get("error")
        body = response.get("body") or {}
        if not error and response.get("status_code") == 200 and body.get("choices"):
            return body, ("", "")
        if error:
            return None, (str(error.get("code")), self.redactor(f"{error.get('code')}: {error.get('message')}"))
        message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else body
        return None, ("http", self.redactor(f"HTTP {response.get('status_code')}: {message}"))

    def _store(self, key: dict, body: dict, report: BatchReport) -> None:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        text = (choice.get("message") or {}).get("content") or ""
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        cost = self.prices.price(key["model"]).cost(prompt_tokens or 0, completion_tokens or 0, discount=self.prices.batch_discount)
        report.cost_usd += cost
        self.cache.put(
            CacheKey(key["clip_id"], key["task_family"], key["model"], key["prompt_version"]),
            CachedReply(text=self.redactor.secrets_only(text), finish_reason=choice.get("finish_reason"), backend="openai-batch",
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=round(cost, 8),
                        request_sha256=key["request_sha256"]),
        )

    def _chunks(self, requests: list[PreparedRequest]):
        by_model: dict[str, list[PreparedRequest]] = {}
        for request in requests:
            by_model.setdefault(request.model, []).append(request)
        for model, group in by_model.items():
            chunk, size = [], 0
            for request in group:
                line = (json.dumps({"custom_id": request.item_id, "method": "POST", "url": ENDPOINT,
                                    "body": request.body}, ensure_ascii=False) + "\n").encode("utf-8")
                if len(line) > self.settings.max_bytes:
                    raise StageConfigError(f"--batch-max-mb: the request for {request.item_id} alone is larger than a batch file may be")
                if chunk and (len(chunk) >= self.settings.max_requests or size + len(line) > self.settings.max_bytes):
                    yield model, chunk
                    chunk, size = [], 0
                chunk.append((request, line))
                size += len(line)
            if chunk:
                yield model, chunk

    def _call(self, fn, *args, not_found_ok: bool = False, **kwargs):
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.NotFoundError:
            if not_found_ok:
                return None
            raise RequestsRefused(f"the Batch API has no such object ({self.redactor(str(args))}); stopping") from None
        except openai.APIStatusError as exc:
            detail = self.redactor(f"HTTP {exc.status_code}: {exc.message}")
            if exc.status_code in (401, 403, 404):
                raise RequestsRefused(f"the Batch API refused the request ({detail}); stopping") from None
            raise StageConfigError(f"the Batch API failed ({detail}); rerun the same command to resume") from None
        except openai.APIConnectionError as exc:
            raise StageConfigError(f"cannot reach the Batch API ({self.redactor(str(exc))}); rerun the same command to resume") from None


def _write_keys(path: Path, requests) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps({"custom_id": r.item_id, "clip_id": r.clip_id, "task_family": r.task_family,
                                 "model": r.model, "prompt_version": r.prompt_version,
                                 "request_sha256": r.sha256}) + "\n")


def _counts(batch: Any) -> str:
    counts = getattr(batch, "request_counts", None)
    if not counts:
        return ""
    return f", {counts.completed}/{counts.total} done, {counts.failed} failed"
