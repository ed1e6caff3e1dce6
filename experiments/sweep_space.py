"""A sweep spec's parameters as an Optuna search space, and Optuna's suggestions back as values.

The local backend samples every method through Optuna: random through `RandomSampler`, bayes
through TPE, grid points as enqueued fixed trials, so one study holds every trial of a sweep and
its pruner can compare them. Each W&B distribution maps to the Optuna distribution with the same
law, plus a decoding step:
  categorical              the value's index (any YAML value can be a choice)
  int_uniform / uniform    Optuna's int / float on [min, max]
  *log_uniform_values      float on [min, max] with log=True (inv_log_uniform_values is the same
                           law: 1/X log-uniform on [1/max, 1/min] <=> X log-uniform on [min, max])
  q_*                      the unquantized law, then round(x / q) * q as W&B does (an int when q is)
  normal / log_normal,     a quantile u in (0, 1) mapped through the inverse CDF, as W&B's own
  categorical_w_probabilities  sampler does: a uniform u gives exactly the named law, and TPE
                           searches the same quantile space W&B's Bayesian search models
Beta laws need a beta quantile function (scipy's, which polyhead does not depend on): the local
backend refuses them before launching; the W&B backend supports them.
"""

from __future__ import annotations

import bisect
import itertools
import math
from statistics import NormalDist

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from experiments.sweep_spec import Parameter, SweepSpec, quantized
from modules.errors import UserError

QUANTILE_EDGE = 1e-9  # quantiles stay inside (0, 1): +-6 sigma for a normal
QUANTILE = FloatDistribution(QUANTILE_EDGE, 1 - QUANTILE_EDGE)


def check_local_support(spec: SweepSpec) -> None:
    beta = [p.name for p in spec.parameters if p.distribution in ("beta", "q_beta")]
    if beta:
        raise UserError(
            f"{spec.source}: {', '.join(beta)}: beta distributions need --backend wandb "
            "(the local backend has no beta quantile function)"
        )


def distribution(parameter: Parameter) -> BaseDistribution | None:
    """The Optuna distribution a parameter is searched in; None for a constant."""
    kind, s = parameter.distribution, parameter.settings
    if kind == "constant":
        return None
    if kind == "categorical":
        return CategoricalDistribution(list(range(len(s["values"]))))
    if kind == "int_uniform":
        return IntDistribution(s["min"], s["max"])
    if kind in ("uniform", "q_uniform"):
        return FloatDistribution(float(s["min"]), float(s["max"]))
    if kind in ("log_uniform_values", "inv_log_uniform_values", "q_log_uniform_values"):
        return FloatDistribution(float(s["min"]), float(s["max"]), log=True)
    return QUANTILE  # normal, log_normal (and their q_ forms), categorical_w_probabilities


def searched(spec: SweepSpec) -> list[Parameter]:
    """The parameters as searched: a grid's int_uniform and q_uniform become the categorical
    parameters of their expansions (W&B's grid does the same)."""
    if spec.method != "grid":
        return list(spec.parameters)
    return [
        p
        if p.distribution in ("constant", "categorical")
        else Parameter(p.name, "categorical", {"values": p.values})
        for p in spec.parameters
    ]


def search_space(spec: SweepSpec) -> dict[str, BaseDistribution]:
    return {p.name: d for p in searched(spec) if (d := distribution(p)) is not None}


def decode(parameter: Parameter, suggested) -> object:
    """Optuna's suggestion for `parameter` -> the value the trial receives."""
    kind, s = parameter.distribution, parameter.settings
    if kind == "constant":
        return s["value"]
    if kind == "categorical":
        return s["values"][suggested]
    if kind == "categorical_w_probabilities":
        cumulative = list(itertools.accumulate(s["probabilities"]))
        return s["values"][
            min(bisect.bisect_right(cumulative, suggested * cumulative[-1]), len(cumulative) - 1)
        ]
    if kind in ("normal", "q_normal", "log_normal", "q_log_normal"):
        value = s["mu"] if s["sigma"] == 0 else NormalDist(s["mu"], s["sigma"]).inv_cdf(suggested)
        value = math.exp(value) if "log" in kind else value
    else:
        value = suggested
    return quantized(value, s["q"]) if kind.startswith("q_") else value


def configuration(spec: SweepSpec, suggestions: dict) -> dict:
    """Optuna's params of a trial -> {CLI key: value} for every parameter, constants included."""
    return {p.name: decode(p, suggestions.get(p.name)) for p in searched(spec)}


def grid_suggestions(spec: SweepSpec) -> list[dict]:
    """Every grid point as Optuna params (value indices), in W&B's order: parameters sorted by
    name, the last one varying fastest."""
    swept = [p for p in searched(spec) if p.distribution != "constant"]
    ranges = [range(len(p.settings["values"])) for p in swept]
    return [{p.name: i for p, i in zip(swept, point, strict=True)} for point in itertools.product(*ranges)]
