"""``llark train``: fine-tune the projector and the language model on shards, with DeepSpeed."""

from __future__ import annotations

from pathlib import Path

from llark.commands.common import add_verb
from llark.options import parse_key_values
from pipeline.errors import EXIT_CONFIG, EXIT_OK


def register(sub) -> None:
    p = add_verb(
        sub, "train", "train the projector and the language model on webdataset shards (DeepSpeed)",
        "Train LLark on the shards stage's output. Settings come from --config (a YAML file; see\n"
        "launch/llama2_7b_chat.yaml for the paper's run and launch/demo.yaml for the CPU demo) and\n"
        "--set KEY=VALUE overrides (dotted keys: --set optim.lr=1e-4 --set data.shards='[\"DIR\"]').\n"
        "Output (output_dir): checkpoints/step_N/ (resumable exactly; the run resumes from the latest\n"
        "by default), metrics.jsonl, tensorboard/, and final/ (a Hugging Face directory with the\n"
        "projector and llark_config.json). On several GPUs or nodes, launch `python -m llark.train`\n"
        "with the deepspeed launcher (launch/README.md).",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from llark.train import TrainConfigError, load_config, main

    try:
        config = load_config(args.config, parse_key_values(args.set))
        main(config)
    except (TrainConfigError, ValueError) as exc:
        from llark.data import DataConfigError
        from llark.model import ModelConfigError

        if not isinstance(exc, (TrainConfigError, DataConfigError, ModelConfigError)):
            raise
        print(f"llark train: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
