"""The piece of a local sweep that runs inside each trial's `polyhead fit` process.

The controller adds it to the trial's command line (`--trainer.callbacks+=...`), so the trial stays
an ordinary `polyhead fit` run. Rank 0 reports the sweep's metric to the sweep's Optuna journal at
every validation and asks the pruner (hyperband) whether to go on; the decision is broadcast so
that every DDP rank stops together. It also records where the run's W&B directory is and the
metric's final value, which the controller reads when the process exits.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import optuna

from experiments.sweep_store import FINAL, PRUNED_AT, RUN_DIR, SweepStore


class SweepTrialReporter(pl.Callback):
    def __init__(self, sweep_dir: str, trial: int) -> None:
        """sweep_dir: the local sweep's directory (runs/sweeps/<id>); trial: this trial's number."""
        self.store, self.number = SweepStore(Path(sweep_dir)), trial
        self.spec, _ = self.store.load()
        self.trial: optuna.trial.Trial | None = None
        self.validations = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.trial is None:
            self.trial = self.store.trial(self.spec, self.number)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        files_dir = getattr(experiment, "dir", None)  # a W&B run's <run dir>/files
        if files_dir:
            self.trial.set_user_attr(RUN_DIR, str(Path(files_dir).parent.resolve()))

    def _metric(self, trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.spec.metric) if self.spec.metric else None
        return None if value is None else float(value)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        value = self._metric(trainer) if trainer.is_global_zero else None
        if value is not None and math.isfinite(value):
            self.validations += 1
            self.trial.report(value, self.validations)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.trial.set_user_attr(PRUNED_AT, self.validations)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        value = self._metric(trainer)
        if value is not None:
            self.trial.set_user_attr(FINAL, value)
