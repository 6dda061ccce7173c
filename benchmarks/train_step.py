"""Cost of LLark's training step against a bare Hugging Face step, the loader alone, and peak memory.

    .venv/bin/python benchmarks/train_step.py [--model smollm2|tiny] [--steps 8] [--micro-batch 4]
        [--frames 150] [--dim 128] [--deepspeed] [--loader-examples 2000] [--system-malloc]

Side by side, on the same model weights and the same batches, alternating so that drift (other
processes, thermal) hits both alike:

- ``bare``: ``lm(input_ids, attention_mask, labels).loss``, backward, fused AdamW step (batches collated
  beforehand; the audio placeholders are looked up as ordinary tokens);
- ``llark``: collate the examples, project the frames and replace the placeholders, the same LM
  forward, backward, AdamW step over the LM and the projector;
- ``llark+deepspeed`` (``--deepspeed``): the same through the DeepSpeed engine (ZeRO-2, one process),
  as ``llark train`` runs it.

All paths run under the host allocator setting ``llark train`` uses on CPU (freed buffers stay in
the heap, ``retain_freed_cpu_memory``); ``--system-malloc`` leaves glibc's default (large blocks
unmapped when freed) to show what that setting saves.

Then the loader alone on one core (read tar shards, decode, render the chat template, tokenize,
label, collate) in examples/s, wall-clock and per CPU second (the rate with a core to itself, which
other processes on the machine do not lower), and the peak resident memory. The questions of the
benchmark shards repeat, their answers do not, as in real instruction data. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QUESTIONS = ["What is the key of this song?", "What is the tempo of this song?", "Describe the track in detail."]
ANSWERS = ["The key is C minor.", "The tempo is about 120 BPM, with a steady four-on-the-floor kick.",
           "A slow ballad: piano chords over a bowed cello, no vocals, in a warm and intimate mix."]
KEYS = [f"{note} {mode}" for note in ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
        for mode in ("major", "minor")]


def answer(i: int) -> str:
    """Sample ``i``'s answer: questions repeat across a dataset, answers (almost) never do."""
    return f"{ANSWERS[(i + 1) % 3]} It is in {KEYS[i % 24]} at about {70 + i % 97} BPM."


