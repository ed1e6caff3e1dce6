"""`ObjectiveGuard`: a run stops as soon as its training objective cannot improve the model.

A loss that is NaN or infinite (a learning rate far too high, an extreme value in the data) would
turn every weight into NaN at the next optimizer step, and every checkpoint after it would hold a
broken model. The guard checks the loss of each step before its backward pass, so the step is
never applied: the run stops with one line naming the step, the task whose batch it was and the
last checkpoint, which was saved from a finite loss and is left as it is.
(`polyhead fit` refuses a config whose every task has loss_weight 0 before anything is built.)
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from modules.errors import UserError


class ObjectiveGuard(pl.Callback):
    def __init__(self) -> None:
        self.task: str | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        self.task = batch["task"]

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if broken_anywhere(loss):
            step = trainer.global_step + 1
            value = f"{loss.item()}" if not torch.isfinite(loss).all() else "non-finite in another process"
            saved = last_checkpoint(trainer)
            kept = f"the last good checkpoint is {saved}" if saved else "no checkpoint was saved before it"
            raise UserError(
                f"non-finite loss ({value}) at step {step} in task {self.task}; {kept} (this step was not "
                f"applied); lower model.optimizer.lr, or look for extreme values in data.sources.{self.task}"
            )


def broken_anywhere(loss: Tensor) -> bool:
    """Whether the loss is non-finite in this process or any other: every process must stop at
    the same step, or the others would wait for it in the next gradient all-reduce. The flag is
    combined on the device and read once (Lightning's reduce_boolean_decision would read it
    twice and add a barrier, at every step)."""
    broken = (~torch.isfinite(loss.detach()).all()).float()  # () 1.0 where non-finite
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(broken, op=dist.ReduceOp.MAX)
    return bool(broken)


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint file the run saved, if any."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    saved = [
        path for path in (callback.last_model_path, callback.best_model_path) if path and os.path.isfile(path)
    ]
    return max(saved, key=os.path.getmtime) if saved else None
