"""The table of `polyhead compare`: runs grouped into configurations (seeds aggregated, best
first) and that table as cells for the terminal, Markdown and CSV.

Apart from the command, which finds the runs: the rows depend only on `Run` objects, so the
grouping and every output format are tested on hand-made runs, without a W&B log on disk.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field

from rich.table import Table

from experiments.runs import Run, flatten
from experiments.seed_stats import Aggregate, aggregate
from experiments.sweep_spec import SEED_KEY, SEED_KEYS

# config keys that say where a run wrote, not what it trained (the sweep reporter's trial number
# sits in trainer.callbacks); `resolved` is derived from the rest
RUN_SPECIFIC = ("trainer.logger", "trainer.callbacks", "checkpoint.dirpath", "resolved.")
OBJECT_ADDRESS = re.compile(r" object at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Metric:
    name: str
    goal: str  # minimize | maximize

    @classmethod
    def parse(cls, text: str) -> Metric:
        """ "val/loss" (goal guessed from the name: losses and perplexity fall), "val/f1:max"."""
        name, _, goal = text.rpartition(":") if text.endswith((":min", ":max")) else (text, "", "")
        if goal:
            return cls(name, "minimize" if goal == "min" else "maximize")
        falls = re.search(r"loss|perplexity|error", name)
        return cls(name, "minimize" if falls else "maximize")

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b

    def best_of(self, values: list[float]) -> float:
        return min(values) if self.goal == "minimize" else max(values)


@dataclass
class Row:
    """One configuration: its runs (one per seed), and per metric the aggregate of their final
    and of their best values."""

    key: str
    config: dict
    runs: list[Run] = field(default_factory=list)
    final: dict[str, Aggregate] = field(default_factory=dict)
    best: dict[str, Aggregate] = field(default_factory=dict)
    overlaps: list[Row] = field(default_factory=list, compare=False, repr=False)
    """The rows whose 95% interval of the first metric overlaps this one's (numbered when shown,
    after any re-sorting)."""


def identity(run: Run) -> dict:
    """A run's flattened config without its seeds and run-specific keys: what makes it a
    configuration. An object logged by its repr loses its memory address, which differs in
    every process."""
    return {
        key: _stable(value)
        for key, value in flatten(run.config).items()
        if key not in SEED_KEYS and not key.startswith(RUN_SPECIFIC)
    }


def _stable(value):
    if isinstance(value, str):
        return OBJECT_ADDRESS.sub(" object", value)
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def final_value(run: Run, metric: Metric) -> float | None:
    value = run.summary.get(metric.name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def best_value(run: Run, metric: Metric) -> float | None:
    _, values = run.series(metric.name)
    return metric.best_of(values) if values else final_value(run, metric)


def build_rows(runs: list[Run], metrics: list[Metric]) -> tuple[list[Row], list[str]]:
    """-> the configurations, best first by the first metric, and the config keys that differ."""
    identities = [identity(run) for run in runs]
    # a key only some runs have was added (or dropped) by another version of the code: it cannot
    # tell those runs apart, so only keys every run has are compared
    shared = set.intersection(*(set(ident) for ident in identities)) if identities else set()
    differing = [k for k in sorted(shared) if len({repr(ident[k]) for ident in identities}) > 1]
    rows: dict[str, Row] = {}
    for run, ident in zip(runs, identities, strict=True):
        config = {k: ident.get(k) for k in differing}
        key = repr(sorted(config.items()))
        rows.setdefault(key, Row(key, config)).runs.append(run)
    for row in rows.values():
        for metric in metrics:
            finals = [v for run in row.runs if (v := final_value(run, metric)) is not None]
            bests = [v for run in row.runs if (v := best_value(run, metric)) is not None]
            if finals:
                row.final[metric.name] = aggregate(finals)
            if bests:
                row.best[metric.name] = aggregate(bests)
    ordered = sort_rows(list(rows.values()), metrics[0] if metrics else None)
    if metrics:
        first = metrics[0].name
        for row in ordered:
            row.overlaps = [
                other
                for other in ordered
                if other is not row
                and first in row.final
                and first in other.final
                and row.final[first].overlaps(other.final[first])
            ]
    return ordered, differing


def sort_rows(rows: list[Row], by: Metric | None, key: str | None = None) -> list[Row]:
    """Best first by a metric's final mean (rows without it last), or ascending by a config key."""
    if key is not None:
        return sorted(rows, key=lambda row: _order(row.config.get(key)))
    if by is None:
        return rows
    sign = 1 if by.goal == "minimize" else -1
    return sorted(
        rows,
        key=lambda row: (
            by.name not in row.final,
            sign * row.final[by.name].mean if by.name in row.final else 0,
        ),
    )


