"""Step time and peak memory of each connector beside the linear projector, on the same batches.

    .venv/bin/python benchmarks/connectors.py [--model tiny|smollm2] [--mode projector|lora]
        [--connectors linear mlp qformer] [--threads 2] [--steps 5] [--warmup 1] [--micro-batch 8]
        [--frames 250] [--dim 64] [--gradient-checkpointing] [--system-malloc]

Each connector (its default settings, ``llark.model.connectors``) is put on the same language model
(``tiny``, the default: a random 4-layer Llama of width 256 with SmolLM2's tokenizer, a run of a
minute or two on 2 cores; ``smollm2``: SmolLM2-135M-Instruct, the demo's LM, converted once under
``$LLARK_CACHE``, several seconds a step on 2 cores) with ``build_llark`` and trained as ``llark
train`` does with ``configure_training``: ``projector`` mode (the LM frozen, the connector trained)
or ``lora`` (rank 64 adapters and the connector), fp32, torch's fused AdamW. Every connector gets the
same fixed random batches: ``--micro-batch`` clips of ``--frames`` frames of dimension ``--dim``
(250 frames: a 25 s clip at 10 Hz), each with a short question and answer, the prompt laid out with
the connector's own number of audio placeholders. A step is the forward pass, the loss, backward
and the optimizer step on batches collated beforehand; the first ``--warmup`` steps are not timed.
Printed per connector: the median wall-clock and CPU time per step (and the ratio to linear's), the
torch thread count they ran with, the trainable parameters (connector and LM), the audio tokens per
clip and the tokens per batch.

Memory: each connector runs in its own process, one after the other, so that no connector's
allocations count towards another's. Peak = the process's peak resident set (``ru_maxrss``), and,
the part the training steps add, the peak resident set during the steps (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model and batches are built) minus the resident set at that
moment. Freed buffers stay in the process's heap as in ``llark train`` on CPU
(``retain_freed_cpu_memory``; ``--system-malloc`` leaves glibc's default), so the high-water mark is
the steps' own peak plus what the heap keeps. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONNECTORS = ("linear", "mlp", "qformer")
QUESTIONS = ["What is the key of this song?", "What is the tempo of this song?", "Describe the track in detail."]
ANSWERS = ["The key is C minor.", "The tempo is about 120 BPM, with a steady four-on-the-floor kick.",
           "A slow ballad: piano chords over a bowed cello, no vocals, in a warm and intimate mix."]


def memory_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def batches(formatter, tokenizer, audio_tokens, args) -> list[dict]:
    """``warmup + steps`` collated batches, the same frames and text whatever the connector."""
    import numpy as np

    from llark.data import collate

    rng = np.random.default_rng(0)
    out = []
    for step in range(args.warmup + args.steps):
        examples = []
        for i in range(args.micro_batch):
            k = step * args.micro_batch + i
            messages = formatter.conversation([(QUESTIONS[k % 3], ANSWERS[(k + 1) % 3])])
            encoded = formatter.encode(messages, audio_tokens(args.frames))
            examples.append({"key": f"clip{k}", "input_ids": encoded.input_ids, "labels": encoded.labels,
                             "audio": rng.standard_normal((args.frames, args.dim)).astype(np.float32)})
        out.append(collate(examples, tokenizer.pad_token_id))
    return out


def worker(args) -> None:
    """One connector: build, train ``warmup + steps`` steps, print one JSON line of figures."""
    import torch

    torch.set_num_threads(args.threads)
    from llark.host_memory import RetainedHeap

    retained = not args.system_malloc and RetainedHeap.enable() is not None
    from llark.model import ChatFormatter, LlarkConfig, build_llark, configure_training
    from llark.model.llark import LoraSettings

    torch.manual_seed(0)
    config = LlarkConfig(lm_path=args.lm_path, encoder_dim=args.dim, connector={"name": args.worker})
    model, tokenizer = build_llark(config, dtype="float32", attn_implementation="sdpa")
    configure_training(model, args.mode, LoraSettings(), gradient_checkpointing=args.gradient_checkpointing)
    model.train()
    formatter = ChatFormatter(tokenizer)
    data = batches(formatter, tokenizer, config.audio_tokens, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, fused=True)

    before_steps = memory_kb("VmRSS")
    peak_reset = reset_peak()
    times, cpu_times = [], []
    for i, b in enumerate(data):
        t, c = time.perf_counter(), time.process_time()
        _, loss = model(b["input_ids"], b["attention_mask"], b["audio"], b["audio_frames"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    step_hwm = memory_kb("VmHWM") if peak_reset else None
    counts = model.trainable_counts()
    print(json.dumps({
        "connector": args.worker, "threads": torch.get_num_threads(), "times": times, "cpu_times": cpu_times,
        "connector_params": counts["projector"], "lm_params": counts["lm"],
        "audio_tokens": config.audio_tokens(args.frames),
        "tokens": statistics.mean(int(b["attention_mask"].sum()) for b in data),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_peak_mb": (step_hwm - before_steps) / 1024 if step_hwm is not None and before_steps else None,
        "loss": float(loss), "retained_heap": retained}))


def lm_path(model: str) -> str:
    """The LM directory every worker loads (converted or written once, here, not in the workers)."""
    if model == "smollm2":
        from llark.model.smollm2 import smollm2_dir

        return str(smollm2_dir())
    from transformers import AutoTokenizer

    from llark.model.llark import write_tiny_llama
    from llark.model.smollm2 import smollm2_tokenizer_dir

    path = Path(tempfile.mkdtemp(prefix="llark-bench-lm-"))
    write_tiny_llama(path, AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())), hidden=256, layers=4)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--mode", choices=["projector", "lora"], default="projector",
                    help="projector: the LM frozen; lora: rank-64 adapters on the LM too")
    ap.add_argument("--connectors", nargs="+", choices=CONNECTORS, default=list(CONNECTORS),
                    help="linear is always run first, as the reference")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each connector's process")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per connector")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=250, help="frames per clip (a 25 s clip at 10 Hz: 250)")
    ap.add_argument("--dim", type=int, default=64, help="encoder dimension")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="checkpoint the LM's layers (model.gradient_checkpointing; the demo config leaves it off)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's default allocator behaviour (llark train's retain_freed_cpu_memory: false)")
    ap.add_argument("--worker", choices=CONNECTORS, help=argparse.SUPPRESS)
    ap.add_argument("--lm-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("threads", "steps", "micro_batch", "frames", "dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
    if args.worker:
        return worker(args)

    path = lm_path(args.model)
    passed = [a for a in sys.argv[1:] if not a.startswith("--connectors")]
    names = ["linear"] + [n for n in args.connectors if n != "linear"]
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--lm-path", path, "--model", args.model,
               "--mode", args.mode, "--threads", str(args.threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch), "--frames", str(args.frames),
               "--dim", str(args.dim)]
        cmd += [f for f in ("--gradient-checkpointing", "--system-malloc") if f in passed]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the {name} connector's run failed:\n{done.stderr[-4000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    first = results["linear"]
    heap = "glibc default" if args.system_malloc else (
        "freed buffers retained" if first["retained_heap"] else "C library default (retaining had no effect here)")
    print(f"model {args.model}, mode {args.mode}: micro-batch {args.micro_batch}, {args.frames} frames x {args.dim} "
          f"per clip; the same batches for every connector; {args.warmup} warm-up + {args.steps} timed steps; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; host heap: {heap}")
    base, cpu_base = statistics.median(first["times"]), statistics.median(first["cpu_times"])
    for name, r in results.items():
        med, cpu = statistics.median(r["times"]), statistics.median(r["cpu_times"])
        step_peak = f"{r['step_peak_mb']:.0f} MB" if r["step_peak_mb"] is not None else "n/a"
        print(f"  {name:<8} {r['threads']} threads: median {med * 1000:8.1f} ms/step (min {min(r['times']) * 1000:.1f}), "
              f"x{med / base:.3f} linear's; CPU {cpu * 1000:8.1f} ms/step, x{cpu / cpu_base:.3f}")
        print(f"  {'':<8} trainable: connector {r['connector_params']:,}, LM {r['lm_params']:,}; "
              f"{r['audio_tokens']} audio tokens per clip, {r['tokens']:.0f} tokens per batch; "
              f"peak resident {r['peak_mb']:.0f} MB (ru_maxrss), steps' peak above the built model {step_peak} "
              f"(VmHWM); last loss {r['loss']:.3f}")


if __name__ == "__main__":
    main()
