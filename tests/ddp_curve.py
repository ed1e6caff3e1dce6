"""Run the quickstart for a few steps on N CPU processes and write rank 0's loss curve as JSON.

Used by test_ddp.py as a subprocess: strategy=ddp re-executes the launching command line in
every rank, which must not be pytest's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from experiments.cli import main


class RecordLoss(pl.Callback):
    """Keeps the (process-averaged) training loss of every step and writes it at the end."""

    def __init__(self, path: str) -> None:
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/mlm_nsp/loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps(self.losses))


if __name__ == "__main__":
    devices, global_batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    root = Path(__file__).resolve().parents[1]
    recorder = json.dumps({"class_path": "tests.ddp_curve.RecordLoss", "init_args": {"path": out}})
    main(
        [
            "fit",
            "--config", str(root / "experiments" / "configs" / "quickstart.yaml"),
            "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.max_steps", "8",
            "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false",
            "--trainer.deterministic", "true",
            "--trainer.callbacks+", recorder,
            "--data.batch_size", str(global_batch // devices),
            "--model.backbone.dropout", "0",
            "--model.backbone.attention_dropout", "0",
        ]
    )  # fmt: skip
