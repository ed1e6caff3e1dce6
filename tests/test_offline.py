"""Without a network no command waits on one: fit, validate, test and predict on local data open no
connection beyond this machine; a hub name fails within seconds, saying to pass a local path; a
W&B key with no W&B server answering logs offline, and `polyhead sweep` and `compare` work offline
instead of waiting on W&B's API client. (Their offline work itself is tested in
tests/test_sweep_local.py and tests/test_compare.py.)

"No network" here is a hub and a W&B server at an address nothing answers from (10.255.255.1),
with the HF_*_OFFLINE settings of the other tests removed."""

from __future__ import annotations

import socket
import sys
import time

import datasets
import huggingface_hub.constants
import pytest
import torch

from experiments.cli import main

from .conftest import ROOT, SEED_CORPUS

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
NOWHERE = "https://10.255.255.1"
TINY = [
    *("--model.backbone.d_model", "32", "--model.backbone.n_heads", "2", "--model.backbone.d_ff", "64"),
    *("--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"),
    *("--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"),
]
LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0"}
watching: list[list] = []


def _audit(event: str, args: tuple) -> None:
    """Notes every connection and name lookup to a host other than this machine, while a test watches."""
    if not watching or event not in ("socket.connect", "socket.getaddrinfo"):
        return
    host = args[1] if event == "socket.connect" else args[0]
    if isinstance(host, tuple):
        host = host[0]
    if isinstance(host, bytes):
        host = host.decode()
    if isinstance(host, str) and host not in LOCAL and not host.startswith("/") and host:
        watching[-1].append((event, host))


sys.addaudithook(_audit)


@pytest.fixture
def no_network(monkeypatch):
    """The hub and W&B at an address that does not answer, and no HF offline settings."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", NOWHERE)
    monkeypatch.setenv("WANDB_BASE_URL", NOWHERE)


def fails_within(seconds: float, args: list[str], capsys) -> str:
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    elapsed = time.monotonic() - started
    message = str(exit_info.value.code)
    assert message.startswith("polyhead: error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert elapsed < seconds, f"{elapsed:.0f} s: it waited on the network"
    return message


def test_a_hub_dataset_fails_fast_and_asks_for_a_local_path(no_network, capsys):
    config = str(ROOT / "experiments" / "configs" / "pretrain_mlm_nsp.yaml")
    args = [
        "fit",
        "--config",
        config,
        "--data.sources.mlm_nsp.hub",
        "polyhead-tests/absent",
        "--trainer.logger",
        "false",
    ]
    message = fails_within(20, args, capsys)  # datasets alone retries for 26 s before it gives up
    assert "data.sources.mlm_nsp.hub: could not load 'polyhead-tests/absent'" in message
    assert "offline, only datasets in the local HF cache load" in message
    assert "set data.sources.mlm_nsp.path to a local file instead" in message


def test_a_hub_model_to_convert_fails_fast_and_asks_for_a_local_path(no_network, tmp_path, capsys):
    message = fails_within(30, ["convert", "polyhead-tests/absent-bert", str(tmp_path / "out.ckpt")], capsys)
    assert "polyhead-tests/absent-bert: no such local directory" in message
    assert "pass the path of a local model directory" in message
    assert not (tmp_path / "out.ckpt").exists()


def test_every_command_runs_on_local_data_without_the_network(no_network, monkeypatch, tmp_path, capsys):
    """With a W&B key in the environment but no W&B server answering, the run logs offline (a
    notice says so) instead of waiting 90 s for the server; nothing opens a connection off this
    machine but the one question to the W&B server. (W&B's own traffic would come from its
    wandb-core process, which the audit hook does not see: the time bound and the offline run
    directories stand for it.)"""
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.delenv("WANDB_MODE")
    where = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    checkpoint = str(tmp_path / "ckpt" / "last.ckpt")
    documents = tmp_path / "four.jsonl"  # a few documents to evaluate and predict: generation is slow
    documents.write_text("".join(SEED_CORPUS.read_text().splitlines(keepends=True)[:4]))
    data = [f"--data.sources.{task}.test_path={documents}" for task in ("mlm_nsp", "triplet", "summarize")]
    commands = [
        ["fit", "--config", QUICKSTART, *TINY, *where, "--checkpoint.dirpath", str(tmp_path / "ckpt")],
        *(
            [command, "--config", QUICKSTART, *TINY, *where, "--ckpt_path", checkpoint, *data]
            for command in ("validate", "test", "predict")
        ),
    ]
    connections: list = []
    watching.append(connections)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fast on a machine busy with other work
    try:
        for args in commands:
            started = time.monotonic()
            main([*args, "--predictions.path", str(tmp_path / "predictions.jsonl")])
            assert time.monotonic() - started < 60, f"{args[0]} waited (W&B waits 90 s for a server)"
    finally:
        torch.set_num_threads(threads)
        watching.remove(connections)
    elsewhere = [c for c in connections if c[1] != "10.255.255.1"]
    assert not elsewhere, elsewhere
    asked = [c for c in connections if c[0] == "socket.connect"]
    assert len(asked) <= 1, f"the W&B server was asked more than once (the probe): {asked}"
    err = capsys.readouterr().err
    assert "W&B (https://10.255.255.1) does not answer: logging offline" in err
    assert "anonymous setting" not in err, "a W&B warning about a setting polyhead does not use"
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == len(commands), f"W&B logged offline, one run per command: {runs}"
    assert (tmp_path / "predictions.jsonl").stat().st_size > 0


def test_sweep_and_compare_with_a_key_but_no_w_and_b_server_do_not_wait(
    no_network, monkeypatch, tmp_path, capsys
):
    """A W&B key alone does not make W&B online: joining a W&B sweep is refused at once, saying why,
    and compare reads the local runs instead of asking the server."""
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.delenv("WANDB_MODE")
    message = fails_within(15, ["sweep", "--join", "someone/polyhead/abc123"], capsys)
    assert "the wandb backend needs the W&B server" in message
    assert "https://10.255.255.1 did not answer" in message and "--backend local" in message
    monkeypatch.delenv("WANDB_MODE")  # decided again by the next command
    message = fails_within(15, ["compare", "--group", "g1", "--runs-dir", str(tmp_path)], capsys)
    assert "group g1" in message, message


def test_the_watch_sees_a_connection(no_network):
    """The audit hook above is what the test before relies on: it must see a real attempt."""
    connections: list = []
    watching.append(connections)
    try:
        socket.create_connection(("10.255.255.1", 9), timeout=0.5).close()
    except OSError:
        pass  # unroutable, refused or timed out: the attempt is what counts
    finally:
        watching.remove(connections)
    assert ("socket.connect", "10.255.255.1") in connections
