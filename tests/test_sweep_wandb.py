"""The W&B backend refuses at once what it cannot do here (no key, offline mode, seeds W&B's
agents cannot repeat) and sends W&B the spec as written, plus the seed dimension for a grid."""

from __future__ import annotations

import pytest
import yaml

from experiments.cli import main
from experiments.sweep_spec import parse_spec
from experiments.sweep_wandb import agent_commands, wandb_config

COMMAND = ["${env}", "polyhead", "fit", "--config", "experiments/configs/quickstart.yaml", "${args}"]


def spec(method: str = "grid") -> dict:
    return {
        "method": method,
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.optimizer.lr": {"values": [1e-3, 3e-3]}},
        "command": COMMAND,
    }


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *argv])
    message = str(exit_info.value.code)
    assert message.startswith("polyhead: error:") and "Traceback" not in capsys.readouterr().err
    return message


def test_without_a_key_or_online_mode_the_wandb_backend_stops_at_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec()))
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    message = fails([str(path), "--backend", "wandb"], capsys)
    assert "there is no W&B API key" in message and "--backend local" in message
    assert "there is no W&B API key" in fails(["--join", "someone/polyhead/abc123"], capsys)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # never sent anywhere: offline mode stops it first
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert "WANDB_MODE=offline" in fails([str(path), "--backend", "wandb"], capsys)


def test_seeds_become_a_grid_dimension_and_are_refused_for_sampled_sweeps():
    config = wandb_config(parse_spec(spec()), seeds=3)
    assert config["parameters"]["seed_everything"] == {"values": [0, 1, 2]}
    assert config["command"] == COMMAND and "seed_everything" not in spec()["parameters"]
    assert wandb_config(parse_spec(spec("random")), seeds=1) == spec("random")
    with pytest.raises(ValueError, match="needs --backend local"):
        wandb_config(parse_spec(spec("random")), seeds=2)


@pytest.mark.parametrize("count, parallel", [(5, 2), (2, 4), (7, 3), (1, 1)])
def test_agents_run_exactly_count_runs_together(count, parallel):
    commands = agent_commands("me/polyhead/abc123", count, parallel)
    shares = [int(command[command.index("--count") + 1]) for command in commands]
    assert sum(shares) == count and len(commands) == min(count, parallel)
    assert max(shares) - min(shares) <= 1, "the runs are spread evenly"
    assert all(command[-1] == "me/polyhead/abc123" and command[1] == "agent" for command in commands)
    assert len(agent_commands("me/polyhead/abc123", None, parallel)) == parallel


@pytest.mark.parametrize("option", ["--count", "--parallel", "--seeds"])
def test_counts_below_one_are_refused_before_anything_starts(option, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec()))
    message = fails([str(path), "--backend", "local", option, "0"], capsys)
    assert f"argument {option}: '0' is not a whole number of at least 1" in message, message