def write_bench_shards(out: Path, samples: int, shards: int, frames: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for s in range(shards):
        name = f"bench-train-understanding-features-{s:06d}.tar"
        keys = range(s, samples, shards)
        with tarfile.open(out / name, "w") as tar:
            for i in keys:
                key = f"clip{i:06d}-understanding"
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((frames, dim)).astype(np.float16), allow_pickle=False)
                meta = {"key": key, "pairs": [{"question": QUESTIONS[i % 3], "answer": answer(i)}],
                        "encoding": {"frames": frames, "dim": dim}}
                for ext, data in (("npy", buf.getvalue()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        index.append({"file": name, "split": "train", "task_family": "understanding", "samples": len(keys)})
    (out / "index.json").write_text(json.dumps({"shards": index}))
    (out / "encoder.json").write_text(json.dumps({"name": "features", "layer": None, "frame_rate_hz": 10.0, "dim": dim,
                                                  "dtype": "float16", "config": {}}))


def build(model_name: str, dim: int):
    from llark.model import LlarkConfig, build_llark

    if model_name == "smollm2":
        cfg = LlarkConfig(lm_path="smollm2", encoder_dim=dim)
    else:
        from llark.model.llark import write_tiny_llama
        from llark.model.smollm2 import smollm2_tokenizer_dir
        from transformers import AutoTokenizer

        path = Path(tempfile.mkdtemp(prefix="llark-bench-lm-"))
        write_tiny_llama(path, AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())), hidden=256, layers=4)
        cfg = LlarkConfig(lm_path=str(path), encoder_dim=dim)
    torch.manual_seed(0)
    return build_llark(cfg, dtype="float32", attn_implementation="sdpa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=150, help="audio frames per clip (demo: 15 s at 10 Hz)")
    ap.add_argument("--dim", type=int, default=128, help="encoder dimension (demo features: 128; Jukebox: 4800)")
    ap.add_argument("--deepspeed", action="store_true", help="also time the step through the DeepSpeed engine")
    ap.add_argument("--loader-examples", type=int, default=2000)
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's default allocator behaviour (llark train's retain_freed_cpu_memory: false)")
    args = ap.parse_args()

    from llark.host_memory import RetainedHeap

    heap = "glibc default" if args.system_malloc else (
        "freed buffers retained" if RetainedHeap.enable() else "C library default (retaining had no effect here)")

    from llark.data import ExampleEncoder, ShardStream, StreamSettings, collate, open_shards
    from llark.model import ChatFormatter

    model, tokenizer = build(args.model, args.dim)
    formatter = ChatFormatter(tokenizer)
    workdir = Path(tempfile.mkdtemp(prefix="llark-bench-"))
    n_samples = max(args.loader_examples, args.micro_batch * (args.steps + 1))
    write_bench_shards(workdir / "shards", n_samples, 8, args.frames, args.dim)
    shard_set = open_shards([str(workdir / "shards")])
    encode = ExampleEncoder(formatter, args.dim, 4096)

    # -- loader alone, one core --------------------------------------------------------------
    torch.set_num_threads(1)
    stream = ShardStream(shard_set.urls, encode, StreamSettings(micro_batch=args.micro_batch, pad_id=tokenizer.pad_token_id,
                                                                buffer_size=64, epochs=1))
    start, cpu_start, n = time.perf_counter(), time.process_time(), 0
    for batch in stream.worker_stream(0):
        n += len(batch["keys"])
        if n >= args.loader_examples:
            break
    loader_rate = n / (time.perf_counter() - start)
    loader_cpu_rate = n / (time.process_time() - cpu_start)  # what a core of its own would deliver
    torch.set_num_threads(os.cpu_count() or 1)

    # -- the steps ---------------------------------------------------------------------------
    encoded = [encode(s, 0) for s in _samples(shard_set.urls, args.micro_batch * (args.steps + 1))]
    examples = [encoded[i:i + args.micro_batch] for i in range(0, len(encoded), args.micro_batch)]
    pre = [collate(b, tokenizer.pad_token_id) for b in examples]
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in pre)

    bare_lm = _copy_lm(model)
    adamw = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, fused=True)  # as llark train's
    bare_opt = torch.optim.AdamW(bare_lm.parameters(), **adamw)
    opt = torch.optim.AdamW(model.parameters(), **adamw)
    model.train(), bare_lm.train()

    def bare_step(i):
        b = pre[i]
        loss = bare_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                       use_cache=False).loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    def llark_step(i):
        b = collate(examples[i], tokenizer.pad_token_id)
        _, loss = model(b["input_ids"], b["attention_mask"], b["audio"], b["audio_frames"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    paths = {"bare": bare_step, "llark": llark_step}
    if args.deepspeed:
        paths["llark+deepspeed"] = _deepspeed_step(model, examples, tokenizer.pad_token_id)
    times = {k: [] for k in paths}
    cpu_times = {k: [] for k in paths}  # CPU seconds of all threads: steadier than wall-clock on a busy machine
    for name, fn in paths.items():
        fn(0)  # warm-up
    for i in range(1, args.steps + 1):
        for name, fn in (paths.items() if i % 2 else reversed(list(paths.items()))):
            t, c = time.perf_counter(), time.process_time()
            fn(i)
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {args.model}: {sum(p.numel() for p in model.lm.parameters()):,} LM parameters; micro-batch "
          f"{args.micro_batch}, {tokens:.0f} tokens per batch on average ({args.frames} audio frames x {args.dim}); "
          f"{torch.get_num_threads()} threads; {args.steps} timed steps per path; host heap: {heap}")
    base, cpu_base = statistics.median(times["bare"]), statistics.median(cpu_times["bare"])
    for name, ts in times.items():
        med, cpu = statistics.median(ts), statistics.median(cpu_times[name])
        print(f"  {name:<16} median {med * 1000:8.1f} ms/step  (min {min(ts) * 1000:.1f})  ratio to bare "
              f"{med / base:.3f};  CPU {cpu * 1000:8.1f} ms/step, ratio to bare {cpu / cpu_base:.3f}")
    print(f"loader alone (one core, no worker processes): {loader_rate:.0f} examples/s wall-clock, "
          f"{loader_cpu_rate:.0f} examples per CPU second (read tar, decode .npy, chat template, tokenize, "
          f"label, collate)")
    print(f"peak resident memory: {peak_mb:.0f} MB")


def _samples(urls, n):
    from llark.data import iter_shard, read_sample

    out = []
    for url in urls:
        for raw in iter_shard(url):
            out.append(read_sample(raw))
            if len(out) == n:
                return out
    return out


def _copy_lm(model):
    import copy

    return copy.deepcopy(model.lm)


def _deepspeed_step(model, examples, pad_id):
    import copy
    import socket

    import deepspeed

    from llark.data import collate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    ds_model = copy.deepcopy(model)
    config = {"train_batch_size": len(examples[0]), "train_micro_batch_size_per_gpu": len(examples[0]),
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2, "overlap_comm": False},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-6,
                                                        "weight_decay": 0.0, "torch_adam": True,
                                                        "fused": True}},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=ds_model, model_parameters=list(ds_model.parameters()), config=config)

    def step(i):
        b = collate(examples[i], pad_id)
        _, loss = engine(b["input_ids"], b["attention_mask"], b["audio"], b["audio_frames"], b["labels"])
        engine.backward(loss)
        engine.step()

    return step


if __name__ == "__main__":
    main()
