"""PNG charts, one function per kind, drawn with matplotlib's file backend (no display needed):
`line_chart` (curves over steps: learning curves, benchmark sweeps), `point_chart` (a
measurement against a setting, one point per run, with the mean and 95% interval where a setting
has several), `bar_chart` (a measurement per category, a bar per series side by side, in one or
more panels, with reference levels as lines: benchmark results against a baseline),
`heatmap_grid` (matrices with labelled rows and columns: attention maps) and `scatter_map` (2-D
points coloured by group: projected embeddings). Each takes plain lists or arrays and a path and
returns the path; callers decide what to plot.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

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
    log_axes: bool = False,
) -> Path:
    """lines: label -> (xs, ys), one line each, legend outside the axes when there are many.
    log_axes: both axes logarithmic (base 2 along x), for quantities measured at doubling sizes."""
    figure, axes = plt.subplots(figsize=SIZE)
    for label, (xs, ys) in lines.items():
        axes.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1.2, label=label)
    if log_axes:
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
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


BAR_PANEL_INCHES = 5.0  # one panel of a bar chart; the legend beside the last gets LEGEND_INCHES
LEGEND_INCHES = 2.0
BAR_GROUP_WIDTH = 0.8  # of a category's slot, shared by its bars
BAR_AXES_INCHES = 0.85 * BAR_PANEL_INCHES  # the rest of a panel is its margins and labels
BAR_TICK_FONT = 8
BAR_TITLE_FONT = 11
REFERENCE_STYLES = ("--", ":", "-.")


@dataclass(frozen=True)
class BarPanel:
    """One panel of `bar_chart`. series: label -> one value per category (NaN: no bar), drawn side
    by side in each category; references: label -> a level drawn as a black line across the panel
    (a baseline every bar is read against)."""

    title: str
    categories: Sequence[str]
    series: dict[str, Sequence[float]]
    references: dict[str, float] = field(default_factory=dict)


def _wrapped(text: str, characters: int) -> str:
    """text broken at spaces into lines of at most `characters` (more when one word is longer), so
    that neighbouring category names do not run into each other and a long title stays over its
    panel; its own line breaks stay."""
    return "\n".join(part for line in text.split("\n") for part in textwrap.wrap(line, characters) or [""])


def _characters_fitting(inches: float, fontsize: float) -> int:
    """How many characters of text at `fontsize` fit across `inches` (one is about 0.6 of the
    font size wide), at least 6 so that no word is cut too small."""
    return max(6, int(inches * 72 / (0.6 * fontsize)))


def _bar_panel(axes, panel: BarPanel, colours: dict[str, str], styles: dict[str, str]) -> None:
    """Draw one panel, its series centred on each category's tick."""
    width = BAR_GROUP_WIDTH / max(len(panel.series), 1)
    for k, (label, values) in enumerate(panel.series.items()):
        offset = (k - (len(panel.series) - 1) / 2) * width
        axes.bar([i + offset for i in range(len(values))], values, width, label=label, color=colours[label])
    for label, level in panel.references.items():
        axes.axhline(level, color="black", linestyle=styles[label], label=label)
    slot = _characters_fitting(BAR_AXES_INCHES / max(len(panel.categories), 1), BAR_TICK_FONT)
    names = [_wrapped(category, slot) for category in panel.categories]
    axes.set_xticks(range(len(names)), names, fontsize=BAR_TICK_FONT)
    axes.set_title(
        _wrapped(panel.title, _characters_fitting(BAR_AXES_INCHES, BAR_TITLE_FONT)), fontsize=BAR_TITLE_FONT
    )
    axes.grid(axis="y", alpha=0.3)


