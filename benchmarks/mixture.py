"""Realised task-family mixture against the asked weights, after ``--samples`` examples.

    .venv/bin/python benchmarks/mixture.py [--samples 10000]

Shards of three families of very different sizes (understanding 400 samples, captioning 40, reasoning
120) are written to a temporary directory with a tokenizer trained there; the training loader's
mixture stream (``llark.mixture.MixtureStream``) draws ``--samples`` examples for each weight setting
(one loader worker of one rank), and the shares drawn are printed beside the shares asked. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SIZES = {"understanding": 400, "captioning": 40, "reasoning": 120}
SETTINGS = [{"understanding": 1.0, "captioning": 1.0, "reasoning": 1.0},
            {"understanding": 2.0, "captioning": 1.0, "reasoning": 0.5},
            {"understanding": 0.2, "captioning": 5.0, "reasoning": 1.0}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    args = ap.parse_args()
    from fixtures_train import tiny_lm_dir, write_shards

    from llark.data import ExampleEncoder, ShardStream, StreamSettings, open_shards
    from llark.mixture import MixtureStream
    from llark.model import ChatFormatter, load_tokenizer

    tokenizer = load_tokenizer(tiny_lm_dir())
    encode = ExampleEncoder(ChatFormatter(tokenizer), 16, 512)
    micro = 8
    with tempfile.TemporaryDirectory() as tmp:
        for i, (family, n) in enumerate(SIZES.items()):
            write_shards(Path(tmp) / family, n_samples=n, n_shards=2, dim=16, pairs=(1, 1), family=family, seed=i)
        print(f"{args.samples:,} examples per setting; family sizes {SIZES}")
        for weights in SETTINGS:
            settings = StreamSettings(micro_batch=micro, pad_id=tokenizer.pad_token_id, group_shards=2, buffer_size=16)
            streams = {f: ShardStream(open_shards([str(Path(tmp) / f)]).urls, encode, settings) for f in weights}
            drawn = Counter()
            for batch in itertools.islice(MixtureStream(streams, weights, settings).worker_stream(0),
                                          args.samples // micro):
                drawn.update(batch["mixture"])
            total, asked = sum(drawn.values()), sum(weights.values())
            worst = max(abs(drawn[f] / total - w / asked) for f, w in weights.items())
            shares = ", ".join(f"{f} {drawn[f] / total:.1%} (asked {w / asked:.1%})" for f, w in weights.items())
            print(f"  weights {weights}: {shares}; largest difference {worst:.2%} points")


if __name__ == "__main__":
    main()
