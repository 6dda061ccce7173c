"""``llark embed``: run an audio encoder over every clip, one ``.npy`` per clip."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import HelpFormatter, add_runner_options, add_verb, run_stage_from_args

# Every encoder option the command takes; each encoder says which of them it reads (its DEFAULT_OPTIONS).
ENCODER_OPTIONS = ("weights_dir", "layer", "layers", "frame_rate", "window_seconds", "device", "compute_dtype",
                   "batch_windows", "context")


class OptionalDefaultsFormatter(HelpFormatter):
    """Leaves out "(default: None)" for options whose help text states the default itself."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def register(sub) -> None:
    from pipeline.encoders import ENCODER_MODULES
    from pipeline.encoders.jukebox import DEFAULT_LAYER, DEFAULT_WEIGHTS_DIR

    p = add_verb(
        sub, "embed", "encode every clip's audio into a [frames, dim] array (.npy)",
        "Run an audio encoder over each clip record's clip_path (from `llark crop`).\n\n"
        "Encoders: features (the default; 128-dim log-mel, chroma, onset and tempogram frames at 10 Hz, no\n"
        "weights); jukebox (Jukebox-5B's top prior cut after layer 36, 4800-dim at 10 Hz, as in LLark; needs\n"
        "vqvae.pth.tar and prior_level_2.pth.tar in --weights-dir and, in practice, a GPU); mert (MERT-v1-95M or\n"
        "330M), whisper (Whisper's encoder, tiny ... large-v3) and clap (LAION CLAP's HTSAT audio tower), each\n"
        "read from a local copy of its Hugging Face checkpoint given with --weights-dir. Nothing is downloaded.\n\n"
        "mert, whisper and clap cut a clip into windows of their own length (5 s, 30 s, 10 s), keep the\n"
        "hidden states --layers names (one, the mean of a range, or all of them: [states, frames, dim]) and\n"
        "pool the frames to --frame-rate (10 Hz by default; clap's own rate is 3.2 Hz).\n\n"
        "Output, in --embeddings-dir: <dataset>/<clip id>.npy, embeddings.jsonl (one record per clip),\n"
        "embeddings.errors.jsonl, and encoder.json (name, layer, frame rate, dim, dtype, the checkpoint's\n"
        "identity, versions). The storage the run will take is printed before it starts. Encoders with a\n"
        "model get one worker per GPU by default (each loads the model once), or 1 on CPU.\n\n"
        "--batch-size N hands each worker N clips at a time and encodes them together (features gains nothing\n"
        "from it; the others on a GPU want 4-8): their windows share forward passes of --batch-windows windows.\n"
        "On CPU the arrays are the same whatever the batch size (to float rounding); a batch that fails as a\n"
        "whole (the GPU out of memory) is encoded again one clip at a time. Neither option is part of the\n"
        "run's settings: a rerun may change them and resume.",
    )
    p.formatter_class = OptionalDefaultsFormatter
    p.add_argument("input", type=Path, help="input JSONL of clip records (clips.jsonl or augmented.jsonl)")
    p.add_argument("--embeddings-dir", required=True, type=Path, help="where the arrays and encoder.json go")
    p.add_argument("--out", type=Path, default=None,
                   help="output JSONL of embedding records (default: EMBEDDINGS_DIR/embeddings.jsonl)")
    p.add_argument("--encoder", default="features", choices=sorted(ENCODER_MODULES), help="the encoder")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype of the stored arrays")
    p.add_argument("--batch-size", type=int, default=1,
                   help="clips per encoder call (features: 1; the others on a GPU: 4-8, see above)")
    g = p.add_argument_group("encoders with a model (jukebox, mert, whisper, clap)")
    g.add_argument("--weights-dir", default=None, type=Path,
                   help=f"the checkpoint's directory (jukebox default: {DEFAULT_WEIGHTS_DIR}; the others: required)")
    g.add_argument("--device", default=None,
                   help="auto, cpu, cuda or cuda:N (default: auto; cuda gives each worker its own GPU; with "
                        "--executor ray: cuda when --ray-num-gpus > 0, else cpu)")
    g.add_argument("--compute-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="model precision (default: auto = float16 on CUDA, float32 on CPU)")
    g.add_argument("--batch-windows", type=int, default=None,
                   help="windows per forward pass, from one clip or several (jukebox: 8192-token windows, default "
                        "twice --batch-size; the others: default 8); lower it if the GPU runs out of memory")
    g = p.add_argument_group("mert, whisper and clap")
    g.add_argument("--layers", default=None,
                   help="hidden states kept: L (one; 0 is the input to the first layer), A-B (their mean), mean (all "
                        "averaged), last, or all (every state, stored [states, frames, dim]); default: mert mean, "
                        "whisper and clap last")
    g.add_argument("--frame-rate", default=None,
                   help="frames per second stored, by mean-pooling (default 10, or the encoder's own rate where "
                        "lower: clap 3.2); native keeps the encoder's frames (mert 75, whisper 50)")
    g.add_argument("--window-seconds", type=float, default=None,
                   help="mert only: the window each forward pass sees (default 5, MERT's pre-training length)")
    g = p.add_argument_group("jukebox encoder")
    g.add_argument("--layer", type=int, default=None, help=f"transformer layer whose output is kept (default: {DEFAULT_LAYER})")
    g.add_argument("--context", default=None, choices=["cover", "truncate"],
                   help="cover: encode the whole clip in 8192-token windows; truncate: the first 23.8 s only "
                        "(default: cover)")
    add_runner_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.contracts import EMBEDDINGS_JSONL
    from pipeline.embed import embed_stage, make_settings, prepare_embeddings_dir
    from pipeline.encoders import encoder_module
    from pipeline.runner import StageConfigError

    given = {name: getattr(args, name) for name in ENCODER_OPTIONS if getattr(args, name) is not None}
    accepted = getattr(encoder_module(args.encoder), "DEFAULT_OPTIONS", {})
    if foreign := [name for name in given if name not in accepted]:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise StageConfigError(f"{flags}: not an option of the {args.encoder} encoder")
    if given.get("weights_dir") is not None:
        given["weights_dir"] = str(given["weights_dir"])
    if not args.input.is_file():
        raise StageConfigError(f"input file {args.input} does not exist")
    if args.batch_size < 1:
        raise StageConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.encoder == "jukebox" and "batch_windows" not in given:
        given["batch_windows"] = 2 * args.batch_size  # a batch of 25 s clips in one forward pass
    on_ray = args.executor == "ray"
    has_model = "device" in accepted
    if on_ray and has_model and "device" not in given:
        given["device"] = "cuda" if args.ray_num_gpus > 0 else "cpu"
    settings = make_settings(args.encoder, args.embeddings_dir, args.dtype, given, devices_here=not on_ray)
    if has_model and not on_ray:
        device = settings.options["device"]
        if args.workers is None:
            args.workers = _model_workers(device)
        if device == "cuda":
            import torch

            if args.workers > torch.cuda.device_count():
                raise StageConfigError(f"--workers {args.workers}: one {args.encoder} worker per GPU, and this "
                                       f"machine has {torch.cuda.device_count()}")
    manifest = prepare_embeddings_dir(settings)
    print_storage(manifest, args.input)
    args.out = args.out or args.embeddings_dir / EMBEDDINGS_JSONL
    return run_stage_from_args(embed_stage(settings, batch_size=args.batch_size), args)


def print_storage(manifest: dict, input_path: Path) -> None:
    """The disk the run's arrays will take, said once before any work."""
    from pipeline.embed import storage_estimate
    from pipeline.records import iter_jsonl

    durations = []
    for line in iter_jsonl(input_path):
        if line.obj is not None:
            start, end = line.obj.get("start_s"), line.obj.get("end_s")
            if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end > start:
                durations.append(float(end - start))
    estimate = storage_estimate(manifest, durations)
    shape = (f"{estimate['states']} states x {manifest['dim']}" if estimate["states"] > 1 else f"{manifest['dim']}")
    layer = "" if manifest["layer"] is None else f", layer {manifest['layer']}"
    print(f"embed: {manifest['name']}{layer}, {shape}-dim {manifest['dtype']} frames at {manifest['frame_rate_hz']:g} Hz: "
          f"{human_bytes(estimate['per_second'] * 60)} per minute of audio; "
          + (f"{human_bytes(estimate['per_clip'])} per {estimate['median_s']:.1f} s clip (the median), "
             f"{human_bytes(estimate['total'])} for the {estimate['clips']} clips with a known duration"
             if estimate["clips"] else "no clip record gives its duration"), flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _model_workers(device: str) -> int:
    """One worker per GPU (each holds its own copy of the model); one on CPU."""
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return 1
