"""Faults during a run: a training process killed (SIGKILL) or asked to stop (SIGTERM, SIGINT), a
kill in the middle of writing a checkpoint, a loss that turns NaN, a data loader worker that dies.
Nothing saved before the fault is lost, and a run resumed with `--ckpt_path last` ends with the
same weights, bit for bit, as one that was never interrupted (deterministic, on CPU, dropout on)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from experiments.cli import main, run
from experiments.fault_messages import explain
from experiments.graceful_stop import GracefulStop
from modules.atomic_io import AtomicCheckpointIO, save_atomically
from modules.atomic_write import write_text_atomically
from modules.checkpoint import read_checkpoint
from modules.errors import UserError

from .conftest import ROOT, SEED_CORPUS, offline_env

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
STEPS = 40
FIT = [
    "fit", "--config", QUICKSTART,
    "--model.backbone.d_model", "32", "--model.backbone.n_heads", "2", "--model.backbone.d_ff", "64",
    "--data.batch_size", "8", "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
    "--trainer.deterministic", "true", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--checkpoint.monitor", "null",
    "--checkpoint.every_n_train_steps", "4", "--checkpoint.save_top_k", "-1",
]  # fmt: skip


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer cache for the module's runs, in process and in subprocesses."""
    return tmp_path_factory.mktemp("polyhead-cache")


