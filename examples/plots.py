"""The figures both studies draw (examples/study.py, examples/finetune_study.py): accuracy against
sparsity, one panel per dataset, and a forest plot of paired differences. The studies choose what
to plot and how each series looks; the layout, the error bars and the file format are here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure


@dataclass(frozen=True)
class Series:
    """One method's points on a panel: x (its sparsity, offset so that bars do not overlap), the
    stored mean summary (mean, ci95) of each point, and `Axes.errorbar`'s style keywords."""

    xs: tuple[float, ...]
    stats: tuple[dict, ...]
    style: dict


@dataclass(frozen=True)
class Panel:
    """One dataset: its N:M cells (labels and sparsities, the x ticks), the dense net's mean
    summary (a dashed line; None: none), and the series drawn on it."""

    nms: tuple[str, ...]
    rates: tuple[float, ...]
    dense: dict | None
    series: tuple[Series, ...]


def save(fig: Figure, path: Path) -> None:
    """Every figure of the studies at the same resolution and margins."""
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)


def plot_accuracy(panels: dict[str, Panel], path: Path, panel_size: tuple[float, float], title: str) -> None:
    """Deployed test accuracy (%) against sparsity, one panel per dataset: each series' means with
    their 95 % t intervals as error bars (none where a single seed gives no interval)."""
    fig = Figure(figsize=(panel_size[0] * len(panels), panel_size[1]), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ds, panel) in zip(axes, panels.items()):
        for s in panel.series:
            ys = [100 * d["mean"] for d in s.stats]
            err = [[100 * (d["mean"] - d["ci95"][0]) for d in s.stats],
                   [100 * (d["ci95"][1] - d["mean"]) for d in s.stats]]
            err = [[0 if math.isnan(v) else v for v in e] for e in err]
            ax.errorbar(s.xs, ys, yerr=err, **s.style)
        if panel.dense:
            ax.axhline(100 * panel.dense["mean"], color="k", ls="--", lw=1, label="dense")
        ax.set_xticks(panel.rates, [f"{nm}\n({r:.1%})" for nm, r in zip(panel.nms, panel.rates)])
        ax.set(title=ds, xlabel="N:M (sparsity)", ylabel="deployed test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def plot_forest(rows: list[tuple[str, dict, str]], path: Path, xlabel: str, row_height: float) -> None:
    """Paired differences in points, one row each (label, stored difference summary, colour): the
    95 % t interval as a line, the mean as a dot, filled when the interval excludes 0."""
    fig = Figure(figsize=(6.5, row_height * len(rows) + 0.9), layout="constrained")
    ax = fig.subplots()
    draw_forest(ax, rows)
    ax.set_xlabel(xlabel)
    save(fig, path)


def draw_forest(ax, rows: list[tuple[str, dict, str]]) -> None:
    """`plot_forest`'s rows on one matplotlib axis (for figures with several panels)."""
    for i, (_, d, color) in enumerate(rows):
        ax.plot([100 * d["ci95"][0], 100 * d["ci95"][1]], [i, i], color=color, lw=2)
        ax.plot(100 * d["mean"], i, "o", color=color, mfc=color if d["significant"] else "white")
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
