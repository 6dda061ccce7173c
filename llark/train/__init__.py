"""Train LLark: a chat LM and a linear audio projector on webdataset shards, with DeepSpeed.

One process (CPU, DeepSpeed on gloo; the demo)::

    llark train --config launch/demo.yaml --set data.shards='["runs/demo/shards"]'

One node with 4 GPUs, or several nodes (see launch/README.md for the hostfile, SLURM and NCCL)::

    deepspeed --num_gpus 4 --module llark.train --config launch/llama2_7b_chat.yaml
    deepspeed --hostfile launch/hostfile --num_nodes 2 --num_gpus 4 --module llark.train --config launch/llama2_7b_chat.yaml

The defaults are the paper's (section 5 and appendix J): AdamW (0.9, 0.999), eps 1e-6, no weight
decay, cosine schedule with 3,000 warmup steps to 5e-5, 100k steps, global batch 32
(= micro_batch x grad_accum x world size), bf16 + TF32, loss on the answers only; the projector
and the whole LM are trained (``model.mode``: ``projector`` freezes the LM, ``lora`` trains PEFT
adapters, with ``model.quantization: 4bit`` for QLoRA on one GPU). Any Hugging Face chat LM can be
the backbone (its chat template's traits are read from it: llark/model/chat_template.py); ``stages:``
runs several stages in turn (llark/train/stages.py), ``data.mixture`` weighs the task families and
``validation.every`` logs a held-out loss (llark/train/validation.py).

The recipe: ``__init__`` validates the config, ``setup`` builds the parts in dependency order,
``train`` runs the loop, ``save_checkpoint`` writes an exactly resumable checkpoint (weights,
optimizer, schedule, data position and RNG of every rank), ``export`` writes the final model as a
Hugging Face directory that ``llark ask`` loads, ``cleanup`` closes what was opened.
"""

from llark.train.checkpoint import (
    CHECKPOINTS, RESUMABLE_CHANGES, TRAINER_STATE, complete_checkpoints, load_trained_weights, rng_state,
    set_rng_state,
)
from llark.train.config import (
    DataSection, LoraSection, ModelSection, OptimSection, TrainConfig, TrainConfigError, load_config,
)
from llark.train.distributed import REPO_ROOT, check_shared_directory, deepspeed_config, distributed_env
from llark.train.metrics import METRICS
from llark.train.optimizer import lr_multiplier
from llark.train.recipe import TrainRecipe, main

__all__ = [
    "CHECKPOINTS", "METRICS", "REPO_ROOT", "RESUMABLE_CHANGES", "TRAINER_STATE", "DataSection", "LoraSection",
    "ModelSection", "OptimSection", "TrainConfig", "TrainConfigError", "TrainRecipe", "check_shared_directory",
    "complete_checkpoints", "deepspeed_config", "distributed_env", "load_config", "load_trained_weights",
    "lr_multiplier", "main", "rng_state", "set_rng_state",
]
