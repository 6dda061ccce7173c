"""Running the instructions stage: configuration, the dry run, the three writers, the summary.

``run_instructions(config)`` checks the whole configuration before any work (an unknown task
family, a negative cost cap, a backend that needs an API key with none set, a model without a
price: each fails naming its option), builds the items, runs them on the shared runner, rewrites
the output without private keys, and prints what happened: records, pairs kept, pairs dropped per
reason, and for the API writers the requests sent, retries, cache hits and money spent.

Backends: ``template`` (offline, deterministic), ``openai`` (chat completions now, bounded
concurrency), ``openai-batch`` (the Batch API), and ``auto``: ``openai`` when an API key or a base
URL is configured, else ``template``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.instructions.chat import ClientSettings
from pipeline.instructions.costs import PriceTable
from pipeline.instructions.filtering import FilterSettings
from pipeline.instructions.prompts import PromptSet, load_prompt_set
from pipeline.instructions.stage import (
    STAGE_NAME,
    WriterSettings,
    answer_with_llm,
    build_items,
    finalize_outputs,
    is_given_caption,
    items_path,
    rejected_path,
    write_items,
    write_with_templates,
)
from pipeline.files import is_disk_failure, remove_dead_temporaries
from pipeline.records import TASK_FAMILIES
from pipeline.runner import OutputLock, Stage, StageConfigError, ledger_path, make_executor, run_stage, stopped_by_disk

log = logging.getLogger("llark")

BACKENDS = ("auto", "template", "openai", "openai-batch")
# The paper's choice (LLark §G.1.1): GPT-3.5-turbo for understanding and captioning, GPT-4 for reasoning.
DEFAULT_MODELS = {"understanding": "gpt-3.5-turbo", "captioning": "gpt-3.5-turbo", "reasoning": "gpt-4"}
DEFAULT_MAX_OUTPUT_TOKENS = {"understanding": 2000, "captioning": 1200, "reasoning": 3000}
# Typical reply lengths for these prompts, for the dry run's "expected" column (an assumption).
EXPECTED_OUTPUT_TOKENS = {"understanding": 600, "captioning": 400, "reasoning": 1100}
REASONING_CLIPS_PER_DATASET = 25_000  # the paper's cap on reasoning tracks per dataset
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")


@dataclass
class InstructionsConfig:
    input: Path
    output: Path
    backend: str = "auto"
    families: tuple[str, ...] = TASK_FAMILIES
    seed: int = 0
    concise_answers: bool = False  # the template writer's understanding answers: the bare fact
    prompts_dir: Path | None = None
    models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = ClientSettings.concurrency
    request_timeout_s: float = ClientSettings.timeout_s
    max_attempts: int = ClientSettings.max_attempts
    backoff_base_s: float = ClientSettings.backoff_base_s
    max_output_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_OUTPUT_TOKENS))
    temperature: float | None = None
    max_cost: float | None = None
    prices_path: Path | None = None
    price_overrides: dict = field(default_factory=dict)
    dry_run: bool = False
    cache_path: Path | None = None
    reasoning_clips_per_dataset: int = REASONING_CLIPS_PER_DATASET
    reask_unusable: bool = False
    batch_id: str | None = None
    batch_poll_s: float = 60.0
    batch_wait: bool = True
    batch_max_wait_s: float | None = None
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 190_000_000
    # the runner's options
    executor: str = "local"
    workers: int | None = None
    overwrite: bool = False
    retry_failed: bool = True
    limit: int | None = None
    progress: bool = True
    make_template_executor: Callable[[], object] | None = None  # the template writer's executor (default: local)


@dataclass
class Plan:
    """A checked configuration: what will run, with what."""

    config: InstructionsConfig
    backend: str
    prompt_set: PromptSet
    settings: WriterSettings
    base_url: str | None = None
    api_key: str | None = None
    prices: "PriceTable | None" = None  # the API writers only

    @property
    def uses_api(self) -> bool:
        return self.backend in ("openai", "openai-batch")

    def cache_path(self) -> Path:
        out = self.config.output
        stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
        return self.config.cache_path or out.with_name(stem + ".replies.jsonl")


def plan_run(cfg: InstructionsConfig, environ: dict | None = None) -> Plan:
    """Check every option and resolve the backend; raise StageConfigError naming the option."""
    environ = os.environ if environ is None else environ
    if cfg.backend not in BACKENDS:
        raise StageConfigError(f"--backend: unknown backend {cfg.backend!r} (choose from {', '.join(BACKENDS)})")
    unknown = [f for f in cfg.families if f not in TASK_FAMILIES]
    if unknown or not cfg.families:
        raise StageConfigError(f"--families: unknown task family {', '.join(map(repr, unknown)) or '(none given)'} "
                               f"(choose from {', '.join(TASK_FAMILIES)})")
    if cfg.max_cost is not None and not cfg.max_cost >= 0:
        raise StageConfigError(f"--max-cost must be a non-negative amount in USD, got {cfg.max_cost}")
    for option, value, low in (("--concurrency", cfg.concurrency, 1), ("--max-attempts", cfg.max_attempts, 1),
                               ("--reasoning-clips-per-dataset", cfg.reasoning_clips_per_dataset, 0),
                               ("--batch-max-requests", cfg.batch_max_requests, 1)):
        if value < low:
            raise StageConfigError(f"{option} must be at least {low}, got {value}")
    if not cfg.request_timeout_s > 0:
        raise StageConfigError(f"--request-timeout must be positive, got {cfg.request_timeout_s}")
    if cfg.limit is not None and cfg.limit < 0:
        raise StageConfigError(f"--limit must be at least 0, got {cfg.limit}")
    for family, n in cfg.max_output_tokens.items():
        if n < 1:
            raise StageConfigError(f"--max-output-tokens must be at least 1, got {n} for {family}")
    if not Path(cfg.input).is_file():
        raise StageConfigError(f"input file {cfg.input} does not exist")

    prompt_set = load_prompt_set(cfg.prompts_dir)
    base_url = cfg.base_url or environ.get("OPENAI_BASE_URL") or None
    api_key = environ.get(cfg.api_key_env) or None
    backend = cfg.backend
    if backend == "auto":
        backend = "openai" if (api_key or base_url) else "template"
        if backend == "openai":
            log.info("backend: openai (%s); pass --backend template for the offline writer",
                     f"${cfg.api_key_env} is set" if api_key else f"base URL {base_url}")
    families = tuple(f for f in TASK_FAMILIES if f in cfg.families)
    common = dict(
        families=families, reasoning_clips_per_dataset=cfg.reasoning_clips_per_dataset, seed=cfg.seed,
        filters=FilterSettings(prompt_set.question_phrases, prompt_set.answer_phrases),
        caption_questions=prompt_set.caption_questions, captions_as_given=prompt_set.captions_as_given,
    )
    if backend == "template":
        return Plan(config=cfg, backend=backend, prompt_set=prompt_set,
                    settings=WriterSettings(writer="template", concise=cfg.concise_answers, **common))
    if cfg.concise_answers:
        raise StageConfigError(f"--concise-answers: only the template writer has it (the backend is {backend}); "
                               "the language models' prompts set their answers' style")

    from pipeline.instructions.chat import OPENAI_BASE_URL

    base_url = base_url or OPENAI_BASE_URL
    if api_key is None and base_url.rstrip("/") == OPENAI_BASE_URL:
        raise StageConfigError(
            f"--backend {backend} needs an API key: set ${cfg.api_key_env} (or name another variable with "
            "--api-key-env), or point --base-url at a server of your own"
        )
    if backend == "openai-batch" and base_url.rstrip("/") != OPENAI_BASE_URL:
        log.info("--backend openai-batch with base URL %s: the server must implement the files and batches endpoints", base_url)
    models = {f: cfg.models.get(f) or DEFAULT_MODELS[f] for f in families}
    prices = PriceTable.load(cfg.prices_path or prompt_set.prices_path, cfg.price_overrides)
    for model in sorted(set(models.values())):
        prices.price(model)
    settings = WriterSettings(
        writer="llm", models=models, prompt_versions=prompt_set.all_prompt_versions(),
        max_output_tokens={f: int(cfg.max_output_tokens.get(f, DEFAULT_MAX_OUTPUT_TOKENS[f])) for f in families},
        temperature=cfg.temperature, **common,
    )
    return Plan(config=cfg, backend=backend, prompt_set=prompt_set, settings=settings, base_url=base_url,
                api_key=api_key, prices=prices)


# ---------------------------------------------------------------------------------------------


def run_instructions(cfg: InstructionsConfig, environ: dict | None = None, say: Callable[[str], None] = print) -> int:
    """Run (or, with ``dry_run``, price) the stage; returns the number of failed items."""
    plan = plan_run(cfg, environ)
    rows, items_summary = build_items(Path(cfg.input), plan.settings)
    if plan.settings.writer == "llm":
        # Record the versions of the prompts this input uses, so that editing another dataset's
        # prompt does not make the runner refuse this output.
        used = {f"{r['dataset']}/{r['task_family']}" for r in rows if "dataset" in r}
        plan.settings = dataclasses.replace(
            plan.settings, prompt_versions={k: v for k, v in plan.settings.prompt_versions.items() if k in used})
    for line in _items_lines(items_summary, plan):
        say(line)
    if cfg.dry_run:
        for line in dry_run_lines(plan, rows):
            say(line)
        return 0
    output = Path(cfg.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # The items file is shared by the runs of this output: take its lock before rewriting it
        # (run_stage then takes the output's own lock as usual).
        lock = OutputLock(items_path(output), STAGE_NAME)
        with lock:
            owned = {items_path(output).name, rejected_path(output).name}
            remove_dead_temporaries(output.parent, lambda name: name in owned or lock.owns_temporary(name))
            write_items(rows, items_path(output))
            if plan.backend == "template":
                stage = Stage(name=STAGE_NAME, process=write_with_templates, settings=plan.settings)
                executor = (cfg.make_template_executor() if cfg.make_template_executor
                            else make_executor(cfg.executor, cfg.workers))
                summary = run_stage(stage, items_path(output), output, executor=executor,
                                    retry_failed=cfg.retry_failed, overwrite=cfg.overwrite, limit=cfg.limit,
                                    progress=cfg.progress)
                extra: list[str] = []
            else:
                if cfg.executor != "local" or cfg.workers is not None:
                    log.info("--executor and --workers apply to the template writer; the API writers run up to "
                             "--concurrency requests from this process")
                summary, extra = _run_with_llm(plan, output)
            lines = finalize_outputs(output).lines(rejected_path(output)) + extra
    except OSError as exc:
        if not is_disk_failure(exc):
            raise
        raise stopped_by_disk(STAGE_NAME, exc, f"The items finished so far are kept in {ledger_path(output)}") from None
    for line in lines:
        say(line)
    return summary.failed_total


def _run_with_llm(plan: Plan, output: Path):
    from pipeline.instructions.async_executor import AsyncExecutor
    from pipeline.instructions.cache import ReplyCache
    from pipeline.instructions.chat import ChatClient, Redactor
    from pipeline.instructions.costs import CostBudget
    from pipeline.instructions.llm import LLMRuntime

    cfg = plan.config
    redactor = Redactor([plan.api_key] if plan.api_key else [])
    client_settings = ClientSettings(base_url=plan.base_url, timeout_s=cfg.request_timeout_s,
                                     max_attempts=cfg.max_attempts, backoff_base_s=cfg.backoff_base_s,
                                     concurrency=cfg.concurrency)
    api_key = plan.api_key or "no-key-needed"
    runtime = LLMRuntime(
        settings=plan.settings, prompt_set=plan.prompt_set, cache=ReplyCache(plan.cache_path()), prices=plan.prices,
        budget=CostBudget(cfg.max_cost), mode=plan.backend, redactor=redactor, reask_unusable=cfg.reask_unusable,
        client_factory=lambda: ChatClient(client_settings, api_key, redactor),
    )
    extra: list[str] = []
    with redacted_logging(redactor):
        batch_report = None
        if plan.backend == "openai-batch":
            batch_report = _batch_phase(plan, runtime, output, api_key, redactor)
            runtime.batch_failures = batch_report.failures
        stage = Stage(name=STAGE_NAME, process=answer_with_llm, settings=plan.settings, setup=lambda _settings: runtime)
        executor = AsyncExecutor(cfg.concurrency, redact=redactor)
        summary = run_stage(stage, items_path(output), output, executor=executor, retry_failed=cfg.retry_failed,
                            overwrite=cfg.overwrite, limit=cfg.limit, progress=cfg.progress)
    stats, client = runtime.stats, runtime._client
    if plan.backend == "openai":
        retries = client.stats.retries if client else Counter()
        retry_text = ", ".join(f"{k} {n}" for k, n in retries.most_common()) or "none"
        extra.append(f"{STAGE_NAME}: openai at {plan.base_url}: {stats.answered} replies to {stats.sent} requests "
                     f"(retries: {retry_text}), {stats.cache_hits} replies from the cache "
                     f"{plan.cache_path()}, spent ${stats.cost_usd:.4f}")
    else:
        extra += _batch_lines(batch_report, plan)
        extra.append(f"{STAGE_NAME}: {stats.cache_hits} replies read from the cache {plan.cache_path()}")
    if stats.stale_cache_hits:
        extra.append(f"{STAGE_NAME}: {stats.stale_cache_hits} cached replies were made from a different request for the "
                     "same clip, family, model and prompt version (the clip's JSON changed); move the cache away to re-ask")
    deferred = executor.deferred
    if deferred.get("max_cost"):
        extra.append(f"{STAGE_NAME}: stopped sending at --max-cost ${cfg.max_cost:.2f}: {deferred['max_cost']} items "
                     "not sent; rerun with a higher cap to continue")
    if deferred.get("awaiting_batch_reply"):
        extra.append(f"{STAGE_NAME}: {deferred['awaiting_batch_reply']} items wait for a batch reply; rerun the same "
                     "command to collect them")
    return summary, extra


def _batch_phase(plan: Plan, runtime, output: Path, api_key: str, redactor):
    from openai import OpenAI

    from pipeline.instructions.batch import BatchReport, BatchRunner, BatchSettings

    cfg = plan.config
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    log_path = output.with_name(stem + ".batches.jsonl")
    settings = BatchSettings(poll_interval_s=cfg.batch_poll_s, wait=cfg.batch_wait, max_wait_s=cfg.batch_max_wait_s,
                             max_requests=cfg.batch_max_requests, max_bytes=cfg.batch_max_bytes)
    client = OpenAI(api_key=api_key, base_url=plan.base_url, max_retries=5, timeout=cfg.request_timeout_s)
    report = BatchReport()
    with OutputLock(log_path, "instructions-batch"):
        runner = BatchRunner(client, log_path, output.with_name(stem + ".batches"), runtime.cache, plan.prices,
                             redactor, settings)
        rows = [r for r in _read_rows(items_path(output)) if "invalid_clip" not in r and not is_given_caption(r, plan.settings)]
        requests = {}
        for row in rows:
            if plan.prompt_set.has_prompt(row["dataset"], row["task_family"]):
                requests[row["id"]] = runtime.request_for(row)
        if cfg.batch_id:
            runner.adopt(cfg.batch_id, requests)
        runner.collect_finished(report, wait=False)
        in_flight = runner.pending_item_ids()
        needed = [r for r in requests.values() if r.item_id not in in_flight and runtime.cached_reply(r) is None]
        if cfg.limit is not None:
            needed = needed[: cfg.limit]
        if needed:
            runner.submit(needed, runtime.budget, report)
        if runner.book.pending():
            runner.collect_finished(report, wait=cfg.batch_wait)
    client.close()
    return report


def _batch_lines(report, plan: Plan) -> list[str]:
    if report is None:
        return []
    lines = []
    if report.submitted_batches:
        lines.append(f"{STAGE_NAME}: submitted {report.submitted_requests} requests in {len(report.submitted_batches)} "
                     f"batches: {', '.join(report.submitted_batches)}")
    if report.left_out_for_cost:
        lines.append(f"{STAGE_NAME}: {report.left_out_for_cost} requests not submitted: --max-cost "
                     f"${plan.config.max_cost:.2f} reached")
    if report.collected_batches:
        statuses = ", ".join(f"{s} {n}" for s, n in report.statuses.most_common())
        lines.append(f"{STAGE_NAME}: collected {len(report.collected_batches)} batches ({statuses}): {report.answered} "
                     f"replies, {len(report.failures)} failed requests, {report.resubmit} to submit again; "
                     f"cost ${report.cost_usd:.4f} at the batch price")
    if report.still_pending:
        lines.append(f"{STAGE_NAME}: still running: {', '.join(report.still_pending)}; rerun the same command to collect")
    return lines


def _read_rows(path: Path) -> list[dict]:
    from pipeline.records import read_jsonl

    return read_jsonl(path)


# ---------------------------------------------------------------------------------------------
# What gets printed


def _items_lines(summary, plan: Plan) -> list[str]:
    by_family = ", ".join(f"{f} {summary.items[f]}" for f in TASK_FAMILIES if summary.items.get(f))
    lines = [f"{STAGE_NAME}: {sum(summary.items.values())} items ({by_family or 'none'}) from {summary.clips} clip "
             f"records; writer: {plan.backend}"]
    if summary.invalid_clips:
        lines.append(f"{STAGE_NAME}: {summary.invalid_clips} lines are not valid clip records (reported as errors)")
    if summary.no_family:
        lines.append(f"{STAGE_NAME}: {summary.no_family} clips feed no task family (evaluation splits)")
    if summary.reasoning_left_out:
        lines.append(f"{STAGE_NAME}: {summary.reasoning_left_out} clips left out of reasoning "
                     f"(--reasoning-clips-per-dataset {plan.config.reasoning_clips_per_dataset})")
    return lines


def dry_run_lines(plan: Plan, rows: list[dict]) -> list[str]:
    """Requests, estimated tokens and price per model, for the items without a cached reply."""
    if not plan.uses_api:
        return [f"{STAGE_NAME} (dry run): the template writer sends no request; cost $0.00"]
    from pipeline.instructions.cache import ReplyCache
    from pipeline.instructions.chat import Redactor
    from pipeline.instructions.costs import RESERVE_FACTOR, TOKEN_ESTIMATE_NOTE, CostBudget
    from pipeline.instructions.llm import LLMRuntime

    runtime = LLMRuntime(settings=plan.settings, prompt_set=plan.prompt_set, cache=ReplyCache(plan.cache_path()),
                         prices=plan.prices, budget=CostBudget(None), mode=plan.backend, redactor=Redactor())
    discount = plan.prices.batch_discount if plan.backend == "openai-batch" else 1.0
    per_model: dict[str, Counter] = {}
    cached = given = no_prompt = 0
    for row in rows:
        if "invalid_clip" in row:
            continue
        if is_given_caption(row, plan.settings):
            given += 1
            continue
        if not plan.prompt_set.has_prompt(row["dataset"], row["task_family"]):
            no_prompt += 1
            continue
        request = runtime.request_for(row)
        if runtime.cached_reply(request) is not None:
            cached += 1
            continue
        c = per_model.setdefault(request.model, Counter())
        c["requests"] += 1
        c["input"] += request.estimated_input_tokens
        c["expected_output"] += min(EXPECTED_OUTPUT_TOKENS[request.task_family], request.max_output_tokens)
        c["max_output"] += request.max_output_tokens
    runtime.cache.close()
    where = f"{plan.backend} at {plan.base_url}" + (f" (Batch API: {discount:g} x the standard price)" if discount != 1.0 else "")
    lines = [f"{STAGE_NAME} (dry run): {where}; nothing is sent or written",
             f"{STAGE_NAME} (dry run): {cached} items already answered in {plan.cache_path()} (free), "
             f"{given} captions used as given (free)" + (f", {no_prompt} items without a prompt (will fail)" if no_prompt else "")]
    lines.append(f"{'model':24s} {'requests':>9s} {'input tok':>11s} {'output tok':>11s} {'out tok max':>12s} "
                 f"{'$/1M in':>8s} {'$/1M out':>9s} {'cost':>10s} {'cost max':>10s}")
    total_expected = total_max = 0.0
    total_requests = 0
    for model, c in sorted(per_model.items()):
        price = plan.prices.price(model)
        expected = price.cost(c["input"], c["expected_output"], discount)
        worst = price.cost(RESERVE_FACTOR * c["input"], c["max_output"], discount)
        total_expected += expected
        total_max += worst
        total_requests += c["requests"]
        lines.append(f"{model:24s} {c['requests']:9,d} {c['input']:11,d} {c['expected_output']:11,d} {c['max_output']:12,d} "
                     f"{price.input_per_million:8.2f} {price.output_per_million:9.2f} {_usd(expected):>10s} {_usd(worst):>10s}")
    lines.append(f"{'total':24s} {total_requests:9,d} {'':11s} {'':11s} {'':12s} {'':8s} {'':9s} "
                 f"{_usd(total_expected):>10s} {_usd(total_max):>10s}")
    lines.append(f"{STAGE_NAME} (dry run): {TOKEN_ESTIMATE_NOTE}; 'output tok' and 'cost' assume replies of about "
                 + ", ".join(f"{n} tokens for {f}" for f, n in EXPECTED_OUTPUT_TOKENS.items())
                 + f"; the 'max' columns assume every reply at its token limit and the input estimate x{RESERVE_FACTOR}")
    if plan.config.max_cost is not None:
        lines.append(f"{STAGE_NAME} (dry run): --max-cost ${plan.config.max_cost:.2f} stops sending before the "
                     "spent plus in-flight worst case would pass it")
    return lines


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


@contextlib.contextmanager
def redacted_logging(redactor):
    """While the stage runs, every log handler scrubs the API key from what it writes."""
    from pipeline.instructions.chat import RedactingLogFilter

    log_filter = RedactingLogFilter(redactor)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(log_filter)
    # The HTTP libraries log every request at INFO; keep that for -v (DEBUG) only.
    quieted = [logging.getLogger(n) for n in HTTP_LOGGERS]
    levels = [lg.level for lg in quieted]
    for lg in quieted:
        if lg.getEffectiveLevel() > logging.DEBUG:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)
        for lg, level in zip(quieted, levels):
            lg.setLevel(level)
