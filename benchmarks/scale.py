"""The augment stage on the demo data, side by side: local executor with 1 and 2 workers, and the
Ray executor on a local Ray instance with 2 CPUs. Prints items/s and Ray's overhead per item.

    .venv/bin/python benchmarks/scale.py [--clips 48] [--workdir runs/bench-scale]

The overhead is measured on a no-op stage over the same number of items (pool or cluster start
excluded), so it is what Ray adds per item on top of the work. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pipeline.augment import AugmentSettings, augment_stage
from pipeline.crop import CropSettings, crop_stage
from pipeline.demo_data import generate_demo_dataset
from pipeline.ingest import get_adapter
from pipeline.records import write_jsonl
from pipeline.runner import LocalExecutor, Stage, run_stage
from pipeline.testing import noop_item


def cropped_demo(workdir: Path, n_clips: int) -> Path:
    clips = workdir / "clips.jsonl"
    if clips.exists():
        return clips
    generate_demo_dataset(workdir / "source", n_clips=n_clips)
    write_jsonl(workdir / "ingested.jsonl", get_adapter("demo").prepare(workdir / "source"))
    run_stage(crop_stage(CropSettings(clips_dir=str((workdir / "clips").resolve()))), workdir / "ingested.jsonl", clips,
              executor=LocalExecutor(2), progress=False)
    return clips


def timed(stage: Stage, inp: Path, out: Path, executor) -> float:
    start = time.perf_counter()
    summary = run_stage(stage, inp, out, executor=executor, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    if summary.failed_total:
        raise RuntimeError(f"{summary.failed_total} items failed; see {summary.errors}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=48, help="demo clips (15 s each)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-scale"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    clips = cropped_demo(args.workdir, args.clips)

    import ray

    from pipeline.ray_executor import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    augment = augment_stage(AugmentSettings())
    noop_rows = args.workdir / "noop.jsonl"
    noop_rows.write_text("".join(json.dumps({"id": f"n{i:05d}"}) + "\n" for i in range(args.clips * 20)))
    noop = Stage(name="noop", process=noop_item)

    ray_executor = RayExecutor(address="local")
    timed(augment, clips, args.workdir / "warm.jsonl", ray_executor)  # workers start, processors load
    rows = {
        "local, 1 worker": timed(augment, clips, args.workdir / "local1.jsonl", LocalExecutor(1)),
        "local, 2 workers": timed(augment, clips, args.workdir / "local2.jsonl", LocalExecutor(2)),
        "ray, 2 CPUs (tasks)": timed(augment, clips, args.workdir / "ray.jsonl", ray_executor),
    }
    print(f"augment stage on {args.clips} demo clips of 15 s (wall time, includes local pool start):")
    for label, seconds in rows.items():
        print(f"  {label:22s} {seconds:7.2f} s  {args.clips / seconds:6.2f} items/s")
    print(f"  ray items/s relative to local with 2 workers: {rows['local, 2 workers'] / rows['ray, 2 CPUs (tasks)']:.2f}")

    n = args.clips * 20
    timed(noop, noop_rows, args.workdir / "noop-warm.jsonl", ray_executor)
    ray_noop = timed(noop, noop_rows, args.workdir / "noop-ray.jsonl", ray_executor)
    local_noop = timed(noop, noop_rows, args.workdir / "noop-local.jsonl", LocalExecutor(2))
    print(f"per-item overhead on a no-op stage ({n} items): ray {1e3 * ray_noop / n:.2f} ms, "
          f"local {1e3 * local_noop / n:.2f} ms (incl. pool start)")
    batched = RayExecutor(address="local", batch_size=16)
    ray_batched = timed(noop, noop_rows, args.workdir / "noop-ray16.jsonl", batched)
    print(f"  ray with --ray-batch-size 16: {1e3 * ray_batched / n:.2f} ms per item")
    ray.shutdown()


if __name__ == "__main__":
    main()
