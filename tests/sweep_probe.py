"""A callback for tests/test_sweep_local.py's DDP trial: every rank writes the learning rate its
model was built with, as `<prefix>.rank<N>.json`, so the test can read what rank 1 received."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl


class RecordSweptValue(pl.Callback):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seen = {"lr": pl_module.optimizer_config.lr, "world_size": trainer.world_size}
        Path(f"{self.prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(seen))
