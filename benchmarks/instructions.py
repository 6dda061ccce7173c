"""Requests per second of the instructions stage's API writer, from one process, against a local
OpenAI-compatible server (in its own process, on 127.0.0.1) that takes ``--latency`` seconds per
request.

    .venv/bin/python benchmarks/instructions.py [--latency 1.0] [--concurrency 1 16 64] [--seconds 15]

For each concurrency it runs the whole stage (items, runner, ledger, reply cache, parsing,
filtering, output) on enough clips to keep the server busy for about ``--seconds``, then checks
the output: every item exactly once (0 lost, 0 duplicated) and one request per item. The time
includes the stage's start (reading the clips, building requests) and end (writing the output).
Prints figures; asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from pipeline.instructions.run import InstructionsConfig, run_instructions
from pipeline.records import read_jsonl

FEATURES = {
    "tempo_in_beats_per_minute_madmom": 118.4,
    "key_madmom": "A minor",
    "chords_madmom": [{"start": 2.0 * k, "end": 2.0 * k + 2.0, "chord": c}
                      for k, c in enumerate(["A minor", "F major", "C major", "G major"] * 3)],
    "beat_grid_madmom": [{"time": round(0.5 * k, 2), "beat_number": k % 4 + 1} for k in range(50)],
}


def clip(n: int) -> dict:
    return {"id": f"mtgjamendo-{n:07d}", "dataset": "mtg_jamendo", "split": "train", "audio_path": f"/data/{n}.mp3",
            "task_families": ["understanding"], "start_s": 30.0, "end_s": 55.0,
            "annotations": {"genres": ["rock"], "instruments": ["electricguitar", "drums"], "moods": ["energetic"]},
            "features": {**FEATURES, "tempo_in_beats_per_minute_madmom": round(60 + 0.1 * n, 1)}}


def measure(concurrency: int, latency: float, seconds: float, workdir: Path) -> dict:
    items = max(concurrency, int(round(seconds / latency * concurrency)))
    clips = workdir / f"clips-{concurrency}.jsonl"
    clips.write_text("".join(json.dumps(clip(n)) + "\n" for n in range(items)))
    out = workdir / f"out-{concurrency}.jsonl"
    server = subprocess.Popen([sys.executable, "-m", "pipeline.instructions.fake_openai", "--latency", str(latency),
                               "--max-seconds", str(10 * seconds + 120)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        config = InstructionsConfig(input=clips, output=out, backend="openai", base_url=base_url,
                                    concurrency=concurrency, progress=False, models={"understanding": "gpt-4o-mini"})
        start = time.perf_counter()
        failed = run_instructions(config, environ={"OPENAI_API_KEY": "sk-benchmark"}, say=lambda _line: None)
        elapsed = time.perf_counter() - start
        with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/_stats", timeout=10) as response:
            stats = json.load(response)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    ids = Counter(r["id"] for r in read_jsonl(out))
    expected = {f"mtgjamendo-{n:07d}-understanding" for n in range(items)}
    return {
        "items": items, "seconds": elapsed, "rate": items / elapsed, "failed": failed,
        "lost": len(expected - set(ids)), "duplicated": sum(n - 1 for n in ids.values() if n > 1),
        "requests": stats["chat_requests"], "repeated": stats["repeated"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=1.0, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--seconds", type=float, default=15.0, help="about how long each measurement keeps the server busy")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    importlib.import_module("openai")  # imported here, so that its import time is in no measurement

    print(f"instructions stage, openai writer, one process; local server with {args.latency:g} s per request:")
    print(f"  {'concurrency':>11s} {'items':>6s} {'seconds':>8s} {'requests/s':>11s} {'ideal':>6s} "
          f"{'lost':>5s} {'dup':>4s} {'failed':>6s} {'sent':>6s} {'resent':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            r = measure(c, args.latency, args.seconds, Path(tmp))
            print(f"  {c:11d} {r['items']:6d} {r['seconds']:8.2f} {r['rate']:11.1f} {c / args.latency:6.0f} "
                  f"{r['lost']:5d} {r['duplicated']:4d} {r['failed']:6d} {r['requests']:6d} {r['repeated']:6d}")


if __name__ == "__main__":
    main()
