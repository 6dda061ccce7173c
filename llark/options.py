"""``KEY=VALUE`` options (``--set``, ``--prompt``, ...) as the command line and ``python -m llark.train`` read them."""

from __future__ import annotations

import json

from pipeline.errors import StageConfigError


def parse_key_values(pairs: list[str], option: str = "--set") -> dict:
    """``KEY=VALUE`` pairs to a dict; values are decoded as JSON when they are JSON (numbers, booleans)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise StageConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options
