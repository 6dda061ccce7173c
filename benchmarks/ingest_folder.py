"""`llark ingest folder` on a large folder: time to list, match metadata rows and write the records.

    .venv/bin/python benchmarks/ingest_folder.py [--files 10000] [--per-folder 100]

Writes ``--files`` short wav files in nested folders of ``--per-folder`` each, with a metadata.csv
that labels every file (genre, tempo, key, moods, a split for half of them), then ingests the folder
twice: without and with the metadata file. Ingest never opens the audio (the crop stage does), so
the figures are the listing, the metadata and the record writing. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.ingest.run import ingest_dataset

KEYS = ("C major", "A minor", "F# minor", "Eb major")
GENRES = ("rock", "jazz", "folk", "electronic")


def write_folder(root: Path, files: int, per_folder: int) -> list[str]:
    tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(441) / 44_100)).astype(np.float32)
    names = []
    for i in range(files):
        rel = f"artist{i // (per_folder * 10):03d}/album{i // per_folder:04d}/track {i:05d}.wav"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, tone, 44_100)
        names.append(rel)
    return names


def write_metadata(root: Path, names: list[str]) -> None:
    lines = ["file_name,genre,tempo,key,moods,split"]
    for i, rel in enumerate(names):
        split = ("train", "valid", "test")[i % 3] if i % 2 else ""
        lines.append(f'"{rel}",{GENRES[i % 4]},{80 + i % 90},{KEYS[i % 4]},"calm; warm",{split}')
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--per-folder", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "music", Path(tmp) / "out"
        started = time.perf_counter()
        names = write_folder(root, args.files, args.per_folder)
        print(f"wrote {len(names)} wav files in {len(names) // args.per_folder} folders "
              f"({time.perf_counter() - started:.1f} s, not part of the figures)")
        for label, with_metadata in (("no metadata", False), ("metadata.csv", True)):
            if with_metadata:
                write_metadata(root, names)
            summary = ingest_dataset("folder", root, out / f"{label.replace(' ', '_')}.jsonl")
            splits = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_split.items()))
            print(f"ingest folder, {label:12s}: {summary.records} records in {summary.seconds:.2f} s "
                  f"({summary.records / summary.seconds:,.0f} files/s; {splits}; errors {summary.adapter_errors})")
    print(f"cpu cores: {len(os.sched_getaffinity(0))} (ingest runs in one process)")


if __name__ == "__main__":
    main()
