"""The zero-shot summary and chart (`vljax/evals/report.py`) on a constructed zero-shot result: the best
and worst findings against a ranking done here, the baselines printed, and a valid PNG written."""

from __future__ import annotations

import numpy as np
import pytest

from vljax.data.findings import FINDINGS
from vljax.evals import report
from vljax.evals.zero_shot import binary_f1, zero_shot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_zero_shot() -> dict:
    """30 findings with distinct F1/AUROC, two F1 ties (told apart by AUROC) and two findings without
    both classes (excluded, one of them with the highest F1 of all: it must not be listed)."""
    rng = np.random.default_rng(5)
    f1 = rng.permutation(np.linspace(0.05, 0.9, len(FINDINGS))).round(4)
    auc = rng.uniform(0.3, 0.95, len(FINDINGS)).round(4)
    f1[3] = f1[7] = 0.95       # tie at the top: AUROC decides
    auc[3], auc[7] = 0.61, 0.83
    f1[11] = f1[12] = 0.0      # tie at the bottom
    auc[11], auc[12] = 0.52, 0.41
    per = {name: {"f1": float(f1[i]), "auroc": float(auc[i]), "n_pos": 10 + i, "n_neg": 100 - i,
                  "precision": 0.5, "recall": 0.5} for i, name in enumerate(FINDINGS)}
    excluded = [FINDINGS[20], FINDINGS[21]]
    per[excluded[0]].update(f1=1.0, auroc=None, n_neg=0)
    per[excluded[1]].update(f1=0.0, auroc=None, n_pos=0)
    scored = [f for f in FINDINGS if f not in excluded]
    return {"macro_f1": float(np.mean([per[f]["f1"] for f in scored])),
            "macro_auroc": float(np.mean([per[f]["auroc"] for f in scored])),
            "n_findings": len(scored), "excluded": excluded, "per_finding": per,
            "baselines": {"all_positive": 0.3141, "random": 0.2718}}


def _listed(summary: str, heading: str) -> list[str]:
    """Finding names of the rows under the line that starts with `heading`."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(heading))
    names = []
    for line in lines[start + 1:]:
        name = next((f for f in FINDINGS if line.strip().startswith(f + " ")), None)
        if name is None:
            break
        names.append(name)
    return names


def test_summary_lists_the_five_best_and_worst_findings():
    zs = fake_zero_shot()
    per = zs["per_finding"]
    scored = [f for f in per if f not in zs["excluded"]]
    by_f1 = sorted(scored, key=lambda f: (per[f]["f1"], per[f]["auroc"]))  # no full ties in the fake
    want_best, want_worst = by_f1[::-1][:5], by_f1[:5]
    assert want_best[:2] == [FINDINGS[7], FINDINGS[3]] and want_worst[:2] == [FINDINGS[12], FINDINGS[11]]

    assert report.best_and_worst(zs) == (want_best, want_worst)
    summary = report.format_summary(zs, "test")
    assert _listed(summary, "best 5 by F1") == want_best
    assert _listed(summary, "worst 5 by F1") == want_worst
    for f in want_best + want_worst:  # each row: F1, all-positive F1, AUROC, positives/labelled
        s = per[f]
        row = next(line for line in summary.splitlines() if line.strip().startswith(f + " "))
        assert row.split()[-4:] == [f"{s['f1']:.3f}", f"{report.all_positive_f1(s['n_pos'], s['n_neg']):.3f}",
                                    f"{s['auroc']:.3f}", f"{s['n_pos']}/{s['n_pos'] + s['n_neg']}"]
    assert f"macro F1     {zs['macro_f1']:.3f}" in summary
    assert "all-positive 0.314, random 0.272" in summary
    assert f"macro AUROC  {zs['macro_auroc']:.3f}" in summary and "chance 0.500" in summary
    assert "28 findings scored, 2 without both classes left out" in summary


def test_all_positive_f1_is_the_f1_of_predicting_every_study_positive():
    for n_pos, n_neg in ((3, 17), (1, 0), (40, 2)):
        y = np.array([1] * n_pos + [0] * n_neg)
        assert report.all_positive_f1(n_pos, n_neg) == pytest.approx(binary_f1(y, np.ones_like(y)))
    assert report.all_positive_f1(0, 0) == 0.0


def test_chart_is_a_valid_png(tmp_path):
    path = report.plot_zero_shot(fake_zero_shot(), tmp_path / "chart.png", title="fake")
    data = path.read_bytes()
    assert path == tmp_path / "chart.png" and data[:8] == PNG_MAGIC and len(data) > 20_000
    assert not list(tmp_path.glob("*.tmp"))


def test_write_report_on_real_metrics_logs_the_summary_and_writes_the_split_chart(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], (40, len(FINDINGS)), p=[0.1, 0.6, 0.3])
    zs = zero_shot_metrics(rng.normal(size=labels.shape) + labels, labels)
    logged = []
    path = report.write_report(zs, "val", tmp_path, step=12, log=logged.append)
    assert path == tmp_path / "zero_shot_val.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert logged[0] == report.format_summary(zs, "val") and logged[1].endswith(str(path))
