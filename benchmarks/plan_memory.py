"""``llark plan``'s memory estimate against the memory DeepSpeed really takes, per rank, on CPU.

    .venv/bin/python benchmarks/plan_memory.py [--stages 1 2 3] [--hidden 512] [--layers 8]
        [--vocab 32000] [--ffn 1536] [--encoder-dim 1024] [--seq-len 128] [--micro-batch 1]
        [--reduce-bucket 20000000] [--prefetch-bucket 5000000] [--steps 3] [--adam fused|foreach]

For each ZeRO stage, two processes (gloo) train a random Llama of the given shape plus a linear
projector, all of it in bf16 and all of it trained (``mode full``), through ``deepspeed.initialize``
with the bucket sizes given. Each rank reads its resident memory (``VmRSS``) before the model is
built, and its peak (``VmHWM``, reset after ``deepspeed.initialize`` so the one-off flattening at
start-up is not counted) over the training steps. Measured = that peak minus the memory before the
model; it is set beside ``llark.model.memory.plan_memory`` for the same shape and settings, without
the plan's GPU-only overhead (CUDA context and allocator margin), and the fixed cost of two DeepSpeed
processes on CPU (measured first, on a model of a few hundred thousand parameters) taken off.

Buckets are kept smaller than the model so that they are written in full: on CPU a buffer's pages
count only once written, on a GPU the whole buffer counts. glibc serves every allocation over 64 KB
with mmap (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the resident set as it leaves a
GPU's allocated memory. ``--adam foreach`` shows what torch's default AdamW adds at each step.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1024**2


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def deepspeed_config(args, stage: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": args.reduce_bucket, "allgather_bucket_size": args.reduce_bucket}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=args.prefetch_bucket, stage3_param_persistence_threshold=100_000)
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": args.micro_batch * 2, "gradient_clipping": 1.0, "bf16": {"enabled": True},
            "zero_optimization": zero, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True,
                                                       **({"fused": True} if args.adam == "fused" else {})}}}


def worker(args) -> None:
    import deepspeed
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    before_model = memory_kb("VmRSS")

    class LmWithProjector(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = LlamaForCausalLM(LlamaConfig(
                hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab, tie_word_embeddings=False,
                max_position_embeddings=args.seq_len, attn_implementation="sdpa"))
            self.projector = nn.Linear(args.encoder_dim, args.hidden)

        def forward(self, input_ids, audio):
            embeds = self.lm.get_input_embeddings()(input_ids)
            embeds = torch.cat([self.projector(audio), embeds[:, audio.shape[1]:]], dim=1)
            return self.lm(inputs_embeds=embeds, labels=input_ids).loss

    model = LmWithProjector().to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    lm_params = sum(p.numel() for p in model.lm.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                      config=deepspeed_config(args, args.stage))
    after_init = memory_kb("VmRSS")
    reset_peak()
    generator = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        input_ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=generator)
        audio = torch.randn(args.micro_batch, 8, args.encoder_dim, generator=generator, dtype=torch.bfloat16)
        loss = engine(input_ids, audio)
        engine.backward(loss)
        engine.step()
    peak = memory_kb("VmHWM")
    Path(args.result).write_text(json.dumps({
        "rank": rank, "params": params, "lm_params": lm_params, "before_model_kb": before_model,
        "after_init_kb": after_init, "peak_kb": peak}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, stage: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        port = str(free_port())
        procs = []
        for rank in (0, 1):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                   # Tensors from mmap, returned on free: resident memory then follows the live tensors.
                   "MALLOC_MMAP_THRESHOLD_": "65536",
                   "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))}
            command = [sys.executable, __file__, "--worker", "--stage", str(stage), "--result", f"{tmp}/{rank}.json",
                       *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k in ("hidden", "layers", "vocab", "ffn", "encoder_dim", "seq_len", "micro_batch",
                                  "reduce_bucket", "prefetch_bucket", "steps", "adam")]]
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        for proc in procs:
            output, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"ZeRO-{stage} worker failed:\n{output[-3000:]}")
        return [json.loads(Path(f"{tmp}/{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--encoder-dim", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--reduce-bucket", type=int, default=20_000_000)
    parser.add_argument("--prefetch-bucket", type=int, default=5_000_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--adam", choices=["fused", "foreach"], default="fused",
                        help="torch AdamW's implementation (llark train uses fused)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from llark.model.memory import ModelShape, plan_memory

    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, ffn {args.ffn}, projector from "
          f"{args.encoder_dim}; bf16, all trained; micro-batch {args.micro_batch} x {args.seq_len} tokens; "
          f"2 processes; reduce bucket {args.reduce_bucket:,}, ZeRO-3 prefetch bucket {args.prefetch_bucket:,}")
    # What two DeepSpeed processes take whatever the model (gloo, the shared-memory all-reduce buffers, the
    # engine's own state): measured once on a model of a few hundred thousand parameters.
    tiny = argparse.Namespace(**{**vars(args), "hidden": 64, "layers": 2, "vocab": 1000, "ffn": 128,
                                 "encoder_dim": 32, "reduce_bucket": 1000, "prefetch_bucket": 1000})
    fixed = max(r["peak_kb"] - r["before_model_kb"] for r in measure(tiny, 2)) * 1024
    print(f"fixed cost of two DeepSpeed processes (a {64}-wide 2-layer model): {fixed / MB:.0f} MB")
    print(f"{'ZeRO':<5} {'measured MB':>12} {'- fixed':>8} {'plan MB':>8} {'plan/(measured-fixed)':>22}"
          f"   plan's parts (MB)")
    for stage in args.stages:
        ranks = measure(args, stage)
        measured = max(r["peak_kb"] - r["before_model_kb"] for r in ranks) * 1024
        shape = ModelShape(ranks[0]["lm_params"], args.hidden, args.layers, args.vocab, args.ffn)
        plan = plan_memory(shape, zero_stage=stage, micro_batch=args.micro_batch, seq_len=args.seq_len, gpus=2,
                           encoder_dim=args.encoder_dim, gradient_checkpointing=False,
                           reduce_bucket_size=args.reduce_bucket, prefetch_bucket_size=args.prefetch_bucket)
        parts = {k: v for k, v in plan.parts.items() if k != "overhead"}
        planned = sum(parts.values())
        detail = ", ".join(f"{k} {v / MB:.0f}" for k, v in parts.items())
        print(f"{stage:<5} {measured / MB:12.0f} {(measured - fixed) / MB:8.0f} {planned / MB:8.0f} "
              f"{planned / (measured - fixed):22.2f}   {detail}")
    print(f"(parameters: {ranks[0]['params']:,}; AdamW {args.adam}; the plan's CUDA overhead, 1.5 GB + 10 %, is "
          "left out)")


if __name__ == "__main__":
    main()
