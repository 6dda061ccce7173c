"""Memory and time of the training loss: logits at every position (the usual causal-LM loss) against
logits at the supervised positions only (``LlarkModel.forward(labels=...)``), side by side.

    .venv/bin/python benchmarks/loss_memory.py [--vocab 32000 152064] [--seq 512 2048] [--answer 20]
        [--micro-batch 1] [--hidden 256] [--layers 2] [--steps 3]

For each vocabulary and sequence length, a small random Llama (``--hidden`` x ``--layers``, so that
the loss, not the layers, is what differs) takes forward + backward steps on the same batch of
``--micro-batch`` rows, each with ``--answer`` supervised tokens at its end. Each variant runs in a
fresh process: its peak resident memory (``ru_maxrss``), less that of the same process that builds
the model and batch but takes no step, is the step's own memory; the step time is the median over
``--steps`` after a warm-up.
The same step without the output layer and loss (the decoder alone) is measured too: the
difference is the loss's own memory (logits, their fp32 copy, their gradient; the output layer's
weight gradient, the same in every variant, is allocated in that step too). The loss values of the two variants are printed too: they must agree. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from llark.model.chat import IGNORE_INDEX
    from llark.model.llark import LlarkConfig, LlarkModel

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=args.seq, tie_word_embeddings=False))
    audio_id, frames, dim = args.vocab - 1, 16, 32
    model = LlarkModel(lm, torch.nn.Linear(dim, args.hidden), audio_id, LlarkConfig(lm_path=".", encoder_dim=dim))
    b, s = args.micro_batch, args.seq
    input_ids = torch.randint(0, args.vocab - 1, (b, s))
    input_ids[:, 1:1 + frames] = audio_id
    labels = torch.full((b, s), IGNORE_INDEX)
    labels[:, -args.answer:] = input_ids[:, -args.answer:]
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), audio=torch.randn(b, frames, dim),
                  audio_frames=torch.full((b,), frames))

    def every_position() -> torch.Tensor:
        embeds = model.embed(inputs["input_ids"], inputs["audio"], inputs["audio_frames"])
        logits = model.lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    def supervised_only() -> torch.Tensor:
        return model(**inputs, labels=labels)[1]

    def no_output_layer() -> torch.Tensor:
        """The step without its loss: the decoder only, so that the loss's own memory can be told apart."""
        embeds = model.embed(inputs["input_ids"], inputs["audio"], inputs["audio_frames"])
        hidden = model.lm.get_decoder()(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                        use_cache=False).last_hidden_state
        # The output layer's weight gradient is the same size in both variants: made here too (zeros).
        return hidden.float().square().mean() + 0 * model.lm.get_output_embeddings().weight.sum()

    step = {"every": every_position, "supervised": supervised_only, "none": no_output_layer}[args.variant]
    times = []
    for _ in range(args.steps + 1):  # the first is a warm-up
        t = time.perf_counter()
        loss = step()
        loss.backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    print(json.dumps({"loss": loss.item(), "seconds": statistics.median(times[1:]),
                      "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "threads": torch.get_num_threads()}))


def run_variant(args, vocab: int, seq: int, variant: str) -> dict:
    """One variant in a fresh process, and the same process without a step, whose peak is subtracted."""
    def run(*extra: str) -> dict:
        command = [sys.executable, __file__, "--child", "--variant", variant, "--vocab", str(vocab), "--seq", str(seq),
                   "--answer", str(args.answer), "--micro-batch", str(args.micro_batch), "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--steps", str(args.steps), *extra]
        done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.splitlines()[-1])

    measured = run()
    measured["step_kb"] = measured["peak_kb"] - run("--no-step")["peak_kb"]
    return measured


def baseline_child(args) -> None:
    """The same process without any step: model and batch built, nothing run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                 num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=args.seq, tie_word_embeddings=False))
    torch.randint(0, args.vocab - 1, (args.micro_batch, args.seq))
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32_000, 152_064])
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--answer", type=int, default=20, help="supervised tokens per row")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-step", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["every", "supervised", "none"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.vocab, args.seq = args.vocab[0], args.seq[0]
        (baseline_child if args.no_step else child)(args)
        return
    print(f"micro-batch {args.micro_batch}, {args.answer} supervised tokens per row, a {args.layers}-layer "
          f"{args.hidden}-wide Llama, float32, CPU")
    print(f"{'vocab':>7} {'seq':>5} | {'every position':>27} | {'supervised only':>27} | {'loss memory':>11} "
          f"{'time':>5} | loss values")
    print(f"{'':>7} {'':>5} | {'step MB':>8} {'loss MB':>8} {'s/step':>9} | {'step MB':>8} {'loss MB':>8} {'s/step':>9} | "
          f"{'ratio':>11} {'ratio':>5} |")
    threads = None
    for vocab in args.vocab:
        for seq in args.seq:
            none = run_variant(args, vocab, seq, "none")
            every = run_variant(args, vocab, seq, "every")
            mine = run_variant(args, vocab, seq, "supervised")
            threads = every["threads"]
            loss_every, loss_mine = (max(1, r["step_kb"] - none["step_kb"]) / 1024 for r in (every, mine))
            print(f"{vocab:>7} {seq:>5} | {every['step_kb'] / 1024:8.0f} {loss_every:8.0f} {every['seconds']:9.3f} | "
                  f"{mine['step_kb'] / 1024:8.0f} {loss_mine:8.0f} {mine['seconds']:9.3f} | "
                  f"{loss_every / loss_mine:10.1f}x {every['seconds'] / mine['seconds']:4.1f}x | "
                  f"{every['loss']:.5f} vs {mine['loss']:.5f}")
    print(f"(torch threads: {threads}; step MB: the step's peak resident memory above the model and batch alone; "
          "loss MB: that less the same step without the output layer and loss)")


if __name__ == "__main__":
    main()
