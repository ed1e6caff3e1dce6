"""`polyhead compare`: runs side by side, from a sweep, a group, a project or run directories.

    polyhead compare runs/wandb                         every run under a directory (offline)
    polyhead compare RUN_DIR RUN_DIR ...                 these runs
    polyhead compare --sweep ID                          a local sweep (runs/sweeps/ID), else a W&B sweep
    polyhead compare --group G | --project P             offline from runs/, or online with a W&B key
    options: --metric NAME[:min|max] (repeat), --sort NAME, --markdown F.md, --csv F.csv,
             --plots DIR, --best (print only the best run's checkpoint)

One row per configuration: the config keys that differ between runs, then each metric's final
value (the run's summary) and best value over its history. Runs that differ only in their seed
(`seed_everything`, `data.seed`) share a row: mean ± std [95% interval], with a note on rows whose
intervals overlap (the seeds cannot tell those configurations apart). Offline runs are read from
their .wandb logs (experiments/runs.py); online ones through `wandb.Api`.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from experiments.compare_table import (
    Metric,
    Row,
    build_rows,
    configuration_text,
    csv_text,
    final_value,
    markdown,
    overlap_notes,
    rich_table,
    sort_rows,
    table_cells,
)
from experiments.plots import line_chart, point_chart
from experiments.runs import (
    STEP_KEY,
    Run,
    find_run_dirs,
    online_checkpoint,
    online_runs,
    online_sweep,
    read_run_dir,
)
from experiments.sweep_spec import SEED_KEY
from experiments.sweep_store import DEFAULT_SWEEPS_DIR, SweepStore
from experiments.terminal import CommandParser, console
from experiments.wandb_mode import wandb_online
from modules.atomic_write import write_text_atomically
from modules.errors import UserError

DEFAULT_RUNS_DIR = "runs"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def write_plots(directory: Path, rows: list[Row], differing: list[str], metrics: list[Metric]) -> list[Path]:
    """Per metric: its learning curves across runs; and the metric against each differing key."""
    written = []
    for metric in metrics:
        lines = {}
        for i, row in enumerate(rows, 1):
            for run in row.runs:
                steps, values = run.series(metric.name)
                if values:
                    seed = run.config.get(SEED_KEY)
                    label = f"#{i} {configuration_text(row.config) or run.name}"
                    lines[label + (f" (seed {seed})" if len(row.runs) > 1 else "")] = (steps, values)
        if lines:
            written.append(line_chart(directory / f"{_slug(metric.name)}_curves.png", lines,
                                      title=f"{metric.name} during training", xlabel=STEP_KEY, ylabel=metric.name))  # fmt: skip
        for key in differing:
            xs, ys, intervals = [], [], []
            for row in rows:
                finals = [v for run in row.runs if (v := final_value(run, metric)) is not None]
                xs += [row.config[key]] * len(finals)
                ys += finals
                agg = row.final.get(metric.name)
                if agg is not None and agg.std is not None:
                    intervals.append((row.config[key], agg.mean, agg.low, agg.high))
            if ys and all(x is not None for x in xs):
                written.append(point_chart(directory / f"{_slug(metric.name)}_vs_{_slug(key)}.png", xs, ys,
                                           title=f"final {metric.name} against {key}", xlabel=key,
                                           ylabel=metric.name, intervals=intervals))  # fmt: skip
    return written


@dataclass
class Selection:
    runs: list[Run]
    metrics: list[Metric]  # the sweep's metric when the runs come from one; else empty
    title: str


def _offline_runs(runs_dir: str, **match: str) -> list[Run]:
    runs = [read_run_dir(path) for path in find_run_dirs(runs_dir)]
    return [run for run in runs if all(getattr(run, k) == v for k, v in match.items())]


def local_sweep_runs(store: SweepStore) -> Selection:
    """A local sweep's runs: the latest attempt of each configuration x seed that has a W&B run
    (a trial that failed before training has none); pruned trials keep their state."""
    from experiments.sweep_local import outcomes

    spec, _ = store.load()
    runs = []
    for outcome in outcomes(store, spec):
        if outcome.run_dir and Path(outcome.run_dir).is_dir():
            run = read_run_dir(outcome.run_dir)
            run.state = "pruned" if outcome.state == "pruned" else run.state
            runs.append(run)
    metrics = [Metric(spec.metric, spec.goal)] if spec.metric else []
    return Selection(runs, metrics, f"sweep {store.id} ({spec.method}, local)")


def select(options) -> Selection:
    """The runs the command line names."""
    named = [bool(options.run_dirs), bool(options.sweep), bool(options.group), bool(options.project)]
    if sum(named) != 1:
        raise UserError("compare: name the runs one way: RUN_DIR ..., --sweep ID, --group G or --project P")
    if options.run_dirs:
        runs = []
        for path in options.run_dirs:
            found = (
                find_run_dirs(path)
                if Path(path).is_dir() and not list(Path(path).glob("run-*.wandb"))
                else [path]
            )
            if not found:
                raise UserError(f"compare: no W&B runs under {path}")
            runs += [read_run_dir(p) for p in found]
        return Selection(runs, [], "runs")
    if options.sweep:
        store = SweepStore(Path(options.sweeps_dir) / options.sweep)
        if store.exists():
            return local_sweep_runs(store)
        if not wandb_online():
            raise UserError(
                f"compare: no local sweep {options.sweep} under {options.sweeps_dir}, and W&B is offline"
            )
        return _online_sweep(options.sweep)
    if options.group:
        runs = _offline_runs(options.runs_dir, group=options.group)
        if not runs and wandb_online():
            runs = online_runs(group=options.group)
        return Selection(runs, [], f"group {options.group}")
    runs = (
        online_runs(project=options.project)
        if wandb_online()
        else _offline_runs(options.runs_dir, project=options.project)
    )
    return Selection(runs, [], f"project {options.project}")


def _online_sweep(sweep_id: str) -> Selection:
    runs, metric = online_sweep(sweep_id)
    metrics = [Metric(metric["name"], metric.get("goal", "minimize"))] if metric else []
    return Selection(runs, metrics, f"W&B sweep {sweep_id}")


def default_metrics(runs: list[Run]) -> list[Metric]:
    """Without a sweep's metric: val/score (polyhead's one number across tasks) and val/loss,
    whichever the runs logged."""
    logged = {key for run in runs for key in run.summary}
    return [m for m in (Metric("val/score", "maximize"), Metric("val/loss", "minimize")) if m.name in logged]


def best_run(rows: list[Row], metric: Metric) -> Run:
    """The best row's best run by the metric's final value."""
    candidates = [run for run in rows[0].runs if final_value(run, metric) is not None] if rows else []
    if not candidates:
        raise UserError(f"compare: no run logged {metric.name}")
    best = candidates[0]
    for run in candidates[1:]:
        if metric.better(final_value(run, metric), final_value(best, metric)):
            best = run
    return best


def checkpoint_of(run: Run, metric: Metric) -> str:
    path = run.checkpoint(metric.name)
    if path is None and "/" in run.path and not Path(run.path).exists():
        path = online_checkpoint(run)
    if path is None:
        raise UserError(
            f"compare: the best run ({run.name}, {run.path}) has no checkpoint on this machine "
            "(checkpointing off, files moved, or an online run without a logged model artifact)"
        )
    return str(path)


def best_checkpoint(
    reference: str, sweeps_dir: str = DEFAULT_SWEEPS_DIR, runs_dir: str = DEFAULT_RUNS_DIR
) -> str:
    """`--model.init_from best:REFERENCE` -> the checkpoint of the best run of a local sweep (its
    directory, or its id under `sweeps_dir`), else of a run group (offline under `runs_dir`, or
    online), else of a W&B sweep: judged by the sweep's metric, or by val/score / val/loss for a group."""
    store = SweepStore(Path(reference))
    if not store.exists():
        store = SweepStore(Path(sweeps_dir) / reference)
    if store.exists():
        selection = local_sweep_runs(store)
    else:
        runs = _offline_runs(runs_dir, group=reference)
        if runs:
            selection = Selection(runs, [], f"group {reference}")
        elif wandb_online():
            try:
                selection = _online_sweep(reference)
            except UserError:  # not a sweep of this entity and project: a run group, perhaps
                selection = Selection([], [], "")
            if not selection.runs:
                selection = Selection(online_runs(group=reference), [], f"group {reference}")
        else:
            raise UserError(
                f"best:{reference}: no local sweep under {sweeps_dir} and no run group under {runs_dir}"
            )
    metrics = selection.metrics or default_metrics(selection.runs)
    if not selection.runs or not metrics:
        raise UserError(f"best:{reference}: no runs with a metric to judge them by")
    rows, _ = build_rows(selection.runs, metrics[:1])
    return checkpoint_of(best_run(rows, metrics[0]), metrics[0])


