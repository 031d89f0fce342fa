"""What a zero-shot evaluation learned, readable at a glance: a text summary and a PNG chart.

Both take the dict of `zero_shot.zero_shot_metrics` (metrics only: finding names, F1, AUROC, label
counts; never report text or study ids) and are shared by the trainer's final evaluation and
`python -m vljax.evaluate`. The baselines are the ones `zero_shot_metrics` computes (all-positive and
random macro F1) plus, per finding, the all-positive F1 2P / (2P + N) and AUROC chance (0.5).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping

AUROC_CHANCE = 0.5


def all_positive_f1(n_pos: int, n_neg: int) -> float:
    """F1 of predicting every labelled study positive: 2P / (2P + N) (0 without labelled studies)."""
    return 2 * n_pos / (2 * n_pos + n_neg) if n_pos + n_neg else 0.0


def _auroc_key(stats: Mapping) -> float:
    return stats["auroc"] if stats.get("auroc") is not None else -math.inf


def best_and_worst(zero_shot: Mapping, k: int = 5) -> tuple[list[str], list[str]]:
    """The `k` findings with the highest F1 and the `k` with the lowest (lowest first), among those
    scored (not in `excluded`). Ties in F1 go to AUROC (best: higher first; worst: lower first), then
    to the name. The two lists overlap when fewer than 2k findings are scored."""
    per, excluded = zero_shot["per_finding"], set(zero_shot.get("excluded", ()))
    scored = [f for f in per if f not in excluded]
    best = sorted(scored, key=lambda f: (-per[f]["f1"], -_auroc_key(per[f]), f))[:k]
    worst = sorted(scored, key=lambda f: (per[f]["f1"], _auroc_key(per[f]), f))[:k]
    return best, worst


def _fmt(x: float | None, width: int = 6) -> str:
    return f"{x:{width}.3f}" if x is not None else f"{'n/a':>{width}}"


def format_summary(zero_shot: Mapping, split: str, k: int = 5) -> str:
    """A few lines: macro F1 and AUROC beside the trivial baselines, then the best and worst `k`
    findings by F1 with their all-positive F1, AUROC and positives / labelled studies."""
    base = zero_shot["baselines"]
    per = zero_shot["per_finding"]
    excluded = list(zero_shot.get("excluded", ()))
    best, worst = best_and_worst(zero_shot, k)
    name_w = max([len(f) for f in best + worst] + [20])
    lines = [
        f"zero-shot on {split}: {zero_shot['n_findings']} findings scored"
        + (f", {len(excluded)} without both classes left out" if excluded else ""),
        f"  macro F1    {_fmt(zero_shot['macro_f1'])}   baselines: all-positive {_fmt(base['all_positive'], 0)}, "
        f"random {_fmt(base['random'], 0)}",
        f"  macro AUROC {_fmt(zero_shot['macro_auroc'])}   baseline: chance {AUROC_CHANCE:.3f}",
    ]
    header = f"{'F1':>6}  {'all-pos F1':>10}  {'AUROC':>6}  positives/labelled"
    for title, names in ((f"best {len(best)} by F1", best), (f"worst {len(worst)} by F1", worst)):
        lines.append(f"  {title:<{name_w + 4}}{header}")
        for f in names:
            s = per[f]
            lines.append(f"    {f:<{name_w + 2}}{_fmt(s['f1'])}  {_fmt(all_positive_f1(s['n_pos'], s['n_neg']), 10)}  "
                         f"{_fmt(s['auroc'])}  {s['n_pos']}/{s['n_pos'] + s['n_neg']}")
    return "\n".join(lines)


def chart_path(workdir: str | os.PathLike, split: str) -> pathlib.Path:
    return pathlib.Path(workdir) / f"zero_shot_{split}.png"


def plot_zero_shot(zero_shot: Mapping, path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Writes a PNG of per-finding F1 (left) and AUROC (right), sorted by F1 (best on top), against
    the per-finding all-positive F1 (markers), the macro baselines (lines) and AUROC chance; findings
    without both classes are listed at the bottom without bars. Returns `path`."""
    # Lazy: matplotlib is only needed at the end of a run. The Agg canvas renders without pyplot, so
    # no global backend is switched (safe inside notebooks and threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per = zero_shot["per_finding"]
    excluded = [f for f in per if f in set(zero_shot.get("excluded", ()))]
    scored, _ = best_and_worst(zero_shot, k=len(per))
    names = scored + excluded
    y_scored = list(range(len(scored)))
    labels = [f"{f}  ({per[f]['n_pos']}/{per[f]['n_pos'] + per[f]['n_neg']} pos)" for f in scored]
    labels += [f"{f}  ({per[f]['n_pos']}/{per[f]['n_pos'] + per[f]['n_neg']} pos, not scored)" for f in excluded]

    fig = Figure(figsize=(12, 1.8 + 0.3 * max(len(names), 4)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_f1, ax_auc = fig.subplots(1, 2, sharey=True, width_ratios=(1.2, 1))
    base = zero_shot["baselines"]

    f1 = [per[f]["f1"] for f in scored]
    ax_f1.barh(y_scored, f1, color="tab:blue", height=0.7, label="F1 (score > 0)")
    ax_f1.scatter([all_positive_f1(per[f]["n_pos"], per[f]["n_neg"]) for f in scored], y_scored,
                  marker="D", s=22, color="black", zorder=3, label="all-positive F1 (this finding)")
    for value, style, label in ((zero_shot["macro_f1"], "-", "macro F1"),
                                (base["all_positive"], "--", "macro all-positive"),
                                (base["random"], ":", "macro random")):
        if value is not None:
            ax_f1.axvline(value, color="tab:red" if style == "-" else "grey", ls=style, lw=1.3,
                          label=f"{label} {value:.3f}")
    ax_f1.set_xlim(0, 1)
    ax_f1.set_xlabel("F1")
    ax_f1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.045 * 34 / (len(names) + 4)), ncol=2, fontsize=8,
              frameon=False)

    auc = [per[f]["auroc"] if per[f]["auroc"] is not None else float("nan") for f in scored]
    ax_auc.barh(y_scored, auc, color="tab:orange", height=0.7, label="AUROC")
    ax_auc.axvline(AUROC_CHANCE, color="grey", ls="--", lw=1.3, label=f"chance {AUROC_CHANCE:.1f}")
    if zero_shot["macro_auroc"] is not None:
        ax_auc.axvline(zero_shot["macro_auroc"], color="tab:red", lw=1.3,
                       label=f"macro AUROC {zero_shot['macro_auroc']:.3f}")
    ax_auc.set_xlim(0, 1)
    ax_auc.set_xlabel("AUROC")
    ax_auc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.045 * 34 / (len(names) + 4)), ncol=2, fontsize=8,
              frameon=False)

    ax_f1.set_yticks(range(len(names)), labels, fontsize=9)
    ax_f1.set_ylim(len(names) - 0.5, -0.5)  # best on top
    for ax in (ax_f1, ax_auc):
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(title or "zero-shot per finding", fontsize=11)

    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path


def write_report(zero_shot: Mapping, split: str, workdir: str | os.PathLike, *, step: int,
                 log: Callable[[str], None] = print) -> pathlib.Path:
    """Logs the summary and writes `WORKDIR/zero_shot_<split>.png`; returns the chart's path."""
    log(format_summary(zero_shot, split))
    title = (f"zero-shot, {split} split, step {step}: macro F1 {_fmt(zero_shot['macro_f1'], 0)} "
             f"(all-positive {_fmt(zero_shot['baselines']['all_positive'], 0)}, random "
             f"{_fmt(zero_shot['baselines']['random'], 0)}), macro AUROC {_fmt(zero_shot['macro_auroc'], 0)}")
    path = plot_zero_shot(zero_shot, chart_path(workdir, split), title)
    log(f"zero-shot chart -> {path}")
    return path
