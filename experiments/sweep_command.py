"""`polyhead sweep`: run a W&B sweep spec (experiments/sweeps/*.yaml), locally or through W&B.

    polyhead sweep SPEC.yaml [--count N] [--backend wandb|local] [--parallel K] [--seeds S]
    polyhead sweep --join SWEEP_ID [--count N] [--parallel K]     another machine joins a W&B sweep

Every trial is its own `polyhead fit` process with its parameters on the command line. The local
backend (the default without W&B credentials) keeps the sweep under runs/sweeps/<id>/; relaunching
the same command resumes it, running only the trials that are missing or failed. The wandb backend
creates the sweep on the W&B server and runs `wandb agent` workers. Before anything launches, the
spec is checked as W&B would check it and every parameter is parsed by polyhead's CLI.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from rich.table import Table

from experiments.sweep_local import LocalSweep, TrialOutcome
from experiments.sweep_spec import SEED_KEY, SEED_KEYS, SweepSpec, check_with_cli, load_spec, spec_fingerprint
from experiments.sweep_store import DEFAULT_SWEEPS_DIR, SweepStore
from experiments.sweep_wandb import join_sweep, start_sweep, wandb_config
from experiments.terminal import CommandParser, console
from experiments.wandb_mode import require_wandb_online, wandb_online
from modules.errors import UserError


def parser() -> CommandParser:
    sweep = CommandParser(
        prog="polyhead sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sweep.add_argument("spec", nargs="?", help="a sweep spec in W&B's format (experiments/sweeps/*.yaml)")
    sweep.add_argument(
        "--count", type=positive_int, help="configurations to run in all (grid: default all of it)"
    )
    sweep.add_argument(
        "--backend", choices=("wandb", "local"), help="default: wandb with W&B credentials, else local"
    )
    sweep.add_argument(
        "--parallel", type=positive_int, default=1, help="trials at once (local), or wandb agents"
    )
    sweep.add_argument(
        "--seeds", type=positive_int, default=1, help="run each configuration with seed_everything 0..S-1"
    )
    sweep.add_argument("--join", metavar="SWEEP_ID", help="run agents for an existing W&B sweep")
    sweep.add_argument("--sweeps-dir", default=DEFAULT_SWEEPS_DIR, help="where local sweeps keep their state")
    sweep.add_argument("--project", help="W&B project (default: the spec's, else $WANDB_PROJECT or polyhead)")
    sweep.add_argument("--entity", help="W&B entity (default: the spec's, else your default entity)")
    return sweep


def positive_int(text: str) -> int:
    """argparse type of --count, --parallel and --seeds: a count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def sweep_id(spec: SweepSpec, seeds: int) -> str:
    """<name>-<hash of spec and seeds>: the same spec finds its sweep again, a changed one starts anew."""
    name = spec.name or Path(spec.source).stem
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', name).strip('-') or 'sweep'}-{spec_fingerprint(spec, seeds)}"


def checked_spec(path: str, seeds: int) -> SweepSpec:
    """Load the spec and refuse, before launching anything, what W&B would refuse, what the
    seeds would clash with, and any parameter polyhead's CLI does not accept."""
    spec = load_spec(path)
    clash = [p.name for p in spec.parameters if p.name in SEED_KEYS]
    if seeds > 1 and clash:
        raise UserError(
            f"{path}: --seeds sets seed_everything itself; the spec sweeps {', '.join(clash)} too"
        )
    check_with_cli(spec, [f"--{SEED_KEY}=0"] if seeds > 1 else [])
    return spec


def summary_table(outcomes: list[TrialOutcome], spec: SweepSpec) -> Table:
    swept = [p.name for p in spec.swept]
    seeded = any(o.seed is not None for o in outcomes)
    metric = spec.metric or "metric"
    table = Table(title="sweep summary")
    for header in ["trial", "state", *swept, *(["seed"] if seeded else []), metric, "run"]:
        table.add_column(header, overflow="fold")
    for o in outcomes:
        value = "-" if o.value is None else f"{o.value:.6g}"
        run = _short_path(o.run_dir) if o.run_dir else "-"
        seed = [str(o.seed)] if seeded else []
        table.add_row(str(o.number), o.state, *(str(o.config.get(n)) for n in swept), *seed, value, run)
    return table


def _short_path(path: str) -> str:
    """Relative to the working directory when under it, else as it is."""
    here = Path.cwd()
    return str(Path(path).relative_to(here)) if Path(path).is_relative_to(here) else path


def best_outcome(outcomes: list[TrialOutcome], spec: SweepSpec) -> TrialOutcome | None:
    scored = [o for o in outcomes if o.state == "finished" and o.value is not None]
    if not spec.metric or not scored:
        return None
    pick = min if spec.goal == "minimize" else max
    return pick(scored, key=lambda o: o.value)


def run_local(options, spec: SweepSpec) -> list[TrialOutcome]:
    store = SweepStore(Path(options.sweeps_dir) / sweep_id(spec, options.seeds))
    if not store.exists():
        store.save(spec, options.seeds)
    runner = LocalSweep(spec, store, seeds=options.seeds, parallel=options.parallel, count=options.count)
    outcomes = runner.run()
    out = console()
    out.print(summary_table(outcomes, spec))
    best = best_outcome(outcomes, spec)
    if best is not None:
        out.print(f"best: trial {best.number}, {spec.metric} = {best.value:.6g}, run {best.run_dir}")
    out.print(
        f"compare: polyhead compare --sweep {store.id}"
        + ("" if options.sweeps_dir == DEFAULT_SWEEPS_DIR else f" --sweeps-dir {options.sweeps_dir}")
    )
    failed = [o for o in outcomes if o.state == "failed"]
    for o in failed:
        out.print(f"trial {o.number} failed: {o.error} (log: {o.log})")
    if failed:
        raise UserError(
            f"{len(failed)} of {len(outcomes)} trial(s) of sweep {store.id} failed; fix the cause and relaunch "
            "the same command to run only those"
        )
    return outcomes


def sweep(argv: list[str]) -> list[TrialOutcome] | None:
    """Run `polyhead sweep ARGV`; user mistakes raise UserError."""
    options = parser().parse_args(argv)
    backend = options.backend or ("wandb" if options.join or wandb_online() else "local")
    if backend == "wandb":
        require_wandb_online("the wandb backend")
    if options.join:
        if options.spec or backend != "wandb":
            raise UserError("sweep --join SWEEP_ID joins a W&B sweep: give no spec and no --backend local")
        join_sweep(options.join, options.count, options.parallel, options.project, options.entity)
        return None
    if not options.spec:
        raise UserError("sweep: give a spec (experiments/sweeps/*.yaml), or --join SWEEP_ID")
    spec = checked_spec(options.spec, options.seeds)
    if backend == "wandb":
        wandb_config(spec, options.seeds)  # refuses --seeds W&B cannot honour, before creating anything
    if backend == "local":
        return run_local(options, spec)
    start_sweep(spec, options.seeds, options.count, options.parallel, options.project, options.entity)
    return None
