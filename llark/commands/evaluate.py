"""``llark evaluate``: run a trained model over an evaluation set and score its answers."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_generation_options, add_verb
from llark.options import parse_key_values


def register(sub) -> None:
    from llark.evaluate.run import max_new_tokens_defaults
    from llark.evaluate.tasks import DEFAULT_MAX_NEW_TOKENS, registered

    from llark.commands.embed import OptionalDefaultsFormatter

    tasks = registered()
    names = [task.name for task in tasks]
    prompts = "; ".join(f"{task.name}: {task.prompt!r}" for task in tasks if task.name in ("key", "tempo", "metre"))
    lengths = ", ".join(f"{name} {n}" for name, n in max_new_tokens_defaults().items())
    p = add_verb(
        sub, "evaluate", "score a trained model on evaluation clips (key, tempo, genre, instruments, captions, ...)",
        "Ask a trained model the papers' questions about every evaluation clip and score its answers.\n\n"
        "Input: the exported model (train output_dir/final), clip records (the crop stage's clips.jsonl\n"
        "or augmented.jsonl of an ingested evaluation set: giantsteps_key, giantsteps_tempo, gtzan,\n"
        "medleydb, musicnet test, musiccaps test, or the demo data's valid/test splits) and their\n"
        "embeddings (`llark embed`, the same encoder as the model's).\n\n"
        "Tasks: " + ", ".join(names) + " (each clip gets the tasks its dataset has references for).\n\n"
        "Output, in --out: generations.jsonl (answers, written as they come; a rerun resumes),\n"
        "predictions.jsonl (question, reference, answer, parsed value, score, unparseable),\n"
        "summary.json (metrics with 95% intervals), report.md and confusion_*.png (key, genre).\n"
        "--shuffle-control repeats the run with each clip's embedding swapped for another clip's\n"
        "(*.shuffled.jsonl): a model that uses the audio falls to chance there.\n"
        "--rescore re-scores the answers already in --out without loading the model.",
    )
    p.formatter_class = OptionalDefaultsFormatter
    p.add_argument("checkpoint", type=Path, nargs="?", help="exported model directory (train output_dir/final)")
    p.add_argument("--clips", type=Path, help="clip records JSONL (clips.jsonl or augmented.jsonl)")
    p.add_argument("--embeddings", action="append", default=None, metavar="[NAME=]DIR",
                   help="the embed stage's directory for these clips; for a model of several encoders, one "
                        "NAME=DIR per encoder (the names it was trained with)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--tasks", default=",".join(names), help="comma-separated tasks")
    p.add_argument("--split", default=None, help="comma-separated splits to evaluate (default: all records)")
    p.add_argument("--dataset", default=None, help="comma-separated datasets to evaluate (default: all)")
    p.add_argument("--prompt", action="append", default=None, metavar="TASK=TEXT",
                   help=f"replace a task's question (defaults: {prompts}; ...)")
    p.add_argument("--shuffle-control", action="store_true", help="also run with embeddings shuffled across clips")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffled-audio control")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many clips")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    p.add_argument("--max-new-tokens", action="append", default=None, metavar="TASK=N",
                   help=f"answer length limit per task (default {DEFAULT_MAX_NEW_TOKENS}; {lengths})")
    add_generation_options(p)
    p.add_argument("--overwrite", action="store_true", help="discard earlier answers in --out and start over")
    p.add_argument("--rescore", action="store_true", help="only re-score the answers already in --out")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from llark.evaluate.report import summary_table
    from llark.evaluate.run import EvalConfigError, evaluate, score_run
    from llark.inference import InferenceError, load

    try:
        if args.rescore:
            summary = score_run(args.out)
        else:
            missing = [name for name, value in (("CHECKPOINT", args.checkpoint), ("--clips", args.clips),
                                                ("--embeddings", args.embeddings)) if value is None]
            if missing:
                raise EvalConfigError(f"{', '.join(missing)} required (or --rescore)")
            prompts = {k: str(v) for k, v in parse_key_values(args.prompt or [], "--prompt").items()}
            max_new = {k: int(v) for k, v in parse_key_values(args.max_new_tokens or [], "--max-new-tokens").items()}
            generation = {"do_sample": args.sample}
            if args.sample:
                generation.update(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            embeddings = embedding_dirs(args.embeddings)
            llark = load(args.checkpoint, args.dtype, args.device)
            summary = evaluate(
                llark, args.clips, embeddings, args.out, _split(args.tasks), _split(args.split), prompts,
                generation, max_new, args.shuffle_control, args.shuffle_seed, args.batch_size, args.limit,
                _split(args.dataset), args.overwrite)
    except (EvalConfigError, InferenceError) as exc:
        print(f"llark evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    print(f"\nreport: {args.out / 'report.md'}  predictions: {args.out / 'predictions.jsonl'}")
    return 0


def embedding_dirs(values: list[str]):
    """One ``DIR``, or ``{name: DIR}`` from ``NAME=DIR`` values (one per encoder of a fusion model)."""
    from llark.evaluate.run import EvalConfigError

    if len(values) == 1 and "=" not in values[0]:
        return Path(values[0])
    dirs = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise EvalConfigError(f"--embeddings: NAME=DIR for each encoder of a model of several, got {value!r}")
        if name.strip() in dirs:
            raise EvalConfigError(f"--embeddings: {name.strip()} given twice")
        dirs[name.strip()] = Path(directory.strip())
    return dirs


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
