"""Shard write and full read-back throughput for Jukebox-size samples, against dd on the same disk.

    .venv/bin/python benchmarks/shards.py                      # 800 samples of 250 x 4800 float16
    .venv/bin/python benchmarks/shards.py --samples 400 --dir /scratch/bench --workers 2

Builds a fake embeddings directory (random 250 x 4800 float16 arrays, about 2.4 MB each, with clip
and instruction records), then times, in this run and on the disk holding --dir:

- ``llark shards`` (join, plan, read every .npy, write tar with fsync) against ``dd
  if=/dev/zero bs=1M conv=fsync`` of the same number of bytes (writing only), and against copying
  the .npy files into one file with ``cat | dd conv=fsync`` (the same reads and writes);
- reading every sample back, against ``dd of=/dev/null bs=1M`` over the same shard files: with
  webdataset's pipeline (tar parsing and its default decoders), in one process and in one process
  per shard (as DataLoader workers do); with webdataset's tar iterator and ``np.load`` (what
  ``llark.data.iter_shard`` and ``decode_audio`` do); and with ``pipeline.shard_reader`` followed
  by ``np.load``, and by its copy-free ``npy_array``;
- ``validate-shards`` over the same shards.

Read-back steps run in ``--rounds`` rounds and each shows its fastest round.

When the page cache can be dropped (root on Linux), it is dropped before each timed step, so reads
come from the disk (on a virtual machine the host may still cache them); otherwise the figures
are for warm caches and say so. Needs about 3 x 2.4 MB per sample of free space. Prints figures only.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.encoders import write_manifest  # noqa: E402
from pipeline.records import ClipRecord  # noqa: E402
from pipeline.runner import InlineExecutor, LocalExecutor  # noqa: E402
from pipeline.shard_reader import iter_samples, npy_array  # noqa: E402
from pipeline.shards import build_shards  # noqa: E402
from pipeline.validate_shards import validate_shards  # noqa: E402

FRAMES, DIM = 250, 4800


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_inputs(root: Path, samples: int) -> int:
    rng = np.random.default_rng(0)
    emb = root / "emb"
    write_manifest(emb, {"manifest_version": 1, "name": "jukebox", "layer": 36, "frame_rate_hz": 10.0, "dim": DIM,
                         "dtype": "float16", "config": {"benchmark": True}, "packages": {}})
    clips, records, instructions, total = [], [], [], 0
    block = rng.standard_normal((FRAMES, DIM)).astype(np.float16)
    for k in range(samples):
        cid = f"bench-{k:06d}"
        clips.append(ClipRecord(id=cid, dataset="bench", split="train", audio_path=f"/data/{cid}.wav",
                                task_families=["understanding"], start_s=30.0, end_s=55.0).to_json())
        path = emb / "bench" / f"{cid}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.roll(block, k, axis=0), allow_pickle=False)
        total += path.stat().st_size
        records.append(json.dumps({"id": cid, "dataset": "bench", "split": "train", "embedding_path": str(path),
                                   "frames": FRAMES, "dim": DIM, "dtype": "float16", "encoder": "jukebox"}))
        instructions.append(json.dumps({
            "id": f"{cid}-understanding", "clip_id": cid, "task_family": "understanding",
            "pairs": [{"question": "What is the tempo of this song?", "answer": "About 120 BPM, a moderate pace."}] * 6,
            "backend": "template", "model": "none", "prompt_version": "1", "dataset": "bench", "split": "train"}))
    (root / "clips.jsonl").write_text("\n".join(clips) + "\n")
    (emb / "embeddings.jsonl").write_text("\n".join(records) + "\n")
    (root / "instructions.jsonl").write_text("\n".join(instructions) + "\n")
    return total


def read_shard(path: str) -> int:
    """Every sample of one shard through webdataset, decoded (what one DataLoader worker does)."""
    import webdataset as wds

    return sum(1 for _ in wds.WebDataset([path], shardshuffle=False).decode())


def webdataset_tar_samples(url: str):
    """Raw samples the way llark.data.iter_shard reads them: gopen + tar_file_iterator + group_by_keys."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = gopen(url)
    try:
        yield from group_by_keys({**member, "__url__": url} for member in tar_file_iterator(stream))
    finally:
        stream.close()


