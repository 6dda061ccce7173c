"""Training in stages: one config names a sequence of stages, run one after the other, each starting
from the weights the one before it exported.

A stage is a part of the training config (any of ``model``, ``data``, ``optim`` and the batch and
logging settings) written over the run's own settings::

    stages:
      - name: connector                 # LTU's and LLaVA's first stage: the projector alone
        model: {mode: projector}
        data: {task_families: [captioning, understanding]}
        optim: {max_steps: 5000, projector_lr: 1.0e-3, warmup_steps: 200}
      - name: instruct                  # then the LM too, on every family
        model: {mode: lora}
        optim: {max_steps: 20000, lr: 2.0e-4}

Stage ``k`` trains in ``output_dir/stages/<k>-<name>/`` (its checkpoints, metrics and config) and
exports to ``final/`` there; stage ``k + 1`` starts from that export (``model.init_from``); the last
stage exports to ``output_dir/final``. A stage that has exported writes ``stage.json``; a rerun of
the same command skips the stages that did and resumes the first that did not from its latest
checkpoint, exactly, so a run killed anywhere (inside a stage, between two) continues where it
was. Every stage's settings are validated when the config is read, before the first stage starts;
checkpoints record their stage (``stage``), and a checkpoint of another stage is refused.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.files import write_json

if TYPE_CHECKING:
    from llark.train.config import TrainConfig

STAGE_DONE = "stage.json"
STAGES_DIR = "stages"
# Settings that belong to the whole run: the driver sets them for each stage.
RUN_FIELDS = ("stages", "stage", "output_dir", "export_dir", "resume", "export")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_dir(cfg: "TrainConfig", index: int, name: str) -> Path:
    return Path(cfg.output_dir) / STAGES_DIR / f"{index + 1}-{name}"


def stage_configs(cfg: "TrainConfig") -> list["TrainConfig"]:
    """The config of each stage: the run's settings with the stage's written over them, chained by
    ``model.init_from``; ValueError naming the stage and the field for an invalid one."""
    from llark.train.config import TrainConfig

    base = cfg.model_dump(mode="json")
    for key in ("stages", "stage", "export_dir"):
        base.pop(key)
    names: list[str] = []
    configs: list[TrainConfig] = []
    for index, stage in enumerate(cfg.stages):
        stage = dict(stage)
        name = stage.pop("name", None)
        where = f"stages[{index}]" + (f" ({name})" if name else "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}: a stage needs a name of letters, digits, '_' and '-', got {name!r}")
        if name in names:
            raise ValueError(f"{where}: two stages are called {name!r}")
        names.append(name)
        for key in RUN_FIELDS:
            if key in stage:
                raise ValueError(f"{where}: {key} is set for the whole run, not per stage")
        if "init_from" in (stage.get("model") or {}):
            raise ValueError(f"{where}: model.init_from is set by the stages (each starts from the one before; "
                             "the run's own model.init_from is the first stage's start)")
        merged = _merge(base, stage)
        directory = stage_dir(cfg, index, name)
        last = index + 1 == len(cfg.stages)
        # Every stage but the last exports: the next one starts from it.
        merged.update(stage=name, output_dir=str(directory), resume="auto", export=cfg.export if last else True,
                      export_dir=str(Path(cfg.output_dir) / "final") if last else None)
        if configs:
            merged["model"]["init_from"] = str(configs[-1].final_dir)
        try:
            configs.append(TrainConfig.model_validate(merged))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{where}: {problems}") from None
    return configs


def stage_done(cfg: "TrainConfig") -> bool:
    return (Path(cfg.output_dir) / STAGE_DONE).is_file()


def run_stages(cfg: "TrainConfig", run_one) -> None:
    """Each stage in turn (``run_one(stage_cfg, last)`` trains, exports and cleans up one), skipping those
    that finished; the process group stays up between stages."""
    from llark.train.distributed import distributed_env

    configs = stage_configs(cfg)
    say = print if distributed_env()[0] == 0 else (lambda *a, **k: None)
    for index, stage_cfg in enumerate(configs):
        where = f"train: stage {index + 1}/{len(configs)} ({stage_cfg.stage})"
        if stage_done(stage_cfg):
            done = json.loads((Path(stage_cfg.output_dir) / STAGE_DONE).read_text(encoding="utf-8"))
            say(f"{where}: done earlier ({done['steps']} steps, exported to {done['export']})", flush=True)
            continue
        say(f"{where}: mode {stage_cfg.model.mode}, {stage_cfg.optim.max_steps} steps, in {stage_cfg.output_dir}"
            + (f", from {stage_cfg.model.init_from}" if stage_cfg.model.init_from else ""), flush=True)
        run_one(stage_cfg, last=index + 1 == len(configs))
        gc.collect()


def mark_stage_done(cfg: "TrainConfig", steps: int) -> None:
    write_json(Path(cfg.output_dir) / STAGE_DONE, {"stage": cfg.stage, "steps": steps, "export": str(cfg.final_dir)})
