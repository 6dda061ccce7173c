"""Sizing a full run from measured figures: CPU-hours, GPU-hours and API spend.

The CPU figures come from a run the user made (the demo, or a sample of their own data): every
runner stage's ledger keeps each item's CPU seconds, and ``measure_stages`` averages them. What
cannot be measured on a machine without a GPU is computed from the model's size, and says so:

- Embedding: each encoder's FLOPs per clip from its architecture (``pipeline.encoders.costs``;
  Jukebox-5B cut after layer 36 is about 82 TFLOP per 25 s clip, MERT-v1-95M about 0.5).
- Training: 6 FLOP per parameter per token (forward and backward) over steps × global batch ×
  tokens per sample.

GPU time is FLOP / (the GPU's dense bf16 peak × the fraction of it a real run reaches).
API spend is requests × (input tokens × input price + output tokens × output price), with input
tokens estimated as characters / 4 of the system prompt and the clip's JSON in the measured run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.encoders.costs import encoder_costs
from pipeline.runner import ledger_path

# Output files of each runner stage in a run directory laid out like `make demo`'s.
STAGE_OUTPUTS = {
    "crop": "clips.jsonl",
    "augment": "augmented.jsonl",
    "embed": "embeddings/embeddings.jsonl",
}


@dataclass(frozen=True)
class StageFigures:
    stage: str
    items: int
    cpu_s_per_item: float
    wall_s_per_item: float


def measure_stages(run_dir: Path) -> dict[str, StageFigures]:
    """Mean CPU and wall seconds per item of every stage whose ledger is in ``run_dir``."""
    figures = {}
    for stage, name in STAGE_OUTPUTS.items():
        ledger = ledger_path(run_dir / name)
        if not ledger.exists():
            continue
        cpu, wall = [], []
        for line in ledger.read_text().splitlines()[1:]:
            entry = json.loads(line)
            if entry.get("ok") and "cpu_s" in entry:
                cpu.append(entry["cpu_s"])
                wall.append(entry["wall_s"])
        if cpu:
            figures[stage] = StageFigures(stage, len(cpu), statistics.fmean(cpu), statistics.fmean(wall))
    return figures


def prompt_tokens_per_request(run_dir: Path, prompts_dir: Path) -> float:
    """Estimated input tokens of one request: the system prompt's files and a clip's JSON, chars / 4."""
    system_chars = sum(len(p.read_text()) for p in (prompts_dir / "system").glob("*.txt"))
    system_chars += len((prompts_dir / "fields" / "augmented.txt").read_text())
    task_chars = statistics.fmean(len(p.read_text()) for p in (prompts_dir / "tasks").glob("*.txt"))
    records = [json.loads(line) for line in (run_dir / "augmented.jsonl").read_text().splitlines()[:200]]
    clip_chars = statistics.fmean(len(json.dumps({**r["annotations"], **r["features"]})) for r in records)
    return (system_chars + task_chars + clip_chars) / 4


@dataclass(frozen=True)
class FullRun:
    tracks: int = 164_000
    understanding_requests: int = 164_000
    reasoning_requests: int = 100_000  # at most 25k tracks for each of the four datasets that get reasoning
    captioning_requests: int = 3_799  # MusicNet's train windows; MusicCaps and YT8M captions are free
    understanding_model: str = "gpt-3.5-turbo"
    reasoning_model: str = "gpt-4"
    output_tokens: tuple[tuple[str, int], ...] = (("understanding", 600), ("captioning", 400), ("reasoning", 1100))
    gpu_tflops: float = 312.0  # A100 dense bf16
    gpu_utilization: float = 0.4
    lm_params: float = 6.74e9  # Llama-2-7b
    train_steps: int = 100_000
    global_batch: int = 32
    tokens_per_sample: int = 400  # 250 audio frames and the question and answer


def estimate(run: FullRun, figures: dict[str, StageFigures], input_tokens: float, prices, batch_api: bool) -> list[str]:
    """The table ``llark plan --pipeline`` prints."""
    lines = [f"full run: {run.tracks:,} tracks; CPU figures measured per item, GPU and API figures computed"]
    cpu_hours = 0.0
    for stage in ("crop", "augment"):
        f = figures.get(stage)
        if f is None:
            lines.append(f"  {stage:28s} not measured (no ledger with CPU timings in the run directory)")
            continue
        hours = run.tracks * f.cpu_s_per_item / 3600
        cpu_hours += hours
        lines.append(f"  {stage:28s} {f.cpu_s_per_item:7.3f} CPU s/clip (from {f.items} items) → {hours:9,.1f} CPU-hours")
    lines.append(f"  {'CPU total':28s} {'':22s}   {cpu_hours:9,.1f} CPU-hours")
    gpu_flops = run.gpu_tflops * 1e12 * run.gpu_utilization
    train_flop = 6 * run.lm_params * run.train_steps * run.global_batch * run.tokens_per_sample
    train_hours = train_flop / gpu_flops / 3600
    for cost in encoder_costs():
        flop = cost.flop_per_clip()
        lines.append(f"  {'embed (' + cost.label + ')':28s} {flop / 1e12:7.2f} TFLOP/clip → "
                     f"{run.tracks * flop / gpu_flops / 3600:9,.1f} GPU-hours")
    lines.append(f"  {'train (computed)':28s} {train_flop / 1e18:7.1f} EFLOP      → {train_hours:9,.1f} GPU-hours")
    lines.append(f"  GPU-hours at {run.gpu_tflops:g} TFLOPS peak × {run.gpu_utilization:g} utilisation "
                 f"(the paper trained on 4 A40s for about 54 hours)")
    discount = prices.batch_discount if batch_api else 1.0
    out_tokens = dict(run.output_tokens)
    total = 0.0
    for family, requests, model in (("understanding", run.understanding_requests, run.understanding_model),
                                    ("captioning", run.captioning_requests, run.understanding_model),
                                    ("reasoning", run.reasoning_requests, run.reasoning_model)):
        usd = prices.price(model).cost(requests * input_tokens, requests * out_tokens[family], discount)
        total += usd
        lines.append(f"  {'API ' + family:28s} {requests:9,d} requests to {model:14s} → ${usd:10,.0f}")
    lines.append(f"  {'API total':28s} {'':22s}   ${total:10,.0f}" + (" (Batch API price)" if batch_api else ""))
    lines.append(f"  API figures: about {input_tokens:,.0f} input tokens per request (characters / 4 of the "
                 "prompt and the measured clips' JSON) and " + ", ".join(f"{n} output tokens for {f}" for f, n in out_tokens.items()))
    return lines
