"""Callbacks every run gets: token throughput while training, and the final metrics table."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info

from modules.atomic_write import write_atomically
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


class TokenThroughput(ThroughputMonitor):
    """Lightning's throughput monitor, counting examples and real tokens of any task's batch: logs
    throughput/samples_per_sec, throughput/items_per_sec (tokens per second) and device/mfu, the
    model's FLOPs per step (modules/flops.py) over the device's peak: `model.speed.peak_tflops`
    when set, else the datasheet figure of a known GPU; on a CPU without it, MFU is not logged."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=batch_examples, length_fn=batch_tokens, window_size=window_size)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if pl_module.speed.peak_tflops is not None:
            self.available_flops = pl_module.speed.peak_tflops * 1e12
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops


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
