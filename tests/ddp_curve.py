"""Train a config for a few steps on N CPU processes; write rank 0's loss curve and final weights.

Used by test_ddp.py as a subprocess: strategy=ddp re-executes the launching command line in
every rank, which must not be pytest's.
    python -m tests.ddp_curve DEVICES GLOBAL_BATCH OUT_PREFIX CONFIG [extra CLI args...]
writes OUT_PREFIX.json (the logged training loss of each step's task) and OUT_PREFIX.pt (weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from experiments.cli import main


class RecordLoss(pl.Callback):
    """Keeps the (process-averaged) training loss of every step and writes it, and the final
    weights, at the end."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.losses = prefix, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics[f"train/{batch['task']}/loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        # under FSDP each rank holds shards (DTensors); gathering them is a collective, on every rank
        weights = {
            k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in pl_module.state_dict().items()
        }
        if trainer.global_rank == 0:
            Path(f"{self.prefix}.json").write_text(json.dumps(self.losses))
            torch.save(weights, f"{self.prefix}.pt")


if __name__ == "__main__":
    devices, global_batch, prefix, config, *extra = sys.argv[1:]
    recorder = json.dumps({"class_path": "tests.ddp_curve.RecordLoss", "init_args": {"prefix": prefix}})
    main(
        [
            "fit",
            "--config", config,
            "--trainer.devices", devices,
            "--trainer.strategy", "ddp" if int(devices) > 1 else "auto",
            "--trainer.max_steps", "8",
            "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false",
            "--trainer.log_every_n_steps", "1",  # each step's loss, averaged over the processes
            "--trainer.enable_checkpointing", "false",
            "--trainer.deterministic", "true",
            "--trainer.callbacks+", recorder,
            "--data.batch_size", "null",  # the config's per-process size gives way to the global one
            "--data.global_batch_size", global_batch,
            "--model.backbone.dropout", "0",
            "--model.backbone.attention_dropout", "0",
            *extra,
        ]
    )  # fmt: skip
