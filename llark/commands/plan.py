"""``llark plan``: estimated per-GPU memory of a training run, and (``--pipeline``) the CPU-hours,
GPU-hours and API spend of a full run sized from a measured run."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_verb
from pipeline.errors import EXIT_CONFIG, EXIT_OK


def register(sub) -> None:
    from llark.model.memory import CLIP_FRAMES, MODELS

    p = add_verb(
        sub, "plan", "estimate per-GPU memory for a model size, ZeRO stage, batch, sequence length and GPU count",
        "Print the estimated memory per GPU (weights, gradients, optimizer state, activations,\n"
        "logits, overhead) of `llark train` with these settings, the --connector's exact parameters\n"
        "and audio tokens included; nothing is loaded. Formulas are in llark/model/memory.py; check the\n"
        "estimate with a short run.\n\n"
        "With --pipeline RUN_DIR: the cost of the paper's full run (164k tracks, ~1.2M Q/A pairs) in\n"
        "CPU-hours (from the CPU seconds per clip measured in RUN_DIR's ledgers, e.g. runs/demo),\n"
        "GPU-hours (embedding with each encoder, and training, computed from FLOPs) and API spend.\n\n"
        "With --encoder NAME (or all): the GPU time and disk to embed --tracks clips with that encoder at\n"
        "its real size (Jukebox-5B, MERT-v1-95M/330M, Whisper large-v3, CLAP HTSAT), from its FLOPs.",
    )
    p.add_argument("--model", choices=sorted(MODELS), default="llama2-7b", help="language model size")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage")
    p.add_argument("--micro-batch", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="sequence length in tokens at one audio token per frame (a 25 s clip is 250 of them); "
                        "a connector that makes fewer audio tokens shortens it by the difference")
    p.add_argument("--audio-frames", type=int, default=CLIP_FRAMES,
                   help="encoder frames per sequence, fed to the connector (a 25 s clip at 10 Hz: 250)")
    p.add_argument("--supervised-tokens", type=int, default=128,
                   help="answer tokens per sequence: the loss's logits are computed there only")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (data-parallel)")
    p.add_argument("--mode", choices=["full", "projector", "lora"], default="full", help="what is trained")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (--mode lora)")
    p.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="QLoRA weight quantization")
    p.add_argument("--encoder-dim", type=int, default=4800, help="connector input dimension")
    p.add_argument("--connector", default="linear", metavar="linear|mlp|qformer",
                   help="the connector (model.connector.name); its parameters are counted exactly")
    p.add_argument("--connector-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a connector setting (model.connector.KEY: hidden; window, queries, layers, heads, width); "
                        "repeatable")
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                   help="keep every layer's activations")
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer state in host memory")
    p.add_argument("--offload-params", action="store_true", help="parameters in host memory (ZeRO-3)")
    p.add_argument("--deepspeed", type=Path, default=None, metavar="JSON",
                   help="take the ZeRO stage, offload and bucket sizes from this DeepSpeed config "
                        "(e.g. launch/zero3.json) instead of --zero and --offload-*")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GB, to say whether it fits")
    g = p.add_argument_group("embedding cost per encoder (--encoder)")
    g.add_argument("--encoder", choices=["all", "jukebox", "mert", "whisper", "clap"], default=None,
                   help="print the GPU time and disk to embed --tracks clips with this encoder at its real size "
                        "(all: every one, beside Jukebox-5B)")
    g.add_argument("--clip-seconds", type=float, default=25.0, help="seconds per clip (--encoder)")
    g = p.add_argument_group("full-run cost (--pipeline)")
    g.add_argument("--pipeline", type=Path, default=None, metavar="RUN_DIR",
                   help="size the full run from the figures measured in this run directory")
    g.add_argument("--tracks", type=int, default=164_000, help="tracks in the full run")
    g.add_argument("--reasoning-requests", type=int, default=100_000, help="reasoning requests (25k per dataset at most)")
    g.add_argument("--gpu-tflops", type=float, default=312.0, help="the GPU's dense bf16 peak (A100: 312)")
    g.add_argument("--gpu-utilization", type=float, default=0.4, help="the fraction of the peak a real run reaches")
    g.add_argument("--batch-api", action="store_true", help="price the requests at the Batch API's discount")
    g.add_argument("--prompts-dir", type=Path, default=None, help="the prompts (default: the project's prompts/)")
    p.set_defaults(func=run)


def connector_settings(args) -> dict:
    """``model.connector`` from --connector and --connector-option, checked (ValueError naming the field)."""
    from llark.model.connectors import check_connector

    settings = {"name": args.connector}
    for option in args.connector_option:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--connector-option: KEY=VALUE, got {option!r}")
        if key.strip() == "name":
            raise ValueError("--connector-option: the connector's name is --connector")
        try:
            settings[key.strip()] = int(value)
        except ValueError:
            settings[key.strip()] = value  # check_connector names the field and what it wants
    return check_connector(settings)


def run(args) -> int:
    import sys

    connector = {"name": "linear"}
    if args.connector != "linear" or args.connector_option or args.pipeline is None and args.encoder is None:
        try:
            connector = connector_settings(args)
        except ValueError as exc:
            print(f"llark plan: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.pipeline is not None:
        return run_pipeline_plan(args, connector)
    if args.encoder is not None:
        from pipeline.encoders.costs import cost_table

        if not 0 < args.gpu_utilization <= 1 or args.clip_seconds <= 0 or args.tracks < 1:
            print("llark plan: error: --gpu-utilization must be in (0, 1], --clip-seconds and --tracks positive",
                  file=sys.stderr)
            return EXIT_CONFIG
        for line in cost_table(args.tracks, args.clip_seconds, args.gpu_tflops, args.gpu_utilization, args.encoder):
            print(line)
        return EXIT_OK
    from llark.model.connectors import audio_tokens
    from llark.model.memory import MODELS, deepspeed_settings, format_plan, lm_sequence, plan_memory

    zero = {"zero_stage": args.zero, "offload_optimizer": args.offload_optimizer,
            "offload_params": args.offload_params}
    try:
        if args.deepspeed is not None:
            zero = deepspeed_settings(args.deepspeed)
        seq_len = lm_sequence(args.seq_len, connector, args.audio_frames)
        plan = plan_memory(MODELS[args.model], micro_batch=args.micro_batch, seq_len=seq_len, gpus=args.gpus,
                           mode=args.mode, lora_rank=args.lora_rank, encoder_dim=args.encoder_dim,
                           quantization=args.quantization, gradient_checkpointing=args.checkpointing,
                           supervised_tokens=args.supervised_tokens, connector=connector,
                           audio_frames=args.audio_frames, **zero)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"llark plan: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    offload = [name for name, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_params"))
               if zero[key]]
    sequence = str(args.seq_len) if seq_len == args.seq_len else (
        f"{args.seq_len} ({seq_len} with the {connector['name']}'s "
        f"{audio_tokens(connector, args.audio_frames)} audio tokens for {args.audio_frames} frames)")
    print(f"{args.model}, ZeRO-{zero['zero_stage']}{', offloaded: ' + ' and '.join(offload) if offload else ''}, "
          f"mode {args.mode}, micro-batch {args.micro_batch}, sequence {sequence}, {args.gpus} GPUs")
    print(format_plan(plan, args.gpu_memory))
    return EXIT_OK


def run_pipeline_plan(args, connector: dict) -> int:
    from llark.model.connectors import audio_tokens
    from llark.model.memory import CLIP_FRAMES, lm_sequence
    from pipeline.instructions.costs import PriceTable
    from pipeline.instructions.prompts import find_prompts_dir
    from pipeline.plan import FullRun, estimate, measure_stages, prompt_tokens_per_request
    from pipeline.runner import StageConfigError

    run_dir = args.pipeline
    if not (run_dir / "augmented.jsonl").exists():
        raise StageConfigError(f"--pipeline: {run_dir} holds no augmented.jsonl; run `make demo RUN={run_dir}` "
                               "(or the stages on a sample of your data) first")
    if not 0 < args.gpu_utilization <= 1:
        raise StageConfigError(f"--gpu-utilization must be in (0, 1], got {args.gpu_utilization}")
    prompts_dir = find_prompts_dir(args.prompts_dir)
    prices = PriceTable.load(prompts_dir / "model_prices.yaml")
    # FullRun's tokens per sample are a 25 s clip's 250 frames, one token each, and the text.
    clip_tokens = audio_tokens(connector, CLIP_FRAMES)
    full = FullRun(tracks=args.tracks, understanding_requests=args.tracks, reasoning_requests=args.reasoning_requests,
                   gpu_tflops=args.gpu_tflops, gpu_utilization=args.gpu_utilization,
                   tokens_per_sample=lm_sequence(FullRun.tokens_per_sample, connector, CLIP_FRAMES))
    for line in estimate(full, measure_stages(run_dir), prompt_tokens_per_request(run_dir, prompts_dir), prices,
                         args.batch_api):
        print(line)
    print(f"  training sized at {full.tokens_per_sample} tokens per sample: the {connector['name']} connector's "
          f"{clip_tokens} audio tokens per 25 s clip at 10 Hz and {FullRun.tokens_per_sample - CLIP_FRAMES} of text")
    return EXIT_OK