def environment(tmp: Path, cache: Path) -> dict[str, str]:
    """Every run of the module on one CPU thread: the same arithmetic in and out of process (results
    are bit-exact only at equal thread counts), and fast on a machine busy with other work."""
    return offline_env(tmp) | {"POLYHEAD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def isolated(tmp: Path, cache: Path):
    """This process as `environment` sets a subprocess up (and as it was, afterwards)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environment(tmp, cache).items():
            patch.setenv(key, value)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(False)  # --trainer.deterministic sets it process-wide


def in_process(tmp: Path, cache: Path, *args: str):
    """`polyhead fit` in this process; -> the CLI (its trained model)."""
    with isolated(tmp, cache):
        return run([*FIT, *args])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shared_cache):
    """The uninterrupted run's CLI."""
    tmp = tmp_path_factory.mktemp("straight")
    return in_process(tmp, shared_cache, "--checkpoint.dirpath", str(tmp / "ckpt"))


def start(tmp: Path, cache: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *FIT, "--checkpoint.dirpath", str(tmp / "ckpt"), *args],
        cwd=ROOT,
        env=environment(tmp, cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_same_weights(resumed, straight) -> None:
    assert resumed.trainer.global_step == straight.trainer.global_step == STEPS
    ours, theirs = resumed.model.state_dict(), straight.model.state_dict()
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{len(different)} of {len(ours)} tensors differ, e.g. {different[:3]}"


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux /proc)."""
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def training(tmp: Path, cache: Path, *args: str) -> subprocess.Popen:
    """`polyhead fit` in a subprocess, once it has saved checkpoints of its own (a step=N.ckpt that
    was not in the directory before, and last.ckpt after it): it is training, past where it began."""
    before = set((tmp / "ckpt").glob("*step=*.ckpt"))
    last = tmp / "ckpt" / "last.ckpt"
    process = start(tmp, cache, *args)
    deadline = time.monotonic() + 300
    while True:
        new = [path.stat().st_mtime_ns for path in set((tmp / "ckpt").glob("*step=*.ckpt")) - before]
        if new and last.exists() and last.stat().st_mtime_ns >= max(new):
            return process
        assert process.poll() is None, f"the run ended early: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.005)


def saved_steps(directory: Path) -> dict[str, int]:
    """Checkpoint file -> its step; every file must load whole."""
    return {path.name: read_checkpoint(path)["global_step"] for path in directory.glob("*.ckpt")}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the data worker through Linux /proc")
def test_a_run_stopped_every_way_resumes_from_last_to_the_same_weights(straight, shared_cache, tmp_path):
    """One run, stopped four ways in turn, each time resumed with `--ckpt_path last`: its data
    loader worker killed (as the out-of-memory killer would), the run SIGKILLed, SIGTERMed, and
    SIGINTed. It ends with the uninterrupted run's weights, bit for bit."""
    directory = tmp_path / "ckpt"
    resume = ("--ckpt_path", "last")

    process = training(tmp_path, shared_cache, "--data.num_workers", "1")
    (worker,) = children(process.pid)
    subprocess.run(["kill", "-KILL", str(worker)], check=True)
    _, stderr = process.communicate(timeout=300)
    last = stderr.strip().splitlines()[-1]
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith(f"polyhead: error: a data loader worker process (pid {worker})"), last
    assert "data.num_workers" in last and "--ckpt_path" in last

    process = training(tmp_path, shared_cache, *resume)
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert f"Restoring states from the checkpoint path at {directory / 'last.ckpt'}" in stderr
    assert 4 <= saved_steps(directory)["last.ckpt"] < STEPS  # every file whole, none half written

    for received in (signal.SIGTERM, signal.SIGINT):
        process = training(tmp_path, shared_cache, *resume)
        process.send_signal(received)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 128 + received, stderr[-3000:]
        assert f"Restoring states from the checkpoint path at {directory / 'last.ckpt'}" in stderr
        assert "Traceback" not in stderr
        stopped = re.fullmatch(
            rf"polyhead: stopped by {received.name} after step (\d+); checkpoint saved to (\S+); "
            r"resume with the same command and --ckpt_path (\S+)",
            stderr.strip().splitlines()[-1],
        )
        assert stopped, stderr[-3000:]
        assert Path(stopped.group(2)) == Path(stopped.group(3)) == directory / "last.ckpt"
        assert saved_steps(directory)["last.ckpt"] == int(stopped.group(1)) < STEPS

    resumed = in_process(tmp_path, shared_cache, "--checkpoint.dirpath", str(directory), *resume)
    assert resumed.trainer.ckpt_path == str(directory / "last.ckpt")
    assert_same_weights(resumed, straight)
    assert isinstance(resumed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


SAVE_FOREVER = """
import sys, torch
from modules.atomic_io import save_atomically
save_atomically({"version": 0, "weights": torch.zeros(4)}, sys.argv[1])
print("saved", flush=True)
weights = torch.ones(16 * 2**20)  # 64 MiB: each save takes a while
for version in range(1, 1000):
    save_atomically({"version": version, "weights": weights}, sys.argv[1])
"""


def test_a_kill_in_the_middle_of_a_save_leaves_the_last_checkpoint_whole(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, "-c", SAVE_FOREVER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "saved"
    deadline = time.monotonic() + 120
    while not [p for p in target.parent.glob(".last.ckpt.*.tmp") if p.stat().st_size > 0]:
        assert process.poll() is None and time.monotonic() < deadline
    process.kill()
    process.wait()
    (partial,) = target.parent.glob(".last.ckpt.*.tmp")
    assert partial.stat().st_size < 16 * 2**20 * 4, "the kill came after the write"
    saved = torch.load(target, weights_only=True)  # whole: the version before the interrupted one
    assert saved["weights"].numel() == (4 if saved["version"] == 0 else 16 * 2**20)


def test_a_save_that_fails_midway_leaves_the_previous_file_and_no_litter(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    save_atomically({"version": 0, "weights": torch.zeros(4)}, target)
    with pytest.raises(Exception, match="pickle"):  # a lambda cannot be saved: torch.save fails mid-file
        save_atomically({"version": 1, "weights": torch.ones(2**20), "hook": lambda: None}, target)
    assert torch.load(target, weights_only=True)["version"] == 0
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_files_written_atomically_are_readable_as_ordinary_new_files(tmp_path):
    """The temporary file is private to its owner; the file it becomes must not be, or a run's
    config and a sweep's spec on a shared filesystem would be hidden from the rest of the team."""
    umask = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "spec.yaml", "method: grid\n")
        save_atomically({"weights": torch.zeros(2)}, tmp_path / "last.ckpt")
    finally:
        os.umask(umask)
    for name in ("spec.yaml", "last.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert (tmp_path / "spec.yaml").read_text() == "method: grid\n"


def test_a_non_finite_loss_stops_before_its_step_and_keeps_the_last_good_checkpoint(
    shared_cache, tmp_path, capsys
):
    absurd = ["--model.optimizer.lr", "1e4", "--checkpoint.every_n_train_steps", "1"]
    with pytest.raises(SystemExit) as exit_info, isolated(tmp_path, shared_cache):
        main([*FIT, *absurd, "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    message = str(exit_info.value.code)
    stopped = re.fullmatch(
        r"polyhead: error: non-finite loss \((nan|inf|-inf)\) at step (\d+) in task (\w+); the last good "
        r"checkpoint is (\S+) \(this step was not applied\); lower model.optimizer.lr, or look for extreme "
        r"values in data.sources.(\w+)",
        message,
    )
    assert stopped, message
    step, task, path = int(stopped.group(2)), stopped.group(3), Path(stopped.group(4))
    assert task in ("mlm_nsp", "triplet", "summarize") and stopped.group(5) == task
    assert path == tmp_path / "ckpt" / "last.ckpt"
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == step - 1 and step < STEPS
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    latest = max(read_checkpoint(p)["global_step"] for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert latest == step - 1, "nothing was saved from the broken step"
    assert "Traceback" not in capsys.readouterr().err
    assert not math.isfinite(float(stopped.group(1)))


class Unreadable(torch.utils.data.Dataset):
    """Data whose second example cannot be read."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 1:
            raise UserError("corpus.jsonl, line 2: malformed JSON")
        return torch.zeros(2)


def test_an_error_in_a_data_loader_worker_reads_as_the_worker_raised_it():
    """torch re-raises a worker's exception with the worker's whole traceback as its message;
    polyhead reports the worker's own message in one line."""
    loader = torch.utils.data.DataLoader(Unreadable(), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as raised:
        list(loader)
    assert "Traceback" in str(raised.value)
    assert (
        explain(raised.value)
        == "data loader worker 0 failed: UserError: corpus.jsonl, line 2: malformed JSON"
    )


def test_last_ckpt_follows_the_run_when_the_monitored_metric_stops_improving(shared_cache, tmp_path):
    """At a learning rate of 1e-30 no weight moves, so val/loss never improves on the first
    validation: the best checkpoint stays at step 2 while last.ckpt follows the run to its end
    (Lightning 2.6 alone would leave it at step 2)."""
    frozen = [
        "--model.optimizer.lr",
        "1e-30",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "2",
    ]
    with isolated(tmp_path, shared_cache):
        run(
            [
                *(*FIT, *frozen, "--trainer.limit_val_batches", "1", "--checkpoint.monitor", "val/loss"),
                *("--checkpoint.every_n_train_steps", "null", "--checkpoint.save_top_k", "1"),
                *("--checkpoint.dirpath", str(tmp_path / "ckpt")),
            ]
        )
    assert saved_steps(tmp_path / "ckpt") == {"epoch=0-step=2.ckpt": 2, "last.ckpt": 6}


class SignalAtSecondBatch(pl.Callback):
    """Sends this process SIGTERM as the second evaluation batch starts, as a scheduler would."""

    def _maybe(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    on_validation_batch_start = on_predict_batch_start = _maybe


@pytest.mark.parametrize("command", ["validate", "predict"])
def test_sigterm_stops_an_evaluation_command_and_writes_nothing(
    command, straight, shared_cache, tmp_path, capsys
):
    """Lightning alone only logs the signal and goes on until the scheduler kills the job; polyhead
    stops after the batch with the signal's exit code, and a predictions file appears whole or not at all."""
    checkpoint = Path(straight.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    predictions = tmp_path / "predictions.jsonl"
    documents = tmp_path / "docs.jsonl"
    documents.write_text(SEED_CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    args = [
        command, "--config", QUICKSTART, *FIT[3:9], "--data.batch_size", "2", "--trainer.logger", "false",
        "--ckpt_path", str(checkpoint), "--predictions.path", str(predictions),
        "--trainer.callbacks+=tests.test_faults.SignalAtSecondBatch",
        *(f"--data.sources.{task}.test_path={documents}" for task in ("mlm_nsp", "triplet", "summarize")),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info, isolated(tmp_path, shared_cache):
        main(args)
    assert exit_info.value.code == 128 + signal.SIGTERM
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"polyhead: stopped by SIGTERM during {command}, before its end"), last
    assert not predictions.exists() and not list(tmp_path.glob(".predictions*"))
    handler = signal.getsignal(signal.SIGTERM)
    assert not isinstance(getattr(handler, "__self__", None), GracefulStop), "the handler was not given back"
