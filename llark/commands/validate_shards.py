"""``llark validate-shards``: read every sample of a shards directory and check it."""

from __future__ import annotations

import sys
from pathlib import Path

from llark.commands.common import add_verb
from llark.commands.embed import OptionalDefaultsFormatter
from pipeline.errors import EXIT_ITEMS_FAILED, EXIT_OK


def register(sub) -> None:
    p = add_verb(
        sub, "validate-shards", "read every shard sample and check it against encoder.json",
        "Read every sample of every shard in index.json: array dtype and shape against encoder.json,\n"
        "finite values, the JSON schema, keys (duplicates, consecutive files), sample counts, and the\n"
        "tar structure (truncated or corrupt archives are reported with the shard and byte offset).\n"
        "Pickled payloads (.pyd, .pickle, .pth, object arrays) are refused, never decoded.\n"
        "Exit status: 0 when all is well, 1 when anything is wrong (with a summary), 2 when the\n"
        "directory is not a shards directory.",
    )
    p.formatter_class = OptionalDefaultsFormatter
    p.add_argument("shards_dir", type=Path, help="the shards stage's --out directory")
    p.add_argument("--out", type=Path, default=None, help="also write every problem as JSONL here")
    p.add_argument("--workers", type=int, default=None, help="processes reading shards (default: the number of cores)")
    p.add_argument("--list", type=int, default=20, help="problems to print in the summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.runner import StageConfigError
    from pipeline.validate_shards import validate_shards, write_report

    if args.workers is not None and args.workers < 1:
        raise StageConfigError(f"--workers must be at least 1, got {args.workers}")
    report = validate_shards(args.shards_dir, workers=args.workers)
    stream = sys.stdout if report.ok else sys.stderr
    for line in report.lines(args.list):
        print(line, file=stream)
    if args.out is not None:
        write_report(report, args.out)
    return EXIT_OK if report.ok else EXIT_ITEMS_FAILED
