"""Where training metrics go, on rank 0: ``metrics.jsonl`` (one JSON object a line: a logged step's
training metrics, or a validation's ``val_loss``), TensorBoard and W&B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llark.train.config import TrainConfig, TrainConfigError

METRICS = "metrics.jsonl"
TENSORBOARD_SCALARS = ("loss", "lr", "projector_lr", "grad_norm", "tokens_per_s", "samples_per_s")


class MetricsLog:
    def __init__(self, cfg: TrainConfig, output_dir: Path):
        self.path = output_dir / METRICS
        self.writer = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise TrainConfigError("wandb_project is set but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.model_dump(mode="json"),
                                    dir=str(output_dir), resume="allow")

    def write(self, metrics: dict[str, Any], scalars: dict[str, float | None]) -> None:
        """One line of ``metrics``; ``scalars`` (``"train/loss"``-style names) to TensorBoard and W&B."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        scalars = {k: v for k, v in scalars.items() if v is not None}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, metrics["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
