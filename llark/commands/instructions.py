"""``llark instructions``: clip records → question/answer pairs per task family."""

from __future__ import annotations

import argparse
from pathlib import Path

from llark.commands.common import add_runner_options, add_verb, executor_from_args
from pipeline.errors import EXIT_ITEMS_FAILED, EXIT_OK


def register(sub) -> None:
    from pipeline.instructions.run import BACKENDS, DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_MODELS
    from pipeline.instructions.run import InstructionsConfig as DEFAULTS  # its fields' defaults

    p = add_verb(
        sub, "instructions", "write question/answer pairs for each clip and task family (template writer or an LLM)",
        "For each clip record and each of its task families (understanding, captioning, reasoning),\n"
        "write question/answer pairs from the clip's JSON (its dataset's annotations and the augmented\n"
        "tempo, key, chords and beat grid), drop the pairs that break the prompts' rules, and write one\n"
        "instruction record per (clip, family). MusicCaps and YT8M-MusicTextClips captions are used as\n"
        "given.\n\n"
        "Writers (--backend): template (offline, deterministic from --seed), openai (chat completions,\n"
        "also any OpenAI-compatible server via --base-url), openai-batch (the Batch API: half the price,\n"
        "replies within 24 h; rerun the same command to collect), auto (openai when $OPENAI_API_KEY or\n"
        "a base URL is set, else template). The API key is read from the environment only.\n\n"
        "Outputs beside OUT: OUT.rejected.jsonl (dropped pairs with reasons), OUT.errors.jsonl,\n"
        "OUT.replies.jsonl (the reply cache: no request is paid for twice), OUT.batches.jsonl.\n"
        "Cost: --dry-run prints requests, estimated tokens and price; --max-cost stops sending before\n"
        "passing a cap.",
    )
    p.add_argument("input", type=Path, nargs="?", help="input JSONL of clip records (with or without augmented features)")
    p.add_argument("--out", type=Path, help="output JSONL of instruction records (required unless --show-prompt)")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULTS.backend, help="who writes the pairs")
    p.add_argument("--families", default=",".join(DEFAULTS.families),
                   help="comma-separated task families to write (each clip also lists its own)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the template writer and of the caption questions")
    p.add_argument("--concise-answers", action="store_true",
                   help="template writer: understanding answers state only the fact ('Db major.', '115 BPM.')")
    p.add_argument("--reasoning-clips-per-dataset", type=int, default=DEFAULTS.reasoning_clips_per_dataset,
                   help="at most this many clips per dataset get reasoning pairs (the paper's cap); 0: no cap")
    p.add_argument("--prompts-dir", type=Path, default=None,
                   help="where the prompts are; unset: $LLARK_PROMPTS_DIR, else prompts/ of the checkout, else ./prompts")
    p.add_argument("--show-prompt", nargs=2, metavar=("DATASET", "FAMILY"),
                   help="print the assembled system prompt and its version, and exit")

    api = p.add_argument_group("language models (openai, openai-batch)")
    api.add_argument("--model", default=None, help="the model for every family (overrides the per-family defaults)")
    for family, model in DEFAULT_MODELS.items():
        api.add_argument(f"--{family}-model", default=argparse.SUPPRESS, help=f"the model for {family} (default: {model})")
    api.add_argument("--base-url", default=None,
                     help="an OpenAI-compatible server, e.g. http://localhost:8000/v1 for vLLM; unset: "
                          "$OPENAI_BASE_URL, else OpenAI")
    api.add_argument("--api-key-env", default=DEFAULTS.api_key_env, help="the environment variable holding the API key")
    api.add_argument("--concurrency", type=int, default=DEFAULTS.concurrency, help="requests in flight at once (openai)")
    api.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout_s,
                     help="seconds to wait for one reply")
    api.add_argument("--max-attempts", type=int, default=DEFAULTS.max_attempts,
                     help="attempts per request on 429, 5xx, timeouts and connection errors")
    api.add_argument("--max-output-tokens", type=int, default=None,
                     help="reply token limit for every family; unset: "
                          + ", ".join(f"{f} {n}" for f, n in DEFAULT_MAX_OUTPUT_TOKENS.items()))
    api.add_argument("--temperature", type=float, default=None, help="sampling temperature; unset: the server's")
    api.add_argument("--reask-unusable", action="store_true",
                     help="send again the requests whose cached reply held no usable pair (costs money)")

    cost = p.add_argument_group("cost")
    cost.add_argument("--dry-run", action="store_true",
                      help="print the number of requests, estimated tokens and price; send and write nothing")
    cost.add_argument("--max-cost", type=float, default=None,
                      help="USD this run may spend; sending stops cleanly before passing it")
    cost.add_argument("--price", action="append", default=[], metavar="MODEL=INPUT,OUTPUT",
                      help="USD per million input and output tokens for a model (repeatable)")
    cost.add_argument("--prices", type=Path, default=None, help="a prices file; unset: prompts/model_prices.yaml")
    cost.add_argument("--cache", type=Path, default=None,
                      help="the reply cache; unset: OUT's .replies.jsonl. Share one between outputs to reuse replies")

    batch = p.add_argument_group("Batch API (openai-batch)")
    batch.add_argument("--batch-id", default=None, help="collect this batch (e.g. one submitted from another machine)")
    batch.add_argument("--poll-interval", type=float, default=DEFAULTS.batch_poll_s, help="seconds between status checks")
    batch.add_argument("--no-wait", dest="batch_wait", action="store_false",
                       help="submit (and collect what is finished), then exit; rerun to collect the rest")
    batch.add_argument("--max-wait", type=float, default=None, help="stop waiting for batches after this many seconds")
    batch.add_argument("--batch-max-requests", type=int, default=DEFAULTS.batch_max_requests,
                       help="requests per batch file (API limit 50,000)")
    batch.add_argument("--batch-max-mb", type=float, default=DEFAULTS.batch_max_bytes / 1_000_000,
                       help="MB per batch file (API limit 200)")
    add_runner_options(p)
    p.set_defaults(func=run)


