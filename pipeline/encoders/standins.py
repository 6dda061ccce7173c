"""Tiny random stand-ins of the Hugging Face encoders, written in each checkpoint's published layout.

``python -m pipeline.encoders.standins mert DIR`` writes one (``make demo ENCODER=mert`` does, when
no ``ENCODER_DIR`` is given). Its weights are random: it exercises the loading and the pipeline,
and its frames carry no more about the music than a random projection of the audio would.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ENCODERS = ("mert", "whisper", "clap")


def write_standin(name: str, directory: Path) -> Path:
    """The stand-in of encoder ``name`` in ``directory`` (kept if one is already there)."""
    if name not in ENCODERS:
        raise ValueError(f"no stand-in for encoder {name!r} (choose from {', '.join(ENCODERS)})")
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        importlib.import_module(f"pipeline.encoders.{name}").write_random_checkpoint(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ENCODERS:
        print(f"usage: python -m pipeline.encoders.standins {{{','.join(ENCODERS)}}} DIRECTORY", file=sys.stderr)
        return 2
    directory = write_standin(args[0], Path(args[1]))
    print(f"standins: a tiny random {args[0]} checkpoint in {directory} (random weights: for trying the pipeline, "
          "not for results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
