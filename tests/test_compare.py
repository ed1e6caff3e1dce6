"""`polyhead compare` on runs of several seeds: mean, standard deviation and 95% interval equal a
direct computation; overlapping intervals are noted; Markdown and CSV carry the same numbers."""

from __future__ import annotations

import csv
import math
import statistics

import pytest

from experiments.compare_table import (
    Metric,
    build_rows,
    csv_text,
    markdown,
    overlap_notes,
    sort_rows,
    table_cells,
)
from experiments.runs import Run
from experiments.seed_stats import aggregate, t_quantile

# Student's t, 97.5% quantile, from printed tables
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}

LOSSES = {  # learning rate -> final val/loss of seeds 0, 1, 2
    1e-3: [2.10, 2.30, 2.20],
    3e-3: [1.90, 2.05, 2.15],
    1e-2: [3.00, 3.10, 2.95],
}


def run(lr: float, seed: int, loss: float) -> Run:
    """A run as read back from W&B: config, summary, and a history where the loss fell to `loss`."""
    history = [
        {"trainer/global_step": 9, "val/loss": loss + 1.0},
        {"trainer/global_step": 19, "val/loss": loss},
    ]
    return Run(
        id=f"r{lr}-{seed}",
        name=f"lr {lr} seed {seed}",
        path=f"/runs/{lr}/{seed}",
        config={
            "seed_everything": seed,
            "model": {"optimizer": {"lr": lr, "warmup": 0.1}},
            "trainer": {"callbacks": [{"trial": seed}]},
        },  # fmt: skip
        summary={"val/loss": loss},
        history=history,
        state="finished",
    )


def test_t_quantile_matches_printed_tables():
    for df, value in T_975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def test_seeds_aggregate_to_mean_std_and_interval():
    runs = [run(lr, seed, loss) for lr, losses in LOSSES.items() for seed, loss in enumerate(losses)]
    metric = Metric.parse("val/loss")
    assert metric.goal == "minimize"
    rows, differing = build_rows(runs, [metric])
    assert differing == ["model.optimizer.lr"], "seeds and the trial-specific callbacks are not configuration"
    assert [row.config["model.optimizer.lr"] for row in rows] == [3e-3, 1e-3, 1e-2], "best mean first"
    for row in rows:
        losses = LOSSES[row.config["model.optimizer.lr"]]
        mean, std = sum(losses) / 3, math.sqrt(sum((x - sum(losses) / 3) ** 2 for x in losses) / 2)
        half = T_975[2] * std / math.sqrt(3)
        final = row.final["val/loss"]
        assert (final.n, final.mean, final.std) == (3, pytest.approx(mean), pytest.approx(std))
        assert (final.low, final.high) == (
            pytest.approx(mean - half, rel=1e-4),
            pytest.approx(mean + half, rel=1e-4),
        )
        assert row.best["val/loss"].mean == pytest.approx(mean), "the best of a falling curve is its end"
        assert sorted(r.config["seed_everything"] for r in row.runs) == [0, 1, 2]
    # the two close learning rates overlap; 1e-2 is clearly worse
    assert rows[0].overlaps == [rows[1]] and rows[1].overlaps == [rows[0]] and rows[2].overlaps == []
    assert overlap_notes(rows, [metric]) == [
        "note: the 95% intervals of val/loss (final) overlap for rows 1 and 2: those differences are within "
        "seed noise; more seeds would tell"
    ]


def test_overlaps_are_numbered_as_the_rows_are_shown_after_sorting():
    """--sort lr puts 1e-3 first, 3e-3 second and 1e-2 third: the overlapping pair is rows 1 and 2
    as printed, whatever their order by the metric was."""
    runs = [run(lr, seed, loss) for lr, losses in LOSSES.items() for seed, loss in enumerate(losses)]
    metric = Metric("val/loss", "minimize")
    rows, differing = build_rows(runs, [metric])
    by_lr = sort_rows(list(reversed(rows)), None, "model.optimizer.lr")
    assert [row.config["model.optimizer.lr"] for row in by_lr] == [1e-3, 3e-3, 1e-2]
    _, cells = table_cells(by_lr, differing, [metric])
    assert [line[-1] for line in cells] == ["2", "1", "-"]
    assert "overlap for rows 1 and 2:" in overlap_notes(by_lr, [metric])[0]


def test_exports_carry_the_same_numbers():
    runs = [run(lr, seed, loss) for lr, losses in LOSSES.items() for seed, loss in enumerate(losses)]
    metric = Metric("val/loss", "minimize")
    rows, differing = build_rows(runs, [metric])
    headers, cells = table_cells(rows, differing, [metric])
    table = markdown(headers, cells)
    assert table.splitlines()[0] == (
        "| # | model.optimizer.lr | runs | seeds | val/loss final | val/loss best | overlaps |"
    )
    best = aggregate(LOSSES[3e-3])
    assert f"| 1 | 0.003 | 3 | 0, 1, 2 | {best.text()} |" in table
    assert best.text() == f"{best.mean:.4g} ± {best.std:.2g} [{best.low:.4g}, {best.high:.4g}]"
    records = list(csv.DictReader(csv_text(rows, differing, [metric]).splitlines()))
    assert [float(r["model.optimizer.lr"]) for r in records] == [3e-3, 1e-3, 1e-2]
    for record in records:
        losses = LOSSES[float(record["model.optimizer.lr"])]
        assert float(record["val/loss final mean"]) == pytest.approx(statistics.fmean(losses), rel=1e-12)
        assert float(record["val/loss final std"]) == pytest.approx(statistics.stdev(losses), rel=1e-12)
        assert record["val/loss final n"] == "3"


def test_single_runs_show_their_value_without_an_interval():
    runs = [run(1e-3, 0, 2.5), run(3e-3, 0, 2.0)]
    rows, _ = build_rows(runs, [Metric("val/loss", "minimize")])
    assert [row.final["val/loss"].text() for row in rows] == ["2", "2.5"]
    assert all(row.final["val/loss"].std is None for row in rows)
    assert overlap_notes(rows, [Metric("val/loss", "minimize")]) == []


def test_runs_that_did_not_finish_show_their_state():
    stopped = run(1e-2, 1, 3.5)
    stopped.state = "pruned"
    runs = [run(1e-3, 0, 2.5), run(1e-2, 0, 3.0), stopped]
    rows, differing = build_rows(runs, [Metric("val/loss", "minimize")])
    headers, cells = table_cells(rows, differing, [Metric("val/loss", "minimize")])
    state = headers.index("state")
    assert [line[state] for line in cells] == ["finished", "1 finished, 1 pruned"]