def config_from_args(args):
    from pipeline.instructions.costs import parse_price
    from pipeline.instructions.run import DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_MODELS, InstructionsConfig
    from pipeline.runner import StageConfigError

    if args.workers is not None and args.workers < 1:
        raise StageConfigError(f"--workers must be at least 1, got {args.workers}")
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    models = {f: getattr(args, f"{f}_model", None) or args.model or m for f, m in DEFAULT_MODELS.items()}
    max_tokens = {f: args.max_output_tokens or n for f, n in DEFAULT_MAX_OUTPUT_TOKENS.items()}
    if args.batch_max_mb <= 0:
        raise StageConfigError(f"--batch-max-mb must be positive, got {args.batch_max_mb}")
    return InstructionsConfig(
        input=args.input, output=args.out, backend=args.backend, families=families, seed=args.seed,
        concise_answers=args.concise_answers,
        prompts_dir=args.prompts_dir, models=models, base_url=args.base_url, api_key_env=args.api_key_env,
        concurrency=args.concurrency, request_timeout_s=args.request_timeout, max_attempts=args.max_attempts,
        max_output_tokens=max_tokens, temperature=args.temperature, max_cost=args.max_cost,
        prices_path=args.prices, price_overrides=dict(parse_price(p) for p in args.price), dry_run=args.dry_run,
        cache_path=args.cache, reasoning_clips_per_dataset=args.reasoning_clips_per_dataset,
        reask_unusable=args.reask_unusable, batch_id=args.batch_id, batch_poll_s=args.poll_interval,
        batch_wait=args.batch_wait, batch_max_wait_s=args.max_wait, batch_max_requests=args.batch_max_requests,
        batch_max_bytes=int(args.batch_max_mb * 1_000_000), executor=args.executor, workers=args.workers,
        overwrite=args.overwrite, retry_failed=args.retry_failed, limit=args.limit, progress=args.progress,
        make_template_executor=lambda: executor_from_args(args),
    )


def run(args) -> int:
    from pipeline.instructions.prompts import load_prompt_set
    from pipeline.instructions.run import run_instructions

    if args.show_prompt:
        dataset, family = args.show_prompt
        prompts = load_prompt_set(args.prompts_dir)
        if not prompts.has_prompt(dataset, family):
            from pipeline.runner import StageConfigError

            available = ", ".join(f"{d} {f}" for d, fams in sorted(prompts.datasets.items()) for f in fams)
            raise StageConfigError(f"--show-prompt: no {family} prompt for {dataset} (available: {available})")
        print(f"# {dataset} / {family}, prompt version {prompts.prompt_version(dataset, family)}\n")
        print(prompts.system_prompt(dataset, family), end="")
        return EXIT_OK
    if args.input is None or args.out is None:
        from pipeline.runner import StageConfigError

        raise StageConfigError("the input file and --out are required (except with --show-prompt)")
    failed = run_instructions(config_from_args(args))
    return EXIT_ITEMS_FAILED if args.strict and failed else EXIT_OK
