"""``python -m llark.train``: what the deepspeed, torchrun, srun and accelerate launchers start on every rank."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import llark.train
from llark.options import parse_key_values
from llark.train.config import TrainConfig, TrainConfigError, load_config
from llark.train.recipe import main


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m llark.train", description=llark.train.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML training config (launch/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.lr=1e-4 (values are JSON when they parse as JSON)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    return load_config(args.config, parse_key_values(args.set)), args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        config, _ = parse_args()
    except TrainConfigError as exc:
        print(f"llark train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    main(config)
