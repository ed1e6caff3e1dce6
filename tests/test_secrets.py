"""A W&B API key in the environment stays there: a run with one writes it into no file, neither
its config, logs, checkpoints, W&B run files nor the tokenizer cache, and prints it nowhere."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, offline_env

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex digits


def test_a_wandb_key_is_written_nowhere(tmp_path):
    env = offline_env(tmp_path) | {"WANDB_API_KEY": KEY, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [
        *("fit", "--config", QUICKSTART, "--model.backbone.d_model", "32", "--model.backbone.n_heads", "2"),
        *("--model.backbone.d_ff", "64", "--data.batch_size", "8", "--trainer.max_steps", "2"),
        *("--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"),
        *(
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--checkpoint.dirpath",
            str(tmp_path / "ckpt"),
        ),
    ]
    with open(tmp_path / "stdout.log", "w") as out, open(tmp_path / "stderr.log", "w") as err:
        result = subprocess.run(
            [sys.executable, "-m", "experiments.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            timeout=600,
        )
    assert result.returncode == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    written = {path.relative_to(tmp_path).parts[0] for path in files}
    assert {"runs", "ckpt", "polyhead-cache", "stdout.log", "stderr.log"} <= written, written
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/files/polyhead-config.yaml"))
    leaked = [str(path.relative_to(tmp_path)) for path in files if KEY.encode() in path.read_bytes()]
    assert not leaked, f"the API key is in {leaked}"
