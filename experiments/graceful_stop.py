"""`GracefulStop`: SIGTERM or SIGINT during training saves a checkpoint and exits, instead of losing
the steps since the last one.

Schedulers send SIGTERM before they kill a job (preemption, the time limit; SLURM with
`--signal=TERM@120`, Kubernetes on eviction), and Ctrl+C sends SIGINT. Either lets the current
step finish, writes `last.ckpt` (atomically, modules/atomic_io.py) at that step boundary, prints
one line naming the checkpoint and how to resume, and exits with 128 + the signal number (143 for
SIGTERM, 130 for SIGINT), as a process killed by the signal would: a scheduler or a wrapper loop
sees an unfinished run, not a finished one, and can requeue it with `--ckpt_path last`. The same
signal a second time stops at once, without the checkpoint. Under DDP every process stops at the
same step.

`polyhead validate|test|predict` stop the same way after the current batch, with the same exit
codes and a line saying to run the command again: they have nothing to save, and the predictions
file is written whole at the end or not at all (modules/atomic_write.py). Lightning's own handler
would only log the signal and go on until the scheduler kills the job.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(SystemExit):
    """The run stopped on a signal after saving its checkpoint; the exit code is 128 + signal number."""


class GracefulStop(pl.Callback):
    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.previous: dict[signal.Signals, object] = {}
        self.pid = os.getpid()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over both signals once training runs (Lightning installs its own SIGTERM handler
        just before, which would stop without a checkpoint and exit 0). Data loader workers start
        after this and inherit the handler, which ignores the signal there: a scheduler signals every
        process of the job, and the workers must keep serving batches until the checkpoint is saved."""
        self._take_signals()

    def _take_signals(self) -> None:
        self.received, self.pid = None, os.getpid()
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._note) for number in SIGNALS}

    def _evaluating(self, trainer: pl.Trainer) -> bool:
        """A validate, test or predict command (not the validation inside fit, which stops after
        the next training step, where its checkpoint resumes cleanly)."""
        return trainer.state.fn != TrainerFn.FITTING

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._evaluating(trainer):
            self._take_signals()

    on_test_start = on_predict_start = on_validation_start

    def on_validation_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if not self._evaluating(trainer) or not trainer.strategy.reduce_boolean_decision(
            self.received is not None, all=False
        ):
            return
        received = self.received or signal.SIGTERM  # another process got it
        self._restore()
        if trainer.is_global_zero:
            print(
                f"polyhead: stopped by {received.name} during {trainer.state.fn.value}, before its end: no "
                "results reported, no predictions file written; run the same command again",
                file=sys.stderr,
                flush=True,
            )
        raise StoppedBySignal(128 + received)

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end

    def _note(self, number: int, frame) -> None:
        if os.getpid() != self.pid:
            return  # a data loader worker
        if self.received is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signal.Signals(number)
        rank_zero_info(
            f"\npolyhead: {self.received.name} received: saving a checkpoint after this step "
            f"(send {self.received.name} again to stop at once, without it)"
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        received = self.received or signal.SIGTERM  # another process got it
        path = self._save(trainer)
        self._restore()
        if trainer.is_global_zero:
            print(
                f"polyhead: stopped by {received.name} after step {trainer.global_step}; checkpoint saved "
                f"to {path}; resume with the same command and --ckpt_path {path}",
                file=sys.stderr,
                flush=True,
            )
        raise StoppedBySignal(128 + received)

    def _save(self, trainer: pl.Trainer) -> str:
        """Write the run's last checkpoint (the checkpoint callback's `last.ckpt`, or
        `<default_root_dir>/last.ckpt` when checkpointing is off) at this step boundary."""
        callback = trainer.checkpoint_callback
        directory = (
            callback.dirpath if callback is not None and callback.dirpath else trainer.default_root_dir
        )
        path = os.path.join(directory, "last.ckpt")
        if callback is not None:
            path = callback.last_model_path or path
            callback.last_model_path = path  # saved with it: a resumed run keeps writing there
        trainer.save_checkpoint(path, weights_only=False)
        return path

    def _restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._evaluating(trainer):
            self._restore()

    on_test_end = on_predict_end = on_validation_end

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
