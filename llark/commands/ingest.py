"""``llark ingest``: a dataset's metadata → clip records."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_verb
from llark.options import parse_key_values
from pipeline.errors import EXIT_OK
from pipeline.ingest import ADAPTER_MODULES


def register(sub) -> None:
    p = add_verb(
        sub, "ingest", "read a dataset's metadata into clip records (JSONL)",
        "Read a dataset in its documented on-disk layout into clip records.\n\n"
        "Input: the dataset directory (--root). Output: OUT (one clip record per line) and\n"
        "OUT's .errors.jsonl (records whose audio file is missing). Datasets: "
        + ", ".join(sorted(ADAPTER_MODULES)) + ".\n"
        "Dataset options go in --set KEY=VALUE (e.g. --set subset=medium for fma).",
    )
    p.add_argument("dataset", choices=sorted(ADAPTER_MODULES), metavar="DATASET", help="dataset name")
    p.add_argument("--root", required=True, type=Path, help="the dataset's directory")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dataset option (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.ingest.run import ingest_dataset

    ingest_dataset(args.dataset, args.root, args.out, parse_key_values(args.set))
    return EXIT_OK
