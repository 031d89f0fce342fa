"""The sweep report's PNG plots (`vljax.sweep.report`), drawn from its `Analysis` on matplotlib's Agg
canvas without pyplot (no global backend is switched):

  macro_f1.png            macro F1 per setting: the seeds, the mean and its 95 % interval
  per_finding_f1.png      per-finding F1 per setting with 95 % t-interval error bars
  data_scaling.png        macro F1 against data.train_fraction with a 95 % band, per data-scaling curve

Intervals are t-intervals over seeds, or for a single run its bootstrap interval over studies.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING

import numpy as np

from vljax.data.findings import FINDINGS

if TYPE_CHECKING:
    from vljax.sweep.report import Analysis


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy; no global backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path


def _interval(a: Analysis, s: str, metric: str) -> tuple[float, float]:
    summ = a.summaries[s].get(metric)
    if summ is not None and summ.n >= 2:
        return summ.ci_low, summ.ci_high
    ci = a.bootstrap.get(s, {}).get(metric)
    return (ci.ci_low, ci.ci_high) if ci is not None else (math.nan, math.nan)


def plot_macro_f1(a: Analysis, path: pathlib.Path) -> pathlib.Path:
    settings = [s for s in a.sweep.settings if "macro_f1" in a.values[s]]
    fig = _figure(max(6, 1.1 * len(settings) + 2), 4.5)
    ax = fig.subplots()
    for i, s in enumerate(settings):
        v = 100 * np.array(list(a.values[s]["macro_f1"].values()))
        lo, hi = _interval(a, s, "macro_f1")
        mean = 100 * a.summaries[s]["macro_f1"].mean
        ax.scatter(np.full(v.size, i) + 0.12, v, s=14, color="grey", zorder=3)
        if not math.isnan(lo):
            ax.errorbar(i, mean, yerr=[[mean - 100 * lo], [100 * hi - mean]], fmt="o", color="tab:blue", capsize=4)
        else:
            ax.plot(i, mean, "o", color="tab:blue")
    ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
    ax.set_ylabel("macro F1 (%)")
    ax.set_title("macro F1: seeds (grey), mean and 95 % interval (t over seeds; bootstrap for one run)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_per_finding(a: Analysis, path: pathlib.Path) -> pathlib.Path:
    settings = [s for s in a.sweep.settings if s not in a.sweep.one_factor_grids] or a.sweep.settings
    fig = _figure(10, 2 + 0.42 * len(FINDINGS))
    ax = fig.subplots()
    step = 0.8 / max(len(settings), 1)
    for j, s in enumerate(settings):
        y, x, err = [], [], [[], []]
        for i, f in enumerate(FINDINGS):
            summ = a.summaries[s].get(f"f1/{f}")
            if summ is None:
                continue
            y.append(i - 0.4 + step * (j + 0.5))
            x.append(100 * summ.mean)
            half = 100 * (summ.mean - summ.ci_low) if summ.n >= 2 else 0.0
            err[0].append(half)
            err[1].append(half)
        ax.errorbar(x, y, xerr=err, fmt="o", ms=3.5, capsize=2, lw=1, label=s)
    ax.set_yticks(range(len(FINDINGS)), FINDINGS, fontsize=8)
    ax.set_ylim(len(FINDINGS) - 0.5, -0.5)
    ax.set_xlabel("F1 (%)")
    ax.set_title("per-finding F1: mean over seeds with 95 % t-interval", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_data_scaling(a: Analysis, path: pathlib.Path) -> pathlib.Path:
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for curve in a.scaling:
        xs = [100 * f for f, _ in curve]
        members = [s for _, s in curve]
        mean = [100 * a.summaries[s]["macro_f1"].mean if "macro_f1" in a.summaries[s] else math.nan for s in members]
        band = [_interval(a, s, "macro_f1") for s in members]
        line, = ax.plot(xs, mean, "o-", label=" / ".join(members))
        ax.fill_between(xs, [100 * lo for lo, _ in band], [100 * hi for _, hi in band], color=line.get_color(),
                        alpha=0.2, lw=0)
        for x, s in zip(xs, members):
            v = list(a.values[s].get("macro_f1", {}).values())
            ax.scatter([x] * len(v), [100 * t for t in v], s=10, color=line.get_color(), alpha=0.6)
    ax.set_xlabel("training data (% of the training split)")
    ax.set_ylabel("macro F1 (%)")
    ax.set_title("data scaling: mean, seeds and 95 % band", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
