"""``llark demo-data``: synthesise the demo dataset."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_verb
from pipeline.errors import EXIT_OK


def register(sub) -> None:
    p = add_verb(
        sub, "demo-data",
        "synthesise the demo dataset (music clips with known tempo, key, chords, metre, instruments, style)",
        "Synthesise the demo dataset deterministically from a seed.\n\n"
        "Output: OUT/metadata.csv, OUT/audio/<split>/<id>.flac, OUT/annotations/<id>.json (ground truth).\n"
        "Does nothing when OUT already holds a dataset made with the same parameters.",
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write the dataset into")
    p.add_argument("--clips", type=int, default=240, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--duration", type=float, default=15.0, help="clip length in seconds")
    p.add_argument("--sample-rate", type=int, default=22050, help="sample rate of the written files")
    p.add_argument("--long-tracks", type=int, default=0, help="also write this many 3-4 minute tracks (for benchmarks)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.demo_data import generate_demo_dataset

    summary = generate_demo_dataset(
        args.out, n_clips=args.clips, seed=args.seed, duration_s=args.duration,
        sample_rate=args.sample_rate, long_tracks=args.long_tracks,
    )
    splits = ", ".join(f"{k} {v}" for k, v in sorted(summary.splits.items()))
    how = f"generated in {summary.seconds:.1f} s" if summary.generated else "already there, same parameters"
    long = f" and {summary.n_long} long tracks" if summary.n_long else ""
    print(f"demo dataset: {summary.n_clips} clips ({splits}){long} in {summary.out_dir} ({how})")
    return EXIT_OK