def _order(value) -> tuple:
    """Numbers by value, then everything else by its text, missing values last."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (value is None, not number, value if number else str(value))


def configuration_text(config: dict) -> str:
    """lr=0.001, warmup=0.1: the keys' last parts, or whole keys where two last parts clash."""
    last = [k.rsplit(".", 1)[-1] for k in config]
    names = [short if last.count(short) == 1 else key for key, short in zip(config, last, strict=True)]
    return ", ".join(
        f"{name}={_value_text(value)}" for name, value in zip(names, config.values(), strict=True)
    )


def seed_text(row: Row) -> str:
    seeds = [run.config.get(SEED_KEY) for run in row.runs]
    return ", ".join(str(s) for s in seeds)


def state_text(row: Row) -> str:
    """ "finished", or the count of each state ("2 finished, 1 pruned")."""
    counts = Counter(run.state for run in row.runs)
    return (
        next(iter(counts))
        if len(counts) == 1
        else ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    )


def table_cells(
    rows: list[Row], differing: list[str], metrics: list[Metric]
) -> tuple[list[str], list[list[str]]]:
    """The table as text cells, shared by the terminal and Markdown. A state column appears when
    some run did not finish normally (pruned, failed, still running)."""
    aggregated = any(len(row.runs) > 1 for row in rows)
    unfinished = any(run.state != "finished" for row in rows for run in row.runs)
    headers = ["#", *differing, "runs", "seeds", *(["state"] if unfinished else [])]
    for metric in metrics:
        headers += [f"{metric.name} final", f"{metric.name} best"]
    if aggregated and metrics:
        headers.append("overlaps")
    cells, number = [], _numbers(rows)
    for i, row in enumerate(rows, 1):
        line = [str(i), *(_value_text(row.config[k]) for k in differing), str(len(row.runs)), seed_text(row)]
        line += [state_text(row)] if unfinished else []
        for metric in metrics:
            line += [row.final[metric.name].text() if metric.name in row.final else "-",
                     row.best[metric.name].text() if metric.name in row.best else "-"]  # fmt: skip
        if aggregated and metrics:
            line.append(", ".join(str(n) for n in sorted(number[id(o)] for o in row.overlaps)) or "-")
        cells.append(line)
    return headers, cells


def _value_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _numbers(rows: list[Row]) -> dict[int, int]:
    """Each row's number in the table as shown (1-based), by identity."""
    return {id(row): i for i, row in enumerate(rows, 1)}


def overlap_notes(rows: list[Row], metrics: list[Metric]) -> list[str]:
    if not metrics or not any(len(row.runs) > 1 for row in rows):
        return []
    number = _numbers(rows)
    pairs = sorted({tuple(sorted((number[id(row)], number[id(o)]))) for row in rows for o in row.overlaps})
    if not pairs:
        return [f"note: no two rows' 95% intervals of {metrics[0].name} (final) overlap"]
    listed = ", ".join(f"{a} and {b}" for a, b in pairs)
    return [f"note: the 95% intervals of {metrics[0].name} (final) overlap for rows {listed}: "
            "those differences are within seed noise; more seeds would tell"]  # fmt: skip


def markdown(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row], differing: list[str], metrics: list[Metric]) -> str:
    """Full-precision numbers: per metric and kind (final, best) mean, std, 95% interval, n."""
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["row", *differing, "runs", "run_ids", "seeds"]
    for metric in metrics:
        for kind in ("final", "best"):
            header += [f"{metric.name} {kind} {part}" for part in ("mean", "std", "ci_low", "ci_high", "n")]
    writer.writerow(header)
    for i, row in enumerate(rows, 1):
        line = [
            i,
            *(row.config[k] for k in differing),
            len(row.runs),
            " ".join(r.id for r in row.runs),
            seed_text(row),
        ]
        for metric in metrics:
            for values in (row.final, row.best):
                agg = values.get(metric.name)
                line += (
                    [None, None, None, None, 0]
                    if agg is None
                    else [agg.mean, agg.std, agg.low, agg.high, agg.n]
                )
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in line])
    return out.getvalue()


def rich_table(title: str, headers: list[str], cells: list[list[str]]) -> Table:
    table = Table(title=title)
    for header in headers:
        table.add_column(header, overflow="fold")
    for line in cells:
        table.add_row(*line)
    return table
