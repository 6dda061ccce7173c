"""What every verb shares: help formatting, the runner's options, option parsing."""

from __future__ import annotations

import argparse

from pipeline.errors import EXIT_ITEMS_FAILED, EXIT_OK
from pipeline.runner import Executor, RunSummary, Stage, StageConfigError, make_executor, run_stage


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_verb(sub, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)


def add_runner_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runner")
    g.add_argument("--workers", type=int, default=None, help="worker processes (default: the number of cores)")
    g.add_argument("--executor", choices=["local", "inline", "ray"], default="local",
                   help="local: worker processes; inline: this process, one item at a time (debugging); "
                   "ray: a Ray cluster (needs the 'ray' extra)")
    g.add_argument("--overwrite", action="store_true", help="forget earlier runs of this output and start over")
    g.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="skip items that failed in an earlier run instead of trying them again")
    g.add_argument("--limit", type=int, default=None, help="process at most this many items not yet done")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines")
    g.add_argument("--strict", action="store_true", help="exit with status 1 when any item failed")
    r = p.add_argument_group("ray executor (with --executor ray)")
    r.add_argument("--address", default="auto",
                   help="the Ray cluster: 'auto' (found from this node), HOST:PORT, or 'local' (start one here)")
    r.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per task or actor")
    r.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per actor")
    r.add_argument("--ray-actors", action="store_true",
                   help="a fixed pool of actors that load the model once (GPU stages) instead of tasks")
    r.add_argument("--ray-batch-size", type=int, default=1, help="items per task or actor call")


def executor_from_args(args) -> Executor:
    if args.workers is not None and args.workers < 1:
        raise StageConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.executor != "ray":
        return make_executor(args.executor, args.workers)
    return make_executor(
        "ray", args.workers, address=args.address, num_cpus=args.ray_num_cpus, num_gpus=args.ray_num_gpus,
        use_actors=args.ray_actors, batch_size=args.ray_batch_size,
    )


def run_stage_from_args(stage: Stage, args) -> int:
    """Run a stage with the runner options of ``args``; the exit status honours ``--strict``."""
    executor = executor_from_args(args)
    summary: RunSummary = run_stage(
        stage, args.input, args.out, executor=executor, retry_failed=args.retry_failed,
        overwrite=args.overwrite, limit=args.limit, progress=args.progress,
    )
    return EXIT_ITEMS_FAILED if args.strict and summary.failed_total else EXIT_OK


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """Decoding, precision and device options of the verbs that generate answers (ask, evaluate)."""
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --sample)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model precision (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
