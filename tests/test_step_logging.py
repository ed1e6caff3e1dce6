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
ENDS = (3, 6, 7)
"""The steps that end a logged interval: every 3rd, and the run's last (7 is not a multiple of 3)."""


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


def fit(tmp, steps: int, every: int) -> tuple[list[dict], dict[int, dict[str, float]], list[int]]:
    """The quickstart's three tasks on a tiny backbone for `steps` steps logged every `every`, MFU
    against a made-up peak. -> each step's record (RecordSteps), the values logged at each CSV step
    (optimizer steps done - 1), and the steps at which the device was waited for."""
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
                "--data.batch_size", "4", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp),
                "--trainer.log_every_n_steps", str(every), "--trainer.enable_progress_bar", "false",
                "--checkpoint.monitor", "null", "--trainer.enable_checkpointing", "false",
                "--model.speed.peak_tflops", "0.001", "--trainer.callbacks+", json.dumps(recorder),
            ]
        )  # fmt: skip
    records = next(c for c in polyhead.trainer.callbacks if isinstance(c, RecordSteps)).steps
    logged = {}
    for path in tmp.rglob("metrics.csv"):
        for row in csv.DictReader(path.open()):
            values = {k: float(v) for k, v in row.items() if v and k != "step"}
            logged.setdefault(int(row["step"]), {}).update(values)
    return records, logged, waits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("logging"), STEPS, EVERY)


def test_training_losses_are_logged_as_their_means_since_the_last_logging_step(run):
    steps, logged, _ = run
    assert len(steps) == STEPS
    assert sorted(logged) == [step - 1 for step in ENDS]  # each logging step, and the run's last
    for start, end in zip([0, *ENDS], ENDS, strict=False):
        interval = steps[start:end]
        tasks = {step["task"] for step in interval}
        # only the tasks drawn in the interval: none carries an older value forward
        assert {k.split("/")[1] for k in logged[end - 1] if k.endswith("/loss")} == tasks
        for task in tasks:
            losses = [step["loss"] for step in interval if step["task"] == task]
            assert logged[end - 1][f"train/{task}/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_throughput_counts_every_example_and_real_token_and_waits_at_logging_steps_only(run):
    steps, logged, waits = run
    assert waits == list(ENDS)
    for end in ENDS:
        row = logged[end - 1]
        assert row["train/batches"] == end
        assert row["train/samples"] == sum(step["examples"] for step in steps[:end])
        assert row["train/lengths"] == sum(step["tokens"] for step in steps[:end])
        assert row["train/device/mfu"] == pytest.approx(row["train/device/flops_per_sec"] / 1e9, rel=1e-5)
        assert 0 < row["train/device/mfu"] < 100
    second, first = logged[ENDS[1] - 1], logged[ENDS[0] - 1]
    interval_tokens = second["train/lengths"] - first["train/lengths"]
    interval_time = second["train/time"] - first["train/time"]
    assert second["train/device/items_per_sec"] == pytest.approx(interval_tokens / interval_time, rel=1e-4)


def test_logging_every_0_steps_logs_no_training_values(tmp_path):
    """Lightning's "no logging" setting: training runs, and nothing of it is written."""
    steps, logged, waits = fit(tmp_path, 2, 0)
    assert len(steps) == 2 and waits == []
    assert not [key for values in logged.values() for key in values if key.startswith("train/")]
