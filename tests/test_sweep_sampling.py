"""The local backend's sampling honours every W&B distribution and its bounds: many draws through
Optuna's RandomSampler and TPE (the samplers a local random / bayes sweep uses), decoded to the
values trials receive; and a grid enumerates what W&B's grid enumerates, in its order."""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter

import optuna
import pytest

from experiments.sweep_space import configuration, grid_suggestions, search_space
from experiments.sweep_spec import parse_spec

PARAMETERS = {
    "a.int": {"min": -3, "max": 7},
    "a.uniform": {"min": 0.25, "max": 0.75},
    "a.q_uniform": {"distribution": "q_uniform", "min": 0.05, "max": 0.95, "q": 0.1},
    "a.q_uniform_int": {"distribution": "q_uniform", "min": 0, "max": 100, "q": 8},
    "a.log": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1},
    "a.inv_log": {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 10.0},
    "a.q_log": {"distribution": "q_log_uniform_values", "min": 1, "max": 1000, "q": 1},
    "a.normal": {"distribution": "normal", "mu": 2.0, "sigma": 0.5},
    "a.q_normal": {"distribution": "q_normal", "mu": 10.0, "sigma": 3.0, "q": 2},
    "a.log_normal": {"distribution": "log_normal", "mu": 0.0, "sigma": 1.0},
    "a.categorical": {"values": ["x", [1, 2], {"k": 3}]},
    "a.weighted": {"values": ["rare", "common"], "probabilities": [0.2, 0.8]},
    "a.constant": {"value": 42},
}


@functools.cache  # the same draws serve several tests
def draws(method: str, n: int) -> list[dict]:
    spec = parse_spec({"method": method, "metric": {"name": "m"}, "parameters": PARAMETERS,
                       "command": ["polyhead", "fit", "${args}"]})  # fmt: skip
    sampler = (
        optuna.samplers.TPESampler(seed=0) if method == "bayes" else optuna.samplers.RandomSampler(seed=0)
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    space = search_space(spec)
    values = []
    for _ in range(n):
        trial = study.ask(space)
        config = configuration(spec, trial.params)
        values.append(config)
        # an objective with its optimum inside the bounds, so TPE moves its proposals around
        study.tell(trial, (math.log10(config["a.log"]) + 3) ** 2 + (config["a.uniform"] - 0.3) ** 2)
    return values


def is_multiple(value: float, q: float) -> bool:
    return abs(value / q - round(value / q)) < 1e-9


@pytest.mark.parametrize(("method", "n"), [("random", 2000), ("bayes", 150)])
def test_draws_stay_within_each_distribution(method, n):
    for config in draws(method, n):
        assert isinstance(config["a.int"], int) and -3 <= config["a.int"] <= 7
        assert 0.25 <= config["a.uniform"] <= 0.75
        # q_*: round(x / q) * q of a draw in [min, max], as W&B quantizes (an int when q is)
        assert is_multiple(config["a.q_uniform"], 0.1) and 0.0 <= config["a.q_uniform"] <= 1.0
        assert isinstance(config["a.q_uniform_int"], int) and config["a.q_uniform_int"] % 8 == 0
        assert 0 <= config["a.q_uniform_int"] <= 104
        assert 1e-5 <= config["a.log"] <= 1e-1
        assert 0.01 <= config["a.inv_log"] <= 10.0
        assert isinstance(config["a.q_log"], int) and 1 <= config["a.q_log"] <= 1000
        assert isinstance(config["a.q_normal"], int) and config["a.q_normal"] % 2 == 0
        assert config["a.log_normal"] > 0
        assert config["a.categorical"] in PARAMETERS["a.categorical"]["values"]
        assert config["a.weighted"] in ("rare", "common")
        assert config["a.constant"] == 42


def test_random_draws_follow_each_law():
    values = draws("random", 2000)

    def column(name):
        return [config[name] for config in values]

    # uniform: mean and spread of U(0.25, 0.75)
    assert statistics.fmean(column("a.uniform")) == pytest.approx(0.5, abs=0.01)
    assert statistics.stdev(column("a.uniform")) == pytest.approx(0.5 / math.sqrt(12), rel=0.05)
    # log-uniform: log10 is uniform on [-5, -1]; inverse log-uniform: ln(1/x) uniform
    assert statistics.fmean(math.log10(v) for v in column("a.log")) == pytest.approx(-3, abs=0.08)
    assert statistics.fmean(math.log(1 / v) for v in column("a.inv_log")) == pytest.approx(
        -(math.log(0.01) + math.log(10.0)) / 2, abs=0.08
    )
    # normal and log-normal: mean and std of the law
    assert statistics.fmean(column("a.normal")) == pytest.approx(2.0, abs=0.04)
    assert statistics.stdev(column("a.normal")) == pytest.approx(0.5, rel=0.06)
    assert statistics.fmean(math.log(v) for v in column("a.log_normal")) == pytest.approx(0.0, abs=0.07)
    # every integer of int_uniform, both ends included, about equally often
    counts = Counter(column("a.int"))
    assert set(counts) == set(range(-3, 8)) and min(counts.values()) > 2000 / 11 * 0.7
    # categorical values equally likely; weighted ones by their probabilities
    assert min(Counter(map(str, column("a.categorical"))).values()) > 2000 / 3 * 0.85
    assert Counter(column("a.weighted"))["rare"] / 2000 == pytest.approx(0.2, abs=0.03)


def test_grid_enumerates_like_w_and_b():
    spec = parse_spec(
        {
            "method": "grid",
            "parameters": {
                "b.values": {"values": ["x", "y"]},
                "a.int": {"distribution": "int_uniform", "min": 1, "max": 3},
                "c.q": {
                    "distribution": "q_uniform",
                    "min": 0.05,
                    "max": 0.3,
                    "q": 0.1,
                },  # numpy.arange: max excluded
                "d.fixed": {"value": 7},
            },
            "command": ["polyhead", "fit", "${args}"],
        }
    )
    grid = [configuration(spec, point) for point in grid_suggestions(spec)]
    assert len(grid) == 2 * 3 * 3
    # parameters sorted by name, the last varying fastest
    assert grid[:4] == [
        {"a.int": 1, "b.values": "x", "c.q": 0.05, "d.fixed": 7},
        {"a.int": 1, "b.values": "x", "c.q": 0.15, "d.fixed": 7},
        {"a.int": 1, "b.values": "x", "c.q": 0.25, "d.fixed": 7},
        {"a.int": 1, "b.values": "y", "c.q": 0.05, "d.fixed": 7},
    ]
    assert {g["a.int"] for g in grid} == {1, 2, 3}
