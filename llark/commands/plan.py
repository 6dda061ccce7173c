"""``llark plan``: estimated per-GPU memory of a training run, before renting the GPUs."""

from __future__ import annotations

from llark.commands.common import add_verb


def register(sub) -> None:
    from llark.model.memory import MODELS

    p = add_verb(
        sub, "plan", "estimate per-GPU memory for a model size, ZeRO stage, batch, sequence length and GPU count",
        "Print the estimated memory per GPU (weights, gradients, optimizer state, activations,\n"
        "logits, overhead) of `llark train` with these settings; nothing is loaded. Formulas are in\n"
        "llark/model/memory.py; check the estimate with a short run.",
    )
    p.add_argument("--model", choices=sorted(MODELS), default="llama2-7b", help="language model size")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage")
    p.add_argument("--micro-batch", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length in tokens (a 25 s clip is 250 of them)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (data-parallel)")
    p.add_argument("--mode", choices=["full", "projector", "lora"], default="full", help="what is trained")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (--mode lora)")
    p.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="QLoRA weight quantization")
    p.add_argument("--encoder-dim", type=int, default=4800, help="projector input dimension")
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                   help="keep every layer's activations")
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer state in host memory")
    p.add_argument("--offload-params", action="store_true", help="parameters in host memory (ZeRO-3)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GB, to say whether it fits")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from llark.model.memory import MODELS, format_plan, plan_memory

    try:
        plan = plan_memory(MODELS[args.model], args.zero, args.micro_batch, args.seq_len, args.gpus, args.mode,
                           args.lora_rank, args.encoder_dim, args.quantization, args.checkpointing,
                           args.offload_optimizer, args.offload_params)
    except ValueError as exc:
        print(f"llark plan: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}, ZeRO-{args.zero}, mode {args.mode}, micro-batch {args.micro_batch}, "
          f"sequence {args.seq_len}, {args.gpus} GPUs")
    print(format_plan(plan, args.gpu_memory))
    return 0
