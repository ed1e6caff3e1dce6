"""Sweep specs: the example specs are valid W&B specs whose parameters polyhead's CLI accepts; a
spec W&B would refuse, or a parameter the CLI does not know, is refused with the reason before
anything launches."""

from __future__ import annotations

import pytest
import yaml

from experiments.cli import main
from experiments.sweep_spec import check_with_cli, load_spec, parse_spec

from .conftest import ROOT

QUICKSTART = str(ROOT / "experiments" / "configs" / "quickstart.yaml")
COMMAND = ["${env}", "polyhead", "fit", "--config", QUICKSTART, "${args}"]
EXAMPLES = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


def test_example_specs_are_valid_and_the_cli_knows_their_parameters():
    assert {p.name for p in EXAMPLES} >= {
        "quickstart_lr.yaml",
        "mlm_nsp_lr_warmup.yaml",
        "triplet_miner_margin.yaml",
        "seq2seq_mixing_temperature.yaml",
    }
    for path in EXAMPLES:
        spec = load_spec(path)
        assert spec.metric and spec.command[:3] == ("${env}", "polyhead", "fit"), path
        check_with_cli(spec)  # raises on a key or value the CLI refuses


def spec(**changes) -> dict:
    base = {
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.optimizer.lr": {"values": [1e-3, 3e-3]}},
        "command": COMMAND,
    }
    return base | changes


def refused(config: dict, tmp_path, capsys) -> str:
    """Run `polyhead sweep` on the spec: it must exit with one `polyhead: error:` line and leave
    nothing behind (no sweep state, no W&B run)."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(config))
    sweeps = tmp_path / "sweeps"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--backend", "local", "--sweeps-dir", str(sweeps)])
    message = str(exit_info.value.code)
    assert message.startswith("polyhead: error:") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert not sweeps.exists(), "nothing may be launched for a refused spec"
    assert not list(tmp_path.glob("**/*.wandb"))
    return message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"method": "hyperopt"}, "unknown method 'hyperopt'"),
        ({"parameters": {"model.optimizer.lr": {"values": []}}}, "values is empty"),
        ({"parameters": {}}, "`parameters` is required"),
        ({"parameters": {"model.optimizer.lr": {"distribution": "uniform", "min": 0.1}}}, "needs max"),
        (
            {"parameters": {"model.optimizer.lr": {"min": 0.1, "max": 0.01}}},
            "min 0.1 is not less than max 0.01",
        ),
        (
            {
                "method": "random",
                "parameters": {"model.optimizer.lr": {"distribution": "log_uniform", "min": -9, "max": -4}},
            },
            "Use log_uniform_values",
        ),
        (
            {
                "parameters": {
                    "model.optimizer.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}
                }
            },
            "min must be > 0",
        ),
        (
            {
                "method": "random",
                "parameters": {"model.optimizer.lr": {"values": [1, 2], "probabilities": [0.5, 0.6]}},
            },
            "do not sum to 1",
        ),
        (
            {"parameters": {"model.optimizer.lr": {"distribution": "uniform", "min": 0.0, "max": 1.0}}},
            "grid search cannot enumerate",
        ),
        ({"method": "bayes", "metric": None}, 'bayes search requires a "metric"'),
        ({"metric": {"name": "val/loss", "goal": "lowest"}}, "minimize or maximize"),
        ({"early_terminate": {"type": "hyperband", "eta": 3}}, "needs min_iter, or max_iter and s"),
        ({"early_terminate": {"type": "envelope", "min_iter": 1}}, "type: hyperband"),
        ({"run_cap": 0}, "run_cap must be an integer > 0"),
        ({"parameters": {"1lr": {"value": 1}}}, "must match"),
        ({"learning_rate": 0.1}, "unknown key(s) learning_rate"),
        ({"command": ["polyhead", "fit", "--config", QUICKSTART]}, "add ${args}"),
        ({"command": ["python", "train.py", "${args}"]}, "must run `polyhead fit`"),
        ({"command": ["polyhead", "fit", "${args_json}"]}, "use ${args}"),
        (
            {"parameters": {"model": {"parameters": {"optimizer.lr": {"value": 0.1}}}}},
            "name each swept key with dots",
        ),
    ],
)
def test_specs_w_and_b_would_refuse_are_refused_with_the_reason(changes, expected, tmp_path, capsys):
    config = {k: v for k, v in spec(**changes).items() if v is not None}
    assert expected in refused(config, tmp_path, capsys)


def test_a_parameter_the_cli_does_not_know_is_refused_before_launching(tmp_path, capsys):
    unknown_key = spec(parameters={"model.backbone.n_layer": {"values": [2, 4]}})
    assert "n_layer" in refused(unknown_key, tmp_path, capsys)
    wrong_type = spec(parameters={"model.optimizer.lr": {"values": [1e-3, "fast"]}})
    assert "model.optimizer.lr" in refused(wrong_type, tmp_path, capsys)


def test_defaults_are_filled_as_w_and_b_fills_them():
    parsed = parse_spec(
        spec(
            method="random",
            parameters={
                "data.batch_size": {"min": 8, "max": 64},
                "model.backbone.dropout": {"min": 0, "max": 0.3},
                "model.optimizer.warmup": {"distribution": "q_uniform", "min": 0, "max": 1},
                "model.optimizer.lr": {"distribution": "normal"},
                "seed_everything": {"value": 3},
            },
            early_terminate={"type": "hyperband", "min_iter": 2},
        )
    )
    kinds = {p.name: (p.distribution, p.settings) for p in parsed.parameters}
    assert kinds["data.batch_size"][0] == "int_uniform"  # integer bounds, no distribution
    assert kinds["model.backbone.dropout"][0] == "uniform"
    assert kinds["model.optimizer.warmup"][1]["q"] == 1.0
    assert kinds["model.optimizer.lr"][1] == {"mu": 0.0, "sigma": 1.0}
    assert kinds["seed_everything"][0] == "constant"
    assert parsed.early_terminate["eta"] == 3 and parsed.goal == "minimize"
    assert [p.name for p in parsed.swept] == sorted(kinds.keys() - {"seed_everything"})
