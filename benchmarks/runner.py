"""The runner's own cost: overhead per item on a no-op function, and scaling on a CPU-bound item.

    .venv/bin/python benchmarks/runner.py [--items 2000] [--cpu-items 40] [--work 1500000]

Prints figures; asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from pipeline.runner import InlineExecutor, LocalExecutor, Stage, run_stage
from pipeline.testing import cpu_item, noop_item


def timed_run(stage: Stage, rows: list[dict], executor, workdir: Path, name: str) -> float:
    inp = workdir / f"{name}.in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    run_stage(stage, inp, workdir / f"{name}.out.jsonl", executor=executor, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=2000, help="no-op items for the overhead figure")
    ap.add_argument("--cpu-items", type=int, default=40, help="CPU-bound items for the scaling figure")
    ap.add_argument("--work", type=int, default=1_500_000, help="loop iterations per CPU-bound item")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [{"id": f"item-{i:06d}", "payload": "x" * 200} for i in range(args.items)]
        noop = Stage(name="noop", process=noop_item)
        print(f"runner overhead on a no-op item ({args.items} items, ~250-byte records):")
        for label, executor in [("inline (no processes)", InlineExecutor()), ("local, 1 worker", LocalExecutor(1)), ("local, 2 workers", LocalExecutor(2))]:
            seconds = timed_run(noop, rows, executor, tmp, label.replace(" ", "_").replace(",", ""))
            print(f"  {label:24s} {1e3 * seconds / args.items:7.3f} ms/item  ({seconds:.2f} s total, incl. pool start)")

        cpu_rows = [{"id": f"cpu-{i:04d}"} for i in range(args.cpu_items)]
        cpu = Stage(name="cpu", process=cpu_item, settings={"work": args.work})
        t0 = time.perf_counter()
        cpu_item(cpu_rows[0], {"work": args.work})
        per_item = time.perf_counter() - t0
        one = timed_run(cpu, cpu_rows, LocalExecutor(1), tmp, "cpu1")
        two = timed_run(cpu, cpu_rows, LocalExecutor(2), tmp, "cpu2")
        print(f"scaling on a CPU-bound item ({args.cpu_items} items of ~{1e3 * per_item:.0f} ms):")
        print(f"  1 worker : {one:6.2f} s  {args.cpu_items / one:6.2f} items/s")
        print(f"  2 workers: {two:6.2f} s  {args.cpu_items / two:6.2f} items/s")
        print(f"  speed-up 1 -> 2 workers: {one / two:.2f}x (ideal 2.00x on 2 free cores)")


if __name__ == "__main__":
    main()
