"""`StepMeans`: the training values logged at a logging step are their means since the last one.

Reading a value of a GPU tensor on the host waits for every kernel queued before it, and leaves
the GPU idle while the host then prepares the next step. Logged every step, a run's training
losses stop it several times a step: Lightning turns each progress-bar value into a number after
every batch, and under DDP `sync_dist` adds a barrier and an all-reduce per value. Instead each
step adds its detached values to running sums on the device; at a logging step the sums of every
process are added up in one all-reduce and read once, and their means are what is logged (as HF's
Trainer logs the mean loss since its last log). Every process draws the same task at each step
(datamodules/mixture.py), so every process holds the same keys in the same order.

`logging_step` and `write_to_loggers` are shared with experiments/callbacks.py's TokenThroughput,
which logs at the same steps.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import Tensor


class StepMeans:
    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        """One step's values (0-dim tensors, any device): added without reading them."""
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def drain(self, sum_across_processes: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """-> {key: mean over the steps (and processes) since the last drain}, read on the host in
        one transfer; the sums start again from empty."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        sums = torch.stack([self.sums[key] for key in keys])  # (K,)
        counts = torch.tensor([float(self.counts[key]) for key in keys], device=sums.device)  # (K,)
        totals = sum_across_processes(torch.cat([sums, counts])).tolist()  # 2K numbers
        self.sums, self.counts = {}, {}
        return {key: totals[i] / totals[len(keys) + i] for i, key in enumerate(keys)}


def logging_step(trainer: pl.Trainer, steps_done: int) -> bool:
    """Whether the optimizer step that makes `steps_done` steps is a logging step: every
    `trainer.log_every_n_steps` (0 turns logging off), as Lightning counts them."""
    every = trainer.log_every_n_steps
    return every > 0 and steps_done % every == 0


def write_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], steps_done: int) -> None:
    """Write `metrics` straight to the run's loggers, at the index Lightning gives the step that
    made `steps_done` steps. Not through `self.log`: Lightning writes a step value logged once
    again at every later logging step of the epoch, which would show a task not drawn since with
    its old loss as a new one."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=steps_done - 1)
