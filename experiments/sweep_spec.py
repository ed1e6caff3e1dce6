"""Sweep specs in W&B's sweep YAML, parsed and checked before anything launches.

One format serves both backends (`polyhead sweep --backend wandb|local`): `method` grid / random /
bayes, `metric` (name, goal), `parameters` (value, values, probabilities, min/max and the named
distributions), `early_terminate` (hyperband), `run_cap` and `command` with `${args}`. The checks
follow W&B's own schema (wandb/sweeps `config/schema.json` and the rules its controller adds), so
a spec W&B would reject is rejected here with the reason, and a few things W&B accepts but a
polyhead trial cannot use (a nested `parameters` block, `${args_json}`, a command without
`polyhead fit`) are refused the same way. Parameter names are polyhead CLI keys
(`model.optimizer.lr`); `check_with_cli` asks the real LightningCLI parser whether it knows them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from experiments.yaml_files import load_yaml_file
from modules.errors import UserError, one_line

METHODS = ("grid", "random", "bayes")
SEED_KEY = "seed_everything"  # what --seeds sets
SEED_KEYS = (SEED_KEY, "data.seed")  # keys that only pick random streams: runs differing in them are seeds
GOALS = ("minimize", "maximize")
# W&B's top-level keys; the second set is valid W&B that a local polyhead sweep cannot honour
SPEC_KEYS = {"method", "metric", "parameters", "early_terminate", "run_cap", "command", "program",
             "name", "description", "project", "entity", "apiVersion", "kind"}  # fmt: skip
UNSUPPORTED_KEYS = {
    "metrics": "multi-objective `metrics` needs W&B's custom schedulers (method: custom)",
    "scheduler": "custom schedulers (scheduler:) run on W&B Launch",
    "controller": "`controller` selects W&B's own local controller; use --backend local instead",
    "job": "Launch jobs are not polyhead trials",
    "image_uri": "Launch images are not polyhead trials",
}
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# distribution -> (required keys, optional keys with W&B's defaults)
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "constant": (("value",), {}),
    "categorical": (("values",), {}),
    "categorical_w_probabilities": (("values", "probabilities"), {}),
    "int_uniform": (("min", "max"), {}),
    "uniform": (("min", "max"), {}),
    "q_uniform": (("min", "max"), {"q": 1.0}),
    "log_uniform_values": (("min", "max"), {}),
    "inv_log_uniform_values": (("min", "max"), {}),
    "q_log_uniform_values": (("min", "max"), {"q": 1.0}),
    "normal": ((), {"mu": 0.0, "sigma": 1.0}),
    "q_normal": ((), {"mu": 0.0, "sigma": 1.0, "q": 1.0}),
    "log_normal": ((), {"mu": 0.0, "sigma": 1.0}),
    "q_log_normal": ((), {"mu": 0.0, "sigma": 1.0, "q": 1.0}),
    "beta": ((), {"a": 1.0, "b": 1.0}),
    "q_beta": ((), {"a": 1.0, "b": 1.0, "q": 1.0}),
}
DEPRECATED = {  # W&B refuses these: their min/max are base-e exponents
    "log_uniform": "log_uniform_values",
    "inv_log_uniform": "inv_log_uniform_values",
    "q_log_uniform": "q_log_uniform_values",
}
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
POSITIVE_MIN = ("log_uniform_values", "inv_log_uniform_values", "q_log_uniform_values")
HYPERBAND_KEYS = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
METRIC_KEYS = {"name", "goal", "target", "impute", "impute_while_running"}
# W&B's command macros; polyhead fit reads `--key=value` (or `--key value`) flags only
ARGUMENT_MACROS = ("${args}", "${args_no_equals}")
OTHER_ARGUMENT_MACROS = ("${args_no_hyphens}", "${args_json}", "${args_json_file}",
                         "${args_no_boolean_flags}", "${args_append_hydra}", "${args_override_hydra}")  # fmt: skip
ENVVAR_MACRO = re.compile(r"^\$\{envvar:([A-Za-z0-9_]*)\}$")
EXAMPLE_COMMAND = "[${env}, polyhead, fit, --config, CONFIG.yaml, ${args}]"


@dataclass(frozen=True)
class Parameter:
    """One swept CLI key and its distribution (W&B's defaults filled in)."""

    name: str
    distribution: str
    settings: dict

    @property
    def values(self) -> list:
        """The discrete choices: categorical values, or a grid's expansion of int_uniform / q_uniform."""
        s = self.settings
        if self.distribution == "constant":
            return [s["value"]]
        if self.distribution.startswith("categorical"):
            return list(s["values"])
        if self.distribution == "int_uniform":
            return list(range(s["min"], s["max"] + 1))
        if self.distribution == "q_uniform":  # as W&B's grid: numpy.arange(min, max, q), max excluded
            steps = math.ceil((s["max"] - s["min"]) / s["q"] - 1e-12)
            exact = all(isinstance(s[k], int) for k in ("min", "q"))
            return [
                s["min"] + i * s["q"] if exact else float(f"{s['min'] + i * s['q']:.12g}")
                for i in range(steps)
            ]
        raise ValueError(f"{self.name}: a {self.distribution} parameter has no finite set of values")


@dataclass(frozen=True)
class SweepSpec:
    method: str
    parameters: tuple[Parameter, ...]
    command: tuple[str, ...]
    metric: str | None = None
    goal: str = "minimize"
    early_terminate: dict | None = None
    run_cap: int | None = None
    name: str | None = None
    project: str | None = None
    entity: str | None = None
    source: str = "spec"  # where it came from, for messages
    raw: dict | None = None  # the YAML as written: what the W&B backend sends

    @property
    def swept(self) -> tuple[Parameter, ...]:
        return tuple(p for p in self.parameters if p.distribution != "constant")

    def fit_arguments(self, values: dict) -> list[str]:
        """The arguments after `fit` in a trial's command, `${args}` expanded as W&B's agent does."""
        arguments = []
        for token in self.command[self.command.index("fit") + 1 :]:
            if token in ARGUMENT_MACROS:
                arguments += flags(values, equals=token == "${args}")
            elif match := ENVVAR_MACRO.match(token):
                arguments.append(os.environ.get(match.group(1), ""))
            else:
                arguments.append(token)
        return arguments


def flags(values: dict, equals: bool = True) -> list[str]:
    """`--key=value` flags written the way W&B's agent writes them (str(value)), so a trial gets
    the same command line from either backend."""
    if equals:
        return [f"--{name}={value}" for name, value in values.items()]
    return [part for name, value in values.items() for part in (f"--{name}", str(value))]


def quantized(value: float, q: float):
    """round(value / q) * q, an int when q is an int (as W&B returns it), else a float cleaned of
    binary noise (0.30000000000000004 -> 0.3)."""
    rounded = round(value / q) * q
    return int(rounded) if isinstance(q, int) else float(f"{rounded:.12g}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parameter(name: str, config, where: str) -> Parameter:
    """One entry of `parameters`, classified as W&B's schema does (the first matching shape wins)."""
    if not NAME_PATTERN.match(name):
        raise UserError(f"{where}: parameter name {name!r} must match {NAME_PATTERN.pattern}")
    if not isinstance(config, dict):
        raise UserError(f"{where}: parameter {name} must be a mapping (value:, values:, min:/max: ...)")
    if "parameters" in config:
        raise UserError(
            f"{where}: parameter {name} nests `parameters`; name each swept key with dots instead "
            f"({name}.KEY): every trial gets it as --{name}.KEY=VALUE"
        )
    distribution = config.get("distribution")
    if distribution is None:
        if "value" in config:
            distribution = "constant"
        elif "values" in config:
            distribution = "categorical_w_probabilities" if "probabilities" in config else "categorical"
        elif "min" in config and "max" in config:
            both_int = all(
                isinstance(config[k], int) and not isinstance(config[k], bool) for k in ("min", "max")
            )
            distribution = "int_uniform" if both_int else "uniform"
        else:
            raise UserError(
                f"{where}: parameter {name} needs `value`, `values`, `min` and `max`, or a `distribution`"
            )
    if distribution in DEPRECATED:
        raise UserError(
            f"{where}: parameter {name} uses {distribution}, where min/max specify base-e exponents "
            f"(W&B refuses it). Use {DEPRECATED[distribution]} to specify limit values."
        )
    if distribution not in DISTRIBUTIONS:
        raise UserError(
            f"{where}: parameter {name}: unknown distribution {distribution!r}; W&B's are "
            + ", ".join(DISTRIBUTIONS)
        )
    required, defaults = DISTRIBUTIONS[distribution]
    unknown = set(config) - set(required) - set(defaults) - {"distribution"}
    if unknown:
        raise UserError(
            f"{where}: parameter {name} ({distribution}) does not take {', '.join(sorted(unknown))}"
        )
    missing = [key for key in required if key not in config]
    if missing:
        raise UserError(f"{where}: parameter {name} ({distribution}) needs {' and '.join(missing)}")
    settings = defaults | {k: v for k, v in config.items() if k != "distribution"}
    _check_settings(name, distribution, settings, where)
    return Parameter(name, distribution, settings)


def _check_settings(name: str, distribution: str, s: dict, where: str) -> None:
    prefix = f"{where}: parameter {name} ({distribution})"
    if "values" in s:
        if not isinstance(s["values"], list):
            raise UserError(f"{prefix}: values must be a list")
        if not s["values"]:
            raise UserError(f"{prefix}: values is empty; give at least one value")
    if "probabilities" in s:
        probabilities = s["probabilities"]
        if not isinstance(probabilities, list) or not all(_is_number(p) and p >= 0 for p in probabilities):
            raise UserError(f"{prefix}: probabilities must be a list of numbers >= 0")
        if len(probabilities) != len(s["values"]):
            raise UserError(f"{prefix}: {len(s['values'])} values but {len(probabilities)} probabilities")
        if not math.isclose(sum(probabilities), 1.0, rel_tol=1e-9, abs_tol=1e-9):
            raise UserError(f"{prefix}: probabilities {probabilities} do not sum to 1")
    for key in ("min", "max", "mu", "sigma", "q", "a", "b"):
        if key in s and not _is_number(s[key]):
            raise UserError(f"{prefix}: {key} must be a number, got {s[key]!r}")
    if distribution == "int_uniform" and not all(isinstance(s[k], int) for k in ("min", "max")):
        raise UserError(f"{prefix}: min and max must be integers")
    if "min" in s and s["min"] >= s["max"]:
        raise UserError(f"{prefix}: min {s['min']} is not less than max {s['max']}")
    if distribution in POSITIVE_MIN and s["min"] <= 0:
        raise UserError(f"{prefix}: min must be > 0 (a logarithmic scale)")
    if "q" in s and s["q"] <= 0:
        raise UserError(f"{prefix}: q must be > 0")
    for key in ("sigma", "a", "b"):
        if key in s and s[key] < 0:
            raise UserError(f"{prefix}: {key} must be >= 0")


def _early_terminate(config, where: str) -> dict:
    if not isinstance(config, dict) or config.get("type") != "hyperband":
        raise UserError(f"{where}: early_terminate needs `type: hyperband` (W&B's only kind)")
    unknown = set(config) - HYPERBAND_KEYS
    if unknown:
        raise UserError(f"{where}: early_terminate does not take {', '.join(sorted(unknown))}")
    if "min_iter" not in config and not ("max_iter" in config and "s" in config):
        raise UserError(f"{where}: early_terminate (hyperband) needs min_iter, or max_iter and s")
    for key in ("min_iter", "max_iter"):
        if key in config and (
            not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1
        ):
            raise UserError(f"{where}: early_terminate.{key} must be an integer >= 1")
    eta = config.get("eta", 3)
    if not _is_number(eta) or eta <= 1:
        raise UserError(f"{where}: early_terminate.eta must be a number > 1")
    if "s" in config and (not _is_number(config["s"]) or config["s"] < 0):
        raise UserError(f"{where}: early_terminate.s must be a number >= 0")
    return {"eta": 3, "strict": True} | config


def _command(command, where: str) -> tuple[str, ...]:
    if command is None:
        raise UserError(f"{where}: needs a command that runs polyhead fit, e.g. command: {EXAMPLE_COMMAND}")
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        raise UserError(f"{where}: command must be a list of strings, e.g. {EXAMPLE_COMMAND}")
    command = tuple(str(c) for c in command)
    for macro in OTHER_ARGUMENT_MACROS:
        if macro in command:
            raise UserError(
                f"{where}: command uses {macro}, but polyhead fit reads --key=value flags: use ${{args}}"
            )
    launcher = [c for c in command if c != "${env}"]
    runs_fit = "fit" in launcher and (
        launcher[: launcher.index("fit")] == ["polyhead"]
        or launcher[: launcher.index("fit")][-2:] == ["-m", "experiments.cli"]
    )
    if not runs_fit:
        raise UserError(f"{where}: command must run `polyhead fit`, e.g. {EXAMPLE_COMMAND}")
    if not any(macro in command for macro in ARGUMENT_MACROS):
        raise UserError(
            f"{where}: command never passes the parameters: add ${{args}}, e.g. {EXAMPLE_COMMAND}"
        )
    return command


def parse_spec(config, source: str = "spec") -> SweepSpec:
    """A sweep spec (the YAML's mapping) -> SweepSpec, or UserError naming what W&B would refuse."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: a sweep spec is a YAML mapping (method:, metric:, parameters:, command:)")
    for key, reason in UNSUPPORTED_KEYS.items():
        if key in config:
            raise UserError(f"{source}: `{key}` is not supported by polyhead sweep: {reason}")
    unknown = set(config) - SPEC_KEYS
    if unknown:
        raise UserError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))}; a W&B sweep spec has {', '.join(sorted(SPEC_KEYS))}"
        )
    method = config.get("method")
    if method == "custom":
        raise UserError(
            f"{source}: method 'custom' needs a W&B Launch scheduler; polyhead sweep runs {', '.join(METHODS)}"
        )
    if method not in METHODS:
        raise UserError(f"{source}: unknown method {method!r}; use one of {', '.join(METHODS)}")
    metric = config.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
            raise UserError(f"{source}: metric needs a name, e.g. metric: {{name: val/loss, goal: minimize}}")
        if set(metric) - METRIC_KEYS:
            raise UserError(f"{source}: metric does not take {', '.join(sorted(set(metric) - METRIC_KEYS))}")
        if metric.get("goal", "minimize") not in GOALS:
            raise UserError(f"{source}: metric.goal {metric['goal']!r} must be minimize or maximize")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UserError(f"{source}: `parameters` is required and must name at least one CLI key to sweep")
    parsed = tuple(_parameter(name, parameters[name], source) for name in sorted(parameters))
    if method == "grid":
        for p in parsed:
            if p.distribution not in GRID_DISTRIBUTIONS:
                raise UserError(
                    f"{source}: parameter {p.name} is {p.distribution}, which grid search cannot enumerate: "
                    "a grid takes values (without probabilities), value, int_uniform or q_uniform"
                )
    early_terminate = config.get("early_terminate")
    if early_terminate is not None:
        early_terminate = _early_terminate(early_terminate, source)
    if method == "bayes" and metric is None:
        raise UserError(f'{source}: bayes search requires a "metric" section to optimize')
    if early_terminate is not None and metric is None:
        raise UserError(
            f'{source}: early_terminate (hyperband) requires a "metric" section to compare runs by'
        )
    run_cap = config.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise UserError(f"{source}: run_cap must be an integer > 0")
    return SweepSpec(
        method=method,
        parameters=parsed,
        command=_command(config.get("command"), source),
        metric=metric["name"] if metric else None,
        goal=metric.get("goal", "minimize") if metric else "minimize",
        early_terminate=early_terminate,
        run_cap=run_cap,
        name=config.get("name"),
        project=config.get("project"),
        entity=config.get("entity"),
        source=source,
        raw=config,
    )


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep spec not found: {str(path)!r}")
    return parse_spec(load_yaml_file(path), str(path))


def representative_configurations(spec: SweepSpec) -> list[dict]:
    """Few configurations that together use every categorical value and each distribution's two
    ends (or its centre): enough for the CLI parser to see every key and every kind of value."""
    candidates = {}
    for p in spec.parameters:
        s = p.settings
        if p.distribution in GRID_DISTRIBUTIONS or p.distribution.startswith("categorical"):
            candidates[p.name] = p.values
        elif "min" in s:
            ends = [s["min"], s["max"]]
            candidates[p.name] = [quantized(v, s["q"]) for v in ends] if "q" in s else ends
        elif p.distribution.startswith(("normal", "q_normal")):
            candidates[p.name] = [quantized(s["mu"], s["q"]) if "q" in s else s["mu"]]
        elif p.distribution.endswith("log_normal"):
            centre = math.exp(s["mu"])
            candidates[p.name] = [quantized(centre, s["q"]) if "q" in s else centre]
        else:  # beta: values in [0, 1]
            candidates[p.name] = [0.5]
    width = max(len(values) for values in candidates.values())
    return [{name: values[i % len(values)] for name, values in candidates.items()} for i in range(width)]


def check_with_cli(spec: SweepSpec, extra: list[str] = ()) -> None:
    """Parse a trial's command line with polyhead's real LightningCLI parser (`--print_config`,
    nothing instantiated) for each representative configuration: an unknown key, a value of the
    wrong type or a missing config file is refused before any trial starts."""
    from jsonargparse import ArgumentError

    from experiments.cli import run

    for values in representative_configurations(spec):
        arguments = ["fit", *spec.fit_arguments(values), *extra, "--print_config"]
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="LightningCLI's args parameter"
                )  # ours, not sys.argv
                run(arguments)
        except SystemExit as done:  # --print_config printed the config and exited
            if done.code not in (0, None):
                raise UserError(f"{spec.source}: polyhead fit refused {values}: exit {done.code}") from None
        except (ArgumentError, UserError) as error:
            message = one_line(str(error))
            named = [
                p.name
                for p in spec.parameters
                if p.name in message or f"'{p.name.rsplit('.', 1)[-1]}'" in message
            ]
            culprit = f"parameter {', '.join(named)}: " if named else ""
            raise UserError(
                f"{spec.source}: {culprit}polyhead fit refuses a trial's command line ({message})"
            ) from None


def spec_fingerprint(spec: SweepSpec, seeds: int) -> str:
    """A short hash of what defines a sweep's trials (spec and seeds); a relaunch of the same spec
    finds the same sweep and resumes it."""
    import hashlib

    text = json.dumps({"spec": spec.raw, "seeds": seeds}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
