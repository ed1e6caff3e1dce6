"""The W&B backend of `polyhead sweep`: the sweep lives on the W&B server, whose controller picks
configurations (grid, random, Bayesian) and stops runs by hyperband, and `wandb agent` processes
on any number of machines run its trials. Each trial is the spec's command (`polyhead fit ...
${args}`): its parameters arrive on the command line, so every DDP rank sees them.

It needs a W&B API key and the network (`wandb.sweep` and `wandb agent` cannot run offline); the
local backend (experiments/sweep_local.py) runs the same spec without either.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

from experiments.runs import sweep_path
from experiments.sweep_spec import SEED_KEY, SweepSpec
from experiments.wandb_mode import wandb_project
from modules.errors import UserError, one_line


def wandb_config(spec: SweepSpec, seeds: int) -> dict:
    """The spec as W&B receives it; --seeds S adds seed_everything 0..S-1 as a grid dimension (a
    W&B agent cannot repeat a sampled configuration, so random and bayes cannot take seeds)."""
    config = copy.deepcopy(spec.raw)
    if seeds > 1:
        if spec.method != "grid":
            raise UserError(
                f"--seeds with method {spec.method} needs --backend local: a W&B agent cannot repeat a configuration"
            )
        config["parameters"][SEED_KEY] = {"values": list(range(seeds))}
    return config


def start_sweep(
    spec: SweepSpec, seeds: int, count: int | None, parallel: int, project: str | None, entity: str | None
) -> str:
    """Create the sweep on W&B, print its URL and how other machines join, and run `parallel`
    agents here. -> entity/project/sweep id."""
    import wandb

    project = project or spec.project or wandb_project()
    try:
        sweep_id = wandb.sweep(wandb_config(spec, seeds), project=project, entity=entity or spec.entity)
    except (wandb.errors.CommError, wandb.errors.UsageError) as error:
        raise UserError(f"W&B refused the sweep: {one_line(str(error))}") from None
    path = sweep_path(sweep_id, project, entity or spec.entity)
    entity_name, project_name, _ = path.split("/")
    print(f"sweep {path}: https://wandb.ai/{entity_name}/{project_name}/sweeps/{sweep_id}")
    print(f"join from other machines: polyhead sweep --join {path} [--parallel K]")
    run_agents(path, count, parallel)
    return path


def join_sweep(sweep: str, count: int | None, parallel: int, project: str | None, entity: str | None) -> str:
    path = sweep_path(sweep, project, entity)
    run_agents(path, count, parallel)
    return path


def agent_commands(path: str, count: int | None, parallel: int) -> list[list[str]]:
    """The `wandb agent` command lines of `parallel` agents (this environment's wandb) that run
    exactly `count` runs together (the first count % parallel take one more; none idle), or runs
    until the sweep ends when count is None."""
    agent = [str(Path(sys.executable).with_name("wandb")), "agent"]
    if count is None:
        return [[*agent, path] for _ in range(parallel)]
    shares = [count // parallel + (k < count % parallel) for k in range(parallel)]
    return [[*agent, "--count", str(n), path] for n in shares if n]


def run_agents(path: str, count: int | None, parallel: int) -> None:
    """`parallel` `wandb agent` processes for the sweep, `count` runs in all split among them;
    `polyhead` resolves to this environment's. Runs are tagged and grouped by the sweep, as the
    local backend's are. Ends with the comparison table of the sweep's runs."""
    from experiments.compare_command import compare

    sweep_id = path.rsplit("/", 1)[-1]
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "WANDB_TAGS": f"sweep,{sweep_id}",
        "WANDB_RUN_GROUP": sweep_id,
    }
    agents = [subprocess.Popen(command, env=env) for command in agent_commands(path, count, parallel)]
    try:
        codes = [agent.wait() for agent in agents]
    except KeyboardInterrupt:
        for agent in agents:
            agent.terminate()
        raise UserError(f"agents stopped; the sweep goes on: polyhead sweep --join {path}") from None
    if any(codes):
        raise UserError(f"wandb agent exited with {max(codes)}; see its output above")
    compare(["--sweep", path])