def np_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def dd(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.perf_counter() - start


def line(label: str, seconds: float, nbytes: int, samples: int | None, reference: float | None = None) -> str:
    rate = nbytes / seconds / 1e6
    text = f"  {label:<40} {seconds:7.2f} s  {rate:8.1f} MB/s"
    if samples is not None:
        text += f"  {samples / seconds:8.1f} samples/s"
    if reference is not None:
        text += f"  ({100 * rate / reference:.0f}% of dd)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=800, help="samples (800: two shards of about 1 GB)")
    parser.add_argument("--dir", type=Path, default=Path("runs/bench-shards"))
    parser.add_argument("--workers", type=int, default=1, help="shard-writing processes (1: one core)")
    parser.add_argument("--shard-bytes", type=float, default=1e9)
    parser.add_argument("--rounds", type=int, default=3, help="read-back rounds; each reader's fastest is shown")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()

    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        source_bytes = make_inputs(root, args.samples)
        cold = drop_caches()
        print(f"{args.samples} samples of {FRAMES} x {DIM} float16 ({source_bytes / 1e6:.0f} MB of .npy) in {root}; "
              f"{'page cache dropped before each step (cold reads)' if cold else 'page cache NOT dropped (warm reads)'}")

        executor = InlineExecutor() if args.workers == 1 else LocalExecutor(args.workers)
        start = time.perf_counter()
        summary = build_shards(root / "clips.jsonl", root / "instructions.jsonl", root / "emb", root / "shards",
                               shard_bytes=int(args.shard_bytes), executor=executor, progress=False)
        write_s = time.perf_counter() - start
        shard_files = sorted((root / "shards").glob("*.tar"))
        shard_bytes = sum(p.stat().st_size for p in shard_files)
        assert summary.samples == args.samples, summary.lines()

        drop_caches()
        dd_write_s = dd(["if=/dev/zero", f"of={root / 'dd.bin'}", "bs=1M", f"count={-(-shard_bytes // (1 << 20))}",
                         "conv=fsync"])
        dd_write = shard_bytes / dd_write_s / 1e6
        (root / "dd.bin").unlink()
        drop_caches()
        start = time.perf_counter()
        subprocess.run(f"find {root / 'emb'} -name '*.npy' -print0 | sort -z | xargs -0 cat | "
                       f"dd of={root / 'copy.bin'} bs=1M iflag=fullblock conv=fsync status=none", shell=True, check=True)
        dd_copy_s = time.perf_counter() - start
        dd_copy = source_bytes / dd_copy_s / 1e6
        (root / "copy.bin").unlink()

        urls = [str(p) for p in shard_files]

        def webdataset_decoded() -> None:
            import webdataset as wds

            checksum, read = 0.0, 0
            for sample in wds.WebDataset(urls, shardshuffle=False).decode():
                checksum += float(sample["npy"][0, 0])
                read += 1
            assert read == args.samples

        def raw_reader(samples, decode):
            def run() -> None:
                checksum, read = 0.0, 0
                for url in urls:
                    for sample in samples(url):
                        checksum += float(decode(sample["npy"])[0, 0])
                        read += 1
                assert read == args.samples
            return run

        def parallel_webdataset() -> None:
            with multiprocessing.get_context("spawn").Pool(readers) as pool:
                assert sum(pool.map(read_shard, urls)) == args.samples

        def dd_read_all() -> None:
            for url in urls:
                subprocess.run(["dd", f"if={url}", "of=/dev/null", "bs=1M", "status=none"], check=True)

        def validate() -> None:
            report = validate_shards(root / "shards", workers=args.workers)
            assert report.ok, report.lines()

        readers = min(len(shard_files), os.cpu_count() or 1)
        steps = {"dd of=/dev/null bs=1M": dd_read_all, "webdataset, every sample decoded": webdataset_decoded}
        if readers > 1:
            steps[f"webdataset, {readers} reader processes"] = parallel_webdataset
        steps.update({
            "webdataset tar iterator + np.load": raw_reader(webdataset_tar_samples, np_load),
            "shard_reader + np.load": raw_reader(iter_samples, np_load),
            "shard_reader + npy_array (no copy)": raw_reader(iter_samples, npy_array),
            "validate-shards": validate,
        })
        # Rounds of every step in turn, keeping each step's fastest: a busy machine or a noisy disk
        # then slows all readers alike instead of whichever ran at the wrong moment.
        fastest = {label: float("inf") for label in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                drop_caches()
                start = time.perf_counter()
                step()
                fastest[label] = min(fastest[label], time.perf_counter() - start)
        dd_read = shard_bytes / fastest["dd of=/dev/null bs=1M"] / 1e6

        print(f"{len(shard_files)} shards, {shard_bytes / 1e6:.0f} MB; shard writing on {args.workers} process(es)")
        print("write")
        print(line("dd if=/dev/zero bs=1M conv=fsync", dd_write_s, shard_bytes, None))
        print(line("cat *.npy | dd bs=1M conv=fsync (copy)", dd_copy_s, source_bytes, None))
        copied = line("llark shards (read .npy, write tar)", write_s, shard_bytes, args.samples, dd_write)
        print(f"{copied[:-1]}, {100 * shard_bytes / write_s / 1e6 / dd_copy:.0f}% of the copy)")
        print(f"read back (the fastest of {args.rounds} rounds)")
        for label, seconds in fastest.items():
            if label.startswith("dd "):
                print(line(label, seconds, shard_bytes, None))
            else:
                print(line(label, seconds, shard_bytes, args.samples, dd_read))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
