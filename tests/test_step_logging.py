"""What `polyhead fit` logs while training: each value's mean since the last logging step, and the
throughput counted on the host, for which the device is waited for at logging steps only."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest

from experiments import callbacks, cli
from tasks.base import batch_examples, batch_tokens

from .conftest import ROOT, offline_env

STEPS, EVERY = 7, 3


class RecordSteps(pl.Callback):
    """Each training step's task, loss (as backward receives it), examples and real tokens."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(
            {"task": batch["task"], "examples": batch_examples(batch), "tokens": batch_tokens(batch)}
        )

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.steps[-1]["loss"] = float(loss.detach())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The quickstart's three tasks on a tiny backbone, 7 steps logged every 3, MFU against a
    made-up peak; the device waits during it counted."""
    tmp = tmp_path_factory.mktemp("logging")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in offline_env(tmp).items():
            patch.setenv(key, value)
        patch.chdir(ROOT)
        waits = []
        patch.setattr(callbacks, "wait_for_device", lambda trainer: waits.append(trainer.global_step))
        recorder = {"class_path": "tests.test_step_logging.RecordSteps"}
        polyhead = cli.run(
            [
                "fit", "--config", str(ROOT / "experiments" / "configs" / "quickstart.yaml"),
                "--model.backbone.d_model", "32", "--model.backbone.n_heads", "2", "--model.backbone.d_ff", "64",
                "--model.backbone.dropout", "0", "--model.backbone.attention_dropout", "0",
                "--data.batch_size", "4", "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp),
                "--trainer.log_every_n_steps", str(EVERY), "--trainer.enable_progress_bar", "false",
                "--checkpoint.monitor", "null", "--trainer.enable_checkpointing", "false",
                "--model.speed.peak_tflops", "0.001", "--trainer.callbacks+", json.dumps(recorder),
            ]
        )  # fmt: skip
    steps = next(c for c in polyhead.trainer.callbacks if isinstance(c, RecordSteps)).steps
    rows = list(csv.DictReader(next(tmp.rglob("metrics.csv")).open()))
    logged = {}  # CSV step (optimizer steps done - 1) -> the values logged there
    for row in rows:
        logged.setdefault(int(row["step"]), {}).update(
            {k: float(v) for k, v in row.items() if v and k != "step"}
        )
    return steps, logged, waits


def test_training_losses_are_logged_as_their_means_since_the_last_logging_step(run):
    steps, logged, _ = run
    assert len(steps) == STEPS
    assert sorted(logged) == [EVERY - 1, 2 * EVERY - 1]  # steps 3 and 6; step 7 ends no interval
    for end in (EVERY, 2 * EVERY):
        interval = steps[end - EVERY : end]
        tasks = {step["task"] for step in interval}
        for task in tasks:
            losses = [step["loss"] for step in interval if step["task"] == task]
            assert logged[end - 1][f"train/{task}/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    first_tasks = {step["task"] for step in steps[:EVERY]}
    assert {k.split("/")[1] for k in logged[EVERY - 1] if k.endswith("/loss")} == first_tasks


def test_throughput_counts_every_example_and_real_token_and_waits_at_logging_steps_only(run):
    steps, logged, waits = run
    assert waits == [EVERY, 2 * EVERY]
    for end in (EVERY, 2 * EVERY):
        row = logged[end - 1]
        assert row["train/batches"] == end
        assert row["train/samples"] == sum(step["examples"] for step in steps[:end])
        assert row["train/lengths"] == sum(step["tokens"] for step in steps[:end])
        assert row["train/device/mfu"] == pytest.approx(row["train/device/flops_per_sec"] / 1e9, rel=1e-5)
        assert 0 < row["train/device/mfu"] < 100
    second, first = logged[2 * EVERY - 1], logged[EVERY - 1]
    interval_tokens = second["train/lengths"] - first["train/lengths"]
    interval_time = second["train/time"] - first["train/time"]
    assert second["train/device/items_per_sec"] == pytest.approx(interval_tokens / interval_time, rel=1e-4)
