"""The ``llark`` command: one verb per stage. ``llark VERB --help`` gives its inputs, outputs and defaults."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("llark")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_runner_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runner")
    g.add_argument("--workers", type=int, default=None, help="worker processes (default: the number of cores)")
    g.add_argument("--executor", choices=["local", "inline"], default="local",
                   help="local: worker processes; inline: this process, one item at a time (debugging)")
    g.add_argument("--overwrite", action="store_true", help="forget earlier runs of this output and start over")
    g.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="skip items that failed in an earlier run instead of trying them again")
    g.add_argument("--limit", type=int, default=None, help="process at most this many items not yet done")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines")


def _executor(args):
    from pipeline.runner import StageConfigError, make_executor

    if args.workers is not None and args.workers < 1:
        raise StageConfigError(f"--workers must be at least 1, got {args.workers}")
    return make_executor(args.executor, args.workers)


def _parse_set(pairs: list[str]) -> dict:
    from pipeline.runner import StageConfigError

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise StageConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


# ---------------------------------------------------------------------------------------------
# verbs


def cmd_demo_data(args) -> int:
    from pipeline.demo_data import generate_demo_dataset

    summary = generate_demo_dataset(
        args.out, n_clips=args.clips, seed=args.seed, duration_s=args.duration,
        sample_rate=args.sample_rate, long_tracks=args.long_tracks,
    )
    print(f"demo dataset: {summary}")
    return 0


def cmd_ingest(args) -> int:
    from pipeline.ingest.run import ingest_dataset

    ingest_dataset(args.dataset, args.root, args.out, _parse_set(args.set))
    return 0


def cmd_crop(args) -> int:
    from pipeline.audio import AudioChecks
    from pipeline.crop import CropSettings, crop_stage
    from pipeline.runner import StageConfigError, run_stage

    try:
        settings = CropSettings(
            clips_dir=str(Path(args.clips_dir).resolve()), clip_s=args.clip_seconds, seed=args.seed,
            p_late=args.p_late,
            checks=AudioChecks(min_duration_s=args.min_seconds, silence_dbfs=args.silence_dbfs,
                               max_channels=args.max_channels),
        )
    except ValueError as exc:
        raise StageConfigError(str(exc)) from None
    summary = run_stage(
        crop_stage(settings), args.input, args.out, executor=_executor(args),
        retry_failed=args.retry_failed, overwrite=args.overwrite, limit=args.limit, progress=args.progress,
    )
    return 1 if args.strict and summary.failed_total else 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from pipeline.ingest import ADAPTER_MODULES

    parser = argparse.ArgumentParser(
        prog="llark",
        description="Turn open music datasets into an instruction-tuned music LLM (the LLark recipe).",
        formatter_class=_Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser(
        "demo-data", formatter_class=_Formatter,
        help="synthesise the demo dataset (music clips with known tempo, key, chords, metre, instruments, genre)",
        description="Synthesise the demo dataset deterministically from a seed.\n\n"
        "Output: OUT/metadata.csv, OUT/audio/<split>/<id>.flac, OUT/annotations/<id>.json (ground truth).\n"
        "Does nothing when OUT already holds a dataset made with the same parameters.",
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write the dataset into")
    p.add_argument("--clips", type=int, default=240, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--duration", type=float, default=15.0, help="clip length in seconds")
    p.add_argument("--sample-rate", type=int, default=22050, help="sample rate of the written files")
    p.add_argument("--long-tracks", type=int, default=0, help="also write this many 3-4 minute tracks (for benchmarks)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser(
        "ingest", formatter_class=_Formatter,
        help="read a dataset's metadata into clip records (JSONL)",
        description="Read a dataset in its documented on-disk layout into clip records.\n\n"
        "Input: the dataset directory (--root). Output: OUT (one clip record per line) and\n"
        "OUT's .errors.jsonl (records whose audio file is missing). Datasets: "
        + ", ".join(sorted(ADAPTER_MODULES)) + ".\n"
        "Dataset options go in --set KEY=VALUE (e.g. --set subset=medium for fma).",
    )
    p.add_argument("dataset", choices=sorted(ADAPTER_MODULES), metavar="DATASET", help="dataset name")
    p.add_argument("--root", required=True, type=Path, help="the dataset's directory")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dataset option (repeatable)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "crop", formatter_class=_Formatter,
        help="cut each record's 25 s window into a 44.1 kHz 16-bit mono wav",
        description="Cut the window the model hears out of each source track (the paper's rule: first\n"
        "25 s of a track under 60 s; else [30, 55) s with p=0.8, [0, 25) s otherwise, seeded by the\n"
        "record id). Input: clip records (from `llark ingest`). Output: OUT (clip records with\n"
        "start_s, end_s, clip_path), OUT's .errors.jsonl, and the wavs under --clips-dir.",
    )
    p.add_argument("input", type=Path, help="input JSONL of clip records")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--clips-dir", required=True, type=Path, help="where to write the clip wavs")
    p.add_argument("--clip-seconds", type=float, default=25.0, help="window length")
    p.add_argument("--p-late", type=float, default=0.8, help="probability of the [30, 55) s window for tracks of 60 s or more")
    p.add_argument("--seed", type=int, default=0, help="seed mixed with each record id for the window choice")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest usable clip")
    p.add_argument("--silence-dbfs", type=float, default=-80.0, help="a clip whose peak is below this is silent")
    p.add_argument("--max-channels", type=int, default=8, help="files with more channels are refused")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any item failed")
    _add_runner_options(p)
    p.set_defaults(func=cmd_crop)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.runner import StageConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except StageConfigError as exc:
        print(f"llark {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llark {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
