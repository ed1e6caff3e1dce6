"""PNG charts, one function per kind, drawn with matplotlib's file backend (no display needed):
`line_chart` (curves over steps: learning curves, benchmark sweeps) and `point_chart` (a
measurement against a setting, one point per run, with the mean and 95% interval where a setting
has several). Each takes plain lists and a path and returns the path; callers decide what to plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

SIZE = (7.0, 4.2)
DPI = 120


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _numeric(values: Sequence) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def line_chart(
    path: str | Path,
    lines: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """lines: label -> (xs, ys), one line each, legend outside the axes when there are many."""
    figure, axes = plt.subplots(figsize=SIZE)
    for label, (xs, ys) in lines.items():
        axes.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1.2, label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    if lines:
        axes.legend(fontsize=7, loc="best" if len(lines) <= 6 else "upper left",
                    bbox_to_anchor=None if len(lines) <= 6 else (1.01, 1.0))  # fmt: skip
    return _save(figure, path)


def point_chart(
    path: str | Path,
    xs: Sequence,
    ys: Sequence[float],
    title: str,
    xlabel: str,
    ylabel: str,
    intervals: Sequence[tuple] = (),
) -> Path:
    """One point per run at its setting x. intervals: (x, mean, low, high) each, drawn as a bar
    with a cap. Positive numeric settings spanning a decade or more get a log axis; other settings (names,
    lists) are categories in first-seen order."""
    figure, axes = plt.subplots(figsize=SIZE)
    numeric = _numeric(xs)
    categories = list(dict.fromkeys(str(x) for x in xs))
    where = (lambda x: x) if numeric else (lambda x: categories.index(str(x)))
    axes.scatter([where(x) for x in xs], ys, s=18, alpha=0.7, label="runs")
    for x, mean, low, high in intervals:
        axes.errorbar([where(x)], [mean], yerr=[[mean - low], [high - mean]], fmt="D", color="black",
                      capsize=4, markersize=4)  # fmt: skip
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
        axes.set_xscale("log")
    if not numeric:
        axes.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return _save(figure, path)
