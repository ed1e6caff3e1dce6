"""`LatestCheckpoint`: Lightning's ModelCheckpoint, whose `last.ckpt` is the run's latest state.

Since Lightning 2.6, with a monitored metric (polyhead's default: val/loss), `last.ckpt` is
rewritten only by a validation that also writes a best-k checkpoint, and at the end of training
only when nothing was saved before. Once val/loss stops improving, `last.ckpt` stays where it was:
a run killed later loses every step since, `--ckpt_path last` repeats them, and the `last.ckpt` of
a finished run is its best model, not its final one. Here every validation and the end of training
rewrite `last.ckpt` (when save_last is on), as before Lightning 2.6; the best-k files are kept
exactly as Lightning keeps them.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class LatestCheckpoint(ModelCheckpoint):
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_latest(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_latest(trainer)

    def _save_latest(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt unless this step was saved already (or saving is off: a sanity check,
        a fast dev run, not fitting)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