def bar_chart(
    path: str | Path, panels: Sequence[BarPanel], ylabel: str, ylim: tuple[float, float] | None = None
) -> Path:
    """panels side by side, each a group of bars per category; ylabel on the first, ylim (low,
    high) on all when given. A series or reference keeps its colour or line style across panels,
    so one legend, beside the last panel, names them all."""
    series = list(dict.fromkeys(label for panel in panels for label in panel.series))
    references = list(dict.fromkeys(label for panel in panels for label in panel.references))
    colours = {label: f"C{k}" for k, label in enumerate(series)}
    styles = {label: REFERENCE_STYLES[k % len(REFERENCE_STYLES)] for k, label in enumerate(references)}
    figure, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * BAR_PANEL_INCHES + LEGEND_INCHES, SIZE[1]), squeeze=False
    )
    for axis, panel in zip(axes[0], panels, strict=True):
        _bar_panel(axis, panel, colours, styles)
        if ylim is not None:
            axis.set_ylim(*ylim)
    axes[0][0].set_ylabel(ylabel)
    handles = {}  # label -> the first of its handles
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        labels = series + references  # bars first, then lines
        axes[0][-1].legend([handles[label] for label in labels], labels, fontsize=7, loc="upper left",
                           bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    return _save(figure, path)


PANEL_INCHES = 2.5  # one heatmap of a grid: 300 px at DPI
SINGLE_PANEL_INCHES = 6.0  # a heatmap alone, large enough to read every token
TITLE_INCHES = 0.5
MAX_TICKS = 48  # more tokens than this: label every n-th
SCATTER_SIZE = (7.5, 6.0)
_TAB20 = plt.get_cmap("tab20").colors  # a dark and a light shade of ten hues; 14 and 15 are greys
GROUP_COLOURS = [_TAB20[i] for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (14, 15)]
"""The colours of a scatter map's groups, dark shades first; grey is left for "other"."""
MAX_LEGEND = len(GROUP_COLOURS)  # groups that get a colour of their own in a scatter map


@dataclass(frozen=True)
class Heatmap:
    """One panel of `heatmap_grid`: values (R, C) with a label per row and per column."""

    title: str
    values: np.ndarray
    row_labels: Sequence[str]
    column_labels: Sequence[str]


def heatmap_grid_inches(rows: int, columns: int) -> tuple[float, float]:
    """The figure size of a grid of rows x columns panels (a lone panel is drawn larger)."""
    side = SINGLE_PANEL_INCHES if rows == columns == 1 else PANEL_INCHES
    return columns * side, rows * side + TITLE_INCHES


def _token_ticks(axis, labels: Sequence[str], side_points: float, rotate: bool) -> None:
    """Label every token (every n-th beyond MAX_TICKS) with a font that fits the panel."""
    step = math.ceil(len(labels) / MAX_TICKS)
    where = list(range(0, len(labels), step))
    size = max(2.5, min(8.0, 0.8 * side_points * step / max(len(labels), 1)))
    ticks = axis.set_xticks if rotate else axis.set_yticks
    ticks(where, [labels[i] for i in where], fontsize=size, rotation=90 if rotate else 0)


def heatmap_grid(path: str | Path, panels: Sequence[Sequence[Heatmap]], title: str) -> Path:
    """panels: rows of equally many heatmaps that share their row and column labels, drawn on the
    first panel of each row (tick labels are most of the drawing time). Each panel is coloured from
    0 to its own largest value, named in its title, so a head that spreads its attention thinly
    still shows its shape."""
    rows, columns = len(panels), len(panels[0])
    figure, axes = plt.subplots(rows, columns, figsize=heatmap_grid_inches(rows, columns), squeeze=False)
    side_points = 72 * (SINGLE_PANEL_INCHES if rows == columns == 1 else PANEL_INCHES)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            axis = axes[r][c]
            top = float(panel.values.max())
            axis.imshow(panel.values, cmap="viridis", vmin=0.0, vmax=top or 1.0, aspect="auto",
                        interpolation="nearest")  # fmt: skip
            axis.set_title(f"{panel.title} (max {top:.2f})", fontsize=7)
            if c == 0:
                _token_ticks(axis, panel.column_labels, side_points, rotate=True)
                _token_ticks(axis, panel.row_labels, side_points, rotate=False)
            else:
                axis.set_xticks([])
                axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def scatter_map(
    path: str | Path,
    points: np.ndarray,
    groups: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    marked: dict[int, str] | None = None,
) -> Path:
    """points: (N, 2), one colour per distinct group, with a legend. Beyond MAX_LEGEND groups the
    MAX_LEGEND largest keep their colours and the rest are drawn grey as one "other", as more
    colours than that cannot be told apart. marked: point index -> a short name written beside it
    (the queries of a neighbour table)."""
    figure, axes = plt.subplots(figsize=SCATTER_SIZE)
    sizes = Counter(groups)
    named = sorted(sizes, key=lambda name: -sizes[name])[:MAX_LEGEND]  # stable: ties keep first-seen order
    group = np.array(groups)
    rest = ~np.isin(group, named)
    if rest.any():
        axes.scatter(points[rest, 0], points[rest, 1], s=10, alpha=0.5, color="0.75",
                     label=f"other ({len(sizes) - len(named)} groups)")  # fmt: skip
    for i, name in enumerate(named):
        mine = group == name
        axes.scatter(
            points[mine, 0], points[mine, 1], s=14, alpha=0.8, color=GROUP_COLOURS[i], label=name[:40]
        )
    for index, text in (marked or {}).items():
        axes.scatter(*points[index], s=60, facecolors="none", edgecolors="black", linewidths=1.2)
        axes.annotate(text, points[index], xytext=(4, 4), textcoords="offset points", fontsize=8)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    if len(sizes) > 1:
        axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.5)
    return _save(figure, path)