def parser() -> CommandParser:
    compare = CommandParser(
        prog="polyhead compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    compare.add_argument(
        "run_dirs", nargs="*", metavar="RUN_DIR", help="run directories, or directories holding runs"
    )
    compare.add_argument("--sweep", help="a local sweep id (under --sweeps-dir), else a W&B sweep id")
    compare.add_argument(
        "--group", help="the runs of a W&B run group (a local sweep's runs share its id as group)"
    )
    compare.add_argument("--project", help="every run of a W&B project")
    compare.add_argument("--metric", action="append", default=[], metavar="NAME[:min|max]",
                         help="a metric column (repeat); default: the sweep's metric, else val/score and val/loss")  # fmt: skip
    compare.add_argument(
        "--sort", help="a metric (best first) or config key (ascending); default the first metric"
    )
    compare.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    compare.add_argument("--csv", metavar="FILE", help="also write the table as CSV, full precision")
    compare.add_argument(
        "--plots", metavar="DIR", help="write PNG learning curves and metric-vs-parameter plots"
    )
    compare.add_argument("--best", action="store_true", help="print only the best run's checkpoint path")
    compare.add_argument(
        "--runs-dir", default=DEFAULT_RUNS_DIR, help="where offline runs are searched (default runs)"
    )
    compare.add_argument(
        "--sweeps-dir", default=DEFAULT_SWEEPS_DIR, help="where local sweeps live (default runs/sweeps)"
    )
    return compare


