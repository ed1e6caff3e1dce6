"""Callbacks every run gets: token throughput while training, and the final metrics table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from modules.atomic_write import write_atomically
from modules.step_means import logging_step, write_to_loggers
from tasks.base import batch_examples, batch_tokens

BASELINE_PREFIX = "baseline_"


def metrics_table(metrics: dict[str, float]) -> str:
    """{"val/<task>/<metric>": value} -> an aligned text table; metrics with a `baseline_` twin show it."""
    rows = []
    for key in sorted(metrics):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "val" or parts[2].startswith(BASELINE_PREFIX):
            continue
        _, task, metric = parts
        baseline = metrics.get(f"val/{task}/{BASELINE_PREFIX}{metric}")
        rows.append((task, metric, f"{metrics[key]:.4f}", "" if baseline is None else f"{baseline:.4f}"))
    header = ("task", "metric", "model", "baseline")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class FinalValidationReport(pl.Callback):
    """Prints the metrics table when fitting ends. Each task defines its baseline (for MLM+NSP: a
    unigram model of the training tokens and the majority NSP label)."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            rank_zero_info(
                "\nFinal validation metrics (baseline: each task's trivial predictor)\n"
                + metrics_table(metrics)
            )


class TokenThroughput(pl.Callback):
    """Training throughput: examples, real tokens and model FLOPs per second, and MFU, the FLOPs per
    second over the device's peak (`model.speed.peak_tflops` when set, else the datasheet figure of
    a known GPU; on a CPU without it, no MFU). Logged as train/device/{samples,items,flops}_per_sec
    and train/device/mfu (plus train/time, train/samples, train/lengths: totals so far).

    A GPU step can only be timed by waiting for it to finish. Lightning's ThroughputMonitor waits
    after every batch, which leaves the GPU idle while the host prepares the next one; here the
    counts are added up on the host each step (the collator counted the real tokens) and the device
    is waited for once per logging step. Rates are over the last logging interval (from one
    logging step to the next), and validation time is left out of them."""

    def __init__(self) -> None:
        self.throughput: Throughput | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        peak = pl_module.speed.peak_tflops
        device = trainer.strategy.root_device
        self.throughput = Throughput(
            available_flops=peak * 1e12
            if peak is not None
            else get_available_flops(device, compute_dtype(trainer)),
            world_size=trainer.world_size,
            window_size=2,  # rates between the last two updates: over the last interval
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches = self.samples = self.tokens = self.flops = 0
        self.logged_step = trainer.global_step  # a resumed run counts from where it starts
        self.paused = self.paused_at = 0.0
        self.throughput.reset()
        # the first interval's start
        self.throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.batches += 1
        self.samples += batch_examples(batch)
        self.tokens += batch_tokens(batch)
        self.flops += pl_module.flops_per_batch
        if trainer.global_step != self.logged_step and logging_step(trainer, trainer.global_step):
            self._log(trainer)  # (the step's last micro-batch, when gradients accumulate)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The interval after the last logging step (a run stopped between two)."""
        if trainer.log_every_n_steps > 0 and trainer.global_step != self.logged_step:
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        """Wait for the device, close the interval and write its rates and the totals."""
        self.logged_step = trainer.global_step
        wait_for_device(trainer)
        self.throughput.update(
            time=time.perf_counter() - self.start - self.paused,
            batches=self.batches,
            samples=self.samples,
            lengths=self.tokens,
            flops=self.flops,
        )
        self.flops = 0  # Throughput takes the FLOPs since its last update
        metrics = {f"train/{key}": float(value) for key, value in self.throughput.compute().items()}
        write_to_loggers(trainer, metrics, trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            wait_for_device(trainer)  # the training steps queued before it count as training time
            self.paused_at = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.paused += time.perf_counter() - self.paused_at


def compute_dtype(trainer: pl.Trainer) -> torch.dtype:
    """The dtype a run's matrix products take (`trainer.precision`), which picks the datasheet peak."""
    precision = str(trainer.precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def wait_for_device(trainer: pl.Trainer) -> None:
    """Until the device has run everything queued on it, so that the clock reads the work done."""
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize(trainer.strategy.root_device)


def _records(tree):
    """Lightning nests predictions by loader and batch; the records are the dicts at the leaves."""
    if isinstance(tree, dict):
        yield tree
    else:
        for branch in tree:
            yield from _records(branch)


class PredictionsWriter(BasePredictionWriter):
    """Writes `polyhead predict` output as JSON lines, one record per example, atomically (a
    temporary file renamed into place), one file per process when several run."""

    def __init__(self, path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        target = Path(self.path)
        if trainer.world_size > 1:
            target = target.with_name(f"{target.stem}.rank{trainer.global_rank}{target.suffix}")
        lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in _records(predictions)]
        write_atomically(target, lambda handle: handle.writelines(line.encode("utf-8") for line in lines))
        rank_zero_info(f"wrote {len(lines)} predictions to {target}")
