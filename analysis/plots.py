"""PNG plots of the report: overlap heatmaps and ΔPPL against k (or targets vs controls).

matplotlib's object API (``Figure``) is used without pyplot: no global figure state, no GUI
backend, nothing left open between plots.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["slug", "plot_heatmaps", "plot_delta_vs_k", "plot_targets_vs_controls", "plot_truth_scatter"]

_STAT_LABELS = {"jaccard": "Jaccard", "overlap_coefficient": "overlap coefficient",
                "spearman": "Spearman ρ", "kendall": "Kendall τ-b"}
_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def slug(*parts: object) -> str:
    """A file-name-safe, collision-resistant name built from ``parts``."""
    text = "_".join(str(p) for p in parts)
    short = re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[:80]
    # Different models can shorten to the same text (long paths); the hash keeps them apart.
    return f"{short}_{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def plot_heatmaps(grid: dict[str, dict[str, pd.DataFrame]], title: str, path: Path) -> Path:
    """A grid of square matrices: one row per granularity, one column per statistic.

    Every cell has its value written in, so no colour bars are drawn (they cost more to
    render than the matrices). Colours: 0..1 for Jaccard and overlap, -1..1 for the
    rank correlations.
    """
    rows = list(grid)
    stats = list(next(iter(grid.values())))
    n = len(next(iter(grid[rows[0]].values())))
    cell = max(2.4, 0.55 * n + 1.0)
    longest = max(len(str(x)) for x in grid[rows[0]][stats[0]].columns)
    # Room for the rotated tick labels (about 0.07 in per character at 7 pt), set by hand:
    # bbox_inches="tight" would draw every figure twice.
    label_in = 0.07 * longest * 0.65 + 0.2
    width = cell * len(stats) + label_in + 0.4
    height = cell * len(rows) + label_in + 0.8
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(len(rows), len(stats), squeeze=False)
    fig.subplots_adjust(left=(label_in + 0.1) / width, right=1 - 0.1 / width,
                        bottom=label_in / height, top=1 - 0.75 / height, wspace=0.12, hspace=0.3)
    for r, by in enumerate(rows):
        for c, stat in enumerate(stats):
            ax = axes[r][c]
            mat = grid[by][stat]
            lo = -1.0 if stat in ("spearman", "kendall") else 0.0
            ax.imshow(mat.to_numpy(dtype=float), vmin=lo, vmax=1.0, cmap="viridis")
            labels = [str(x) for x in mat.columns]
            ax.set_xticks(range(n), labels if r == len(rows) - 1 else [], rotation=40, ha="right",
                          fontsize=7)
            # Row labels only in the first column: the matrices share them.
            ax.set_yticks(range(n), labels if c == 0 else [], fontsize=7)
            ax.set_title(f"{_STAT_LABELS.get(stat, stat)} · by {by}", fontsize=8)
            for i in range(n):
                for j in range(n):
                    v = mat.iat[i, j]
                    dark = math.isfinite(v) and (v - lo) / (1.0 - lo) < 0.5  # viridis is dark below mid
                    ax.text(j, i, f"{v:.2f}" if math.isfinite(v) else "n/a", ha="center",
                            va="center", fontsize=7, color="white" if dark else "black")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _scale(ax: Axes, values: Sequence[float]) -> None:
    """symlog when the finite values span many orders of magnitude (a bit flip's ΔPPL)."""
    mags = np.abs(np.asarray([v for v in values if math.isfinite(v)], dtype=float))
    nz = mags[mags > 0]
    if nz.size and nz.max() > 1e3 * np.median(nz):
        ax.set_yscale("symlog", linthresh=float(np.median(nz)))


def _mark_nonfinite(ax: Axes, xs: Sequence[float], shown: Sequence[float]) -> None:
    """Targets whose ΔPPL is not finite (the loss overflowed: the model is destroyed) are the
    strongest result, so they are drawn as triangles above everything else, not dropped."""
    if not xs:
        return
    fin = [v for v in shown if math.isfinite(v)] or [0.0]
    top = max(fin) + 0.1 * (max(fin) - min(fin) or 1.0)
    ax.plot(xs, [top] * len(xs), "^", color=_COLORS[0], ms=9,
            label="target ΔPPL not finite")
    ax.set_ylim(None, top + 0.15 * (max(fin) - min(fin) or 1.0))
    for x in xs:
        ax.annotate("∞", (x, top), textcoords="offset points", xytext=(0, 7), ha="center",
                    color=_COLORS[0])


def plot_delta_vs_k(ks: Sequence[float], target: dict[float, list[float]],
                    controls: dict[str, dict[float, list[float]]], title: str, path: Path) -> Path:
    """ΔPPL of the targets against k (each seed a dot, the mean a line) with one band per
    control: 5 %–95 % quantiles of its draws at each k, and its median as a dashed line."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    shown: list[float] = []
    dropped = 0
    for ci, (name, by_k) in enumerate(sorted(controls.items())):
        xs, lo, med, hi = [], [], [], []
        for k in ks:
            vals = np.array([v for v in by_k.get(k, []) if math.isfinite(v)], dtype=float)
            dropped += len(by_k.get(k, [])) - vals.size
            if vals.size:
                q = np.quantile(vals, [0.05, 0.5, 0.95])
                xs.append(k), lo.append(q[0]), med.append(q[1]), hi.append(q[2])
                shown += list(q)
        color = _COLORS[(ci + 1) % len(_COLORS)]
        if xs:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{name} 5–95 %")
            ax.plot(xs, med, "--", color=color, lw=1, label=f"{name} median")
    means_x, means, inf_x = [], [], []
    for k in ks:
        vals = [v for v in target.get(k, []) if math.isfinite(v)]
        inf_x += [k] * (len(target.get(k, [])) - len(vals))
        ax.plot([k] * len(vals), vals, "o", color=_COLORS[0], ms=4, alpha=0.7)
        if vals:
            means_x.append(k), means.append(float(np.mean(vals)))
            shown += vals
    ax.plot(means_x, means, "-", color=_COLORS[0], lw=2, label="targets (mean over seeds)")
    _mark_nonfinite(ax, inf_x, shown)
    if len(ks) > 1 and min(ks) > 0:  # dose-response: k on a log axis, a tick at every k
        ax.set_xscale("log")
        ax.set_xticks(list(ks), [f"{k:g}" for k in ks])
        ax.minorticks_off()
    _scale(ax, shown)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("k (top-k weights perturbed)")
    ax.set_ylabel("ΔPPL")
    ax.set_title(title + (f"\n({dropped} non-finite control values not shown)" if dropped else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_targets_vs_controls(target: list[float], controls: dict[str, list[float]], title: str,
                             path: Path) -> Path:
    """Strip plot at a single k: the target ΔPPL (one dot per seed) beside each control's draws."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    groups = [("targets", target)] + sorted(controls.items())
    rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
    shown: list[float] = []
    dropped = 0
    n_inf_target = 0
    for i, (name, vals) in enumerate(groups):
        fin = np.array([v for v in vals if math.isfinite(v)], dtype=float)
        if i == 0:
            n_inf_target = len(vals) - fin.size
        else:
            dropped += len(vals) - fin.size
        x = i + rng.uniform(-0.12, 0.12, fin.size)
        ax.plot(x, fin, "o", color=_COLORS[i % len(_COLORS)], ms=6 if i == 0 else 4,
                alpha=0.9 if i == 0 else 0.6)
        if fin.size:
            ax.hlines(float(np.median(fin)), i - 0.25, i + 0.25, color="black", lw=1)
        shown += fin.tolist()
    _mark_nonfinite(ax, [0.0] * n_inf_target, shown)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    _scale(ax, shown)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("ΔPPL")
    ax.set_title(title + (f"\n({dropped} non-finite control values not shown)" if dropped else ""),
                 fontsize=10)
    return _save(fig, path)


def plot_truth_scatter(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str,
                       path: Path) -> tuple[Path, dict[str, int]]:
    """One log-log panel per metric: its score (x) against the true ΔNLL (y) of each candidate.

    Points whose score or ΔNLL is not a positive finite number cannot be drawn on log axes; their
    count per metric is returned (and written in each panel's title)."""
    names = list(series)
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    hidden: dict[str, int] = {}
    for n, name in enumerate(names):
        ax = axes[n // cols][n % cols]
        x, y = (np.asarray(v, dtype=float) for v in series[name])
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        hidden[name] = int((~ok).sum())
        ax.plot(x[ok], y[ok], "o", ms=4, alpha=0.7, color=_COLORS[n % len(_COLORS)])
        if ok.any():
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"{name} score", fontsize=8)
        ax.set_ylabel("true ΔNLL", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(name + (f" ({hidden[name]} not drawn)" if hidden[name] else ""), fontsize=9)
    for n in range(len(names), rows * cols):
        axes[n // cols][n % cols].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.85, wspace=0.4, hspace=0.55)
    return _save(fig, path), hidden