def compare(argv: list[str]) -> list[Row]:
    """Run `polyhead compare ARGV`; -> the rows shown. User mistakes raise UserError."""
    options = parser().parse_args(argv)
    selection = select(options)
    if not selection.runs:
        raise UserError(f"compare: {selection.title} has no runs")
    metrics = (
        [Metric.parse(m) for m in options.metric] or selection.metrics or default_metrics(selection.runs)
    )
    rows, differing = build_rows(selection.runs, metrics)
    if options.best:
        if not metrics:
            raise UserError("compare --best: no metric to judge by; name one with --metric")
        print(checkpoint_of(best_run(rows, metrics[0]), metrics[0]))
        return rows
    if options.sort:
        by = next((m for m in metrics if m.name == options.sort), None)
        if by is None and options.sort not in differing:
            raise UserError(f"compare --sort {options.sort}: not a metric column ({', '.join(m.name for m in metrics)}) "
                            f"nor a config key that differs ({', '.join(differing) or 'none'})")  # fmt: skip
        rows = sort_rows(rows, by, None if by else options.sort)
    headers, cells = table_cells(rows, differing, metrics)
    title = f"{selection.title}: {len(selection.runs)} run(s), {len(rows)} configuration(s)"
    out = console()
    out.print(rich_table(title, headers, cells))
    notes = overlap_notes(rows, metrics)
    for note in notes:
        out.print(note)
    if options.markdown:
        with _writing("--markdown", options.markdown):
            write_text_atomically(
                options.markdown, markdown(headers, cells) + "".join(f"\n{n}\n" for n in notes)
            )
        out.print(f"wrote {options.markdown}")
    if options.csv:
        with _writing("--csv", options.csv):
            write_text_atomically(options.csv, csv_text(rows, differing, metrics))
        out.print(f"wrote {options.csv}")
    if options.plots:
        with _writing("--plots", options.plots):
            for path in write_plots(Path(options.plots), rows, differing, metrics):
                out.print(f"wrote {path}")
    return rows


@contextlib.contextmanager
def _writing(option: str, path: str):
    """An output the system refuses (no such directory, no permission, disk full) -> one line naming the option."""
    try:
        yield
    except OSError as error:
        raise UserError(
            f"compare {option} {path}: cannot write it ({error.strerror or error}); choose another path"
        ) from None
