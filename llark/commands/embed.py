"""``llark embed``: run an audio encoder over every clip, one ``.npy`` per clip."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import HelpFormatter, add_runner_options, add_verb, run_stage_from_args
from pipeline.errors import EXIT_ITEMS_FAILED

JUKEBOX_OPTIONS = ("weights_dir", "layer", "device", "compute_dtype", "batch_windows", "context")


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
        "Encoders: features (the default; 128-dim log-mel, chroma, onset and tempogram frames at\n"
        "10 Hz, no weights) and jukebox (Jukebox-5B's top prior cut after layer 36, 4800-dim, mean-pooled\n"
        "to 10 Hz, as in LLark; needs vqvae.pth.tar and prior_level_2.pth.tar in --weights-dir and,\n"
        "in practice, a GPU).\n\n"
        "Output, in --embeddings-dir: <dataset>/<clip id>.npy, embeddings.jsonl (one record per clip),\n"
        "embeddings.errors.jsonl, and encoder.json (name, layer, frame rate, dim, dtype, versions).\n"
        "With --encoder jukebox, --workers defaults to one per GPU (each loads the model once), or 1 on CPU.\n\n"
        "--batch-size N hands each worker N clips at a time and encodes them together. The features\n"
        "encoder gains nothing from it (keep 1). Jukebox on a GPU wants 4-8: the clips' 8192-token\n"
        "windows (two per 25 s clip, about 1 GB of activations each) then share forward passes of\n"
        "--batch-windows windows. On CPU the arrays are bit-identical whatever the batch size; a\n"
        "batch that fails as a whole (the GPU out of memory) is encoded again one clip at a time.\n"
        "Neither option is part of the run's settings: a rerun may change them and resume.",
    )
    p.formatter_class = OptionalDefaultsFormatter
    p.add_argument("input", type=Path, help="input JSONL of clip records (clips.jsonl or augmented.jsonl)")
    p.add_argument("--embeddings-dir", required=True, type=Path, help="where the arrays and encoder.json go")
    p.add_argument("--out", type=Path, default=None,
                   help="output JSONL of embedding records (default: EMBEDDINGS_DIR/embeddings.jsonl)")
    p.add_argument("--encoder", default="features", choices=sorted(ENCODER_MODULES), help="the encoder")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype of the stored arrays")
    p.add_argument("--batch-size", type=int, default=1,
                   help="clips per encoder call (features: 1; jukebox on a GPU: 4-8, see above)")
    g = p.add_argument_group("jukebox encoder")
    g.add_argument("--weights-dir", default=None, type=Path,
                   help=f"directory holding vqvae.pth.tar and prior_level_2.pth.tar (default: {DEFAULT_WEIGHTS_DIR})")
    g.add_argument("--layer", type=int, default=None, help=f"transformer layer whose output is kept (default: {DEFAULT_LAYER})")
    g.add_argument("--device", default=None,
                   help="auto, cpu, cuda or cuda:N (default: auto; cuda gives each worker its own GPU; with "
                        "--executor ray: cuda when --ray-num-gpus > 0, else cpu)")
    g.add_argument("--compute-dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="transformer precision (default: auto = float16 on CUDA, float32 on CPU)")
    g.add_argument("--batch-windows", type=int, default=None,
                   help="8192-token windows per forward pass, from one clip or several (default: twice "
                        "--batch-size: a 25 s clip is 2 windows); lower it if the GPU runs out of memory")
    g.add_argument("--context", default=None, choices=["cover", "truncate"],
                   help="cover: encode the whole clip in 8192-token windows; truncate: the first 23.8 s only "
                        "(default: cover)")
    add_runner_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.contracts import EMBEDDINGS_JSONL
    from pipeline.embed import embed_stage, make_settings, prepare_embeddings_dir
    from pipeline.runner import StageConfigError

    given = {name: getattr(args, name) for name in JUKEBOX_OPTIONS if getattr(args, name) is not None}
    if args.encoder != "jukebox" and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise StageConfigError(f"{flags}: only for --encoder jukebox")
    if given.get("weights_dir") is not None:
        given["weights_dir"] = str(given["weights_dir"])
    if not args.input.is_file():
        raise StageConfigError(f"input file {args.input} does not exist")
    if args.batch_size < 1:
        raise StageConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.encoder == "jukebox" and "batch_windows" not in given:
        given["batch_windows"] = 2 * args.batch_size  # a batch of 25 s clips in one forward pass
    on_ray = args.executor == "ray"
    if on_ray and args.encoder == "jukebox" and "device" not in given:
        given["device"] = "cuda" if args.ray_num_gpus > 0 else "cpu"
    settings = make_settings(args.encoder, args.embeddings_dir, args.dtype, given, devices_here=not on_ray)
    if args.encoder == "jukebox" and not on_ray:
        device = settings.options["device"]
        if args.workers is None:
            args.workers = _jukebox_workers(device)
        if device == "cuda":
            import torch

            if args.workers > torch.cuda.device_count():
                raise StageConfigError(f"--workers {args.workers}: one jukebox worker per GPU, and this machine "
                                       f"has {torch.cuda.device_count()}")
    prepare_embeddings_dir(settings)
    args.out = args.out or args.embeddings_dir / EMBEDDINGS_JSONL
    return run_stage_from_args(embed_stage(settings, batch_size=args.batch_size), args)


def _jukebox_workers(device: str) -> int:
    """One worker per GPU (each holds its own copy of the model); one on CPU."""
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return EXIT_ITEMS_FAILED
