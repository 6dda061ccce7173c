"""The ``llark`` command: one verb per stage. ``llark VERB --help`` gives its inputs, outputs and defaults."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from llark.commands.common import HelpFormatter

# In pipeline order; each module defines register(subparsers).
COMMAND_MODULES = [
    "llark.commands.demo_data",
    "llark.commands.ingest",
    "llark.commands.crop",
    "llark.commands.augment",
    "llark.commands.instructions",
    "llark.commands.embed",
    "llark.commands.shards",
    "llark.commands.validate_shards",
    "llark.commands.train",
    "llark.commands.ask",
    "llark.commands.evaluate",
    "llark.commands.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llark",
        description="Turn open music datasets into an instruction-tuned music LLM (the LLark recipe).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llark.errors import LlarkConfigError
    from pipeline.errors import EXIT_ABORTED, EXIT_CONFIG, EXIT_INTERRUPTED, RunAborted, StageConfigError
    from pipeline.files import describe_os_error, is_disk_failure
    from pipeline.runner import disk_remedy

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except (StageConfigError, LlarkConfigError) as exc:
        print(f"llark {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RunAborted as exc:
        print(f"llark {args.verb}: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except OSError as exc:
        if not is_disk_failure(exc):
            raise
        # A stage that does not turn a full disk into RunAborted itself still ends like one.
        print(f"llark {args.verb}: stopped: {describe_os_error(exc)}; {disk_remedy(exc.errno == errno.EROFS)}",
              file=sys.stderr)
        return EXIT_ABORTED
    except KeyboardInterrupt:
        print(f"llark {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
