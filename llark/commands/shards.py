"""``llark shards``: clip records + instruction records + embeddings → webdataset tar shards."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_runner_options, add_verb, executor_from_args
from llark.commands.embed import OptionalDefaultsFormatter
from pipeline.errors import EXIT_ITEMS_FAILED, EXIT_OK


def register(sub) -> None:
    p = add_verb(
        sub, "shards", "join clips, instructions and embeddings into webdataset shards",
        "Join instruction records (one per clip and task family) with their clip records and\n"
        "embeddings, by clip id, and write webdataset tar shards per split and task family:\n"
        "{name}-{split}-{family}-{encoder}-{000000}.tar, samples shuffled by --seed across shards.\n"
        "Each sample: __key__ <clip id>-<task family>, npy (the embedding), json (the clip record,\n"
        "its Q/A pairs and the encoding's description).\n\n"
        "Output, in --out: the shards, index.json (shard -> sample count, totals; written when every\n"
        "shard is), encoder.json, missing.jsonl (clips or instructions left out, and why), plan.jsonl,\n"
        "shards.jsonl and shards.errors.jsonl. Rerunning resumes; --strict exits 1 when anything\n"
        "is missing or failed.\n\n"
        "Several encoders: --embeddings DIR_A --embeddings DIR_B (or NAME=DIR, needed for two\n"
        "directories of one encoder) puts one array per encoder in each sample, <key>.<NAME>.npy, and\n"
        "encoder.json lists every encoder's manifest by name.",
    )
    p.formatter_class = OptionalDefaultsFormatter
    p.add_argument("--clips", required=True, type=Path, help="clip records (clips.jsonl or augmented.jsonl)")
    p.add_argument("--instructions", required=True, type=Path, help="instruction records (instructions.jsonl)")
    p.add_argument("--embeddings", required=True, action="append", metavar="[NAME=]DIR",
                   help="the embed stage's --embeddings-dir; repeat it for samples of several encoders "
                        "(<key>.<NAME>.npy each; NAME defaults to the directory's encoder name)")
    p.add_argument("--out", required=True, type=Path, help="directory for the shards")
    p.add_argument("--name", default="llark", help="first part of the shard names")
    p.add_argument("--shard-bytes", type=float, default=1e9, help="largest shard size in bytes")
    p.add_argument("--shard-samples", type=int, default=None, help="most samples per shard (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    add_runner_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.shards import build_shards

    summary = build_shards(
        args.clips, args.instructions, args.embeddings, args.out, name=args.name,
        shard_bytes=int(args.shard_bytes), shard_samples=args.shard_samples, seed=args.seed,
        executor=executor_from_args(args), overwrite=args.overwrite, retry_failed=args.retry_failed,
        limit=args.limit, progress=args.progress,
    )
    problems = summary.run.failed_total or sum(summary.missing.values()) or not summary.complete
    return EXIT_ITEMS_FAILED if args.strict and problems else EXIT_OK
