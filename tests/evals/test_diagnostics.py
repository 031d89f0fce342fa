"""Zero-shot diagnostics against formulas written out here: brute-force thresholds, a planted
section-text case, and ridge regression solved as an augmented least-squares problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from vljax.data.findings import FINDING_SECTION, FINDINGS
from vljax.evals.diagnostics import (
    best_threshold_f1,
    best_threshold_metrics,
    best_thresholds,
    ridge_probe,
    section_scores,
)
from vljax.evals.zero_shot import binary_f1, prompt_table, zero_shot_metrics


def _brute_force_best_f1(y, s):
    candidates = [-np.inf] + sorted(set(s.tolist()))  # "s > t" for t below all, and at every value
    return max(binary_f1(y, s > t) for t in candidates)


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_f1_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[0] = True
    s = np.round(rng.normal(size=n) + 0.8 * y, 1)  # rounding makes ties common
    assert best_threshold_f1(y, s) == pytest.approx(_brute_force_best_f1(y, s), abs=1e-12)


def test_best_threshold_f1_hand_cases():
    # Perfect ranking: F1 1. Reversed ranking: the best is all-positive, 2p / (p + n) = 2*2/(2+5).
    y = np.array([1, 1, 0, 0, 0], bool)
    assert best_threshold_f1(y, np.array([5.0, 4, 3, 2, 1])) == 1.0
    assert best_threshold_f1(y, np.array([1.0, 2, 3, 4, 5])) == pytest.approx(4 / 7)
    # A tie between a positive and a negative cannot be split.
    assert best_threshold_f1(np.array([1, 0], bool), np.array([1.0, 1.0])) == pytest.approx(2 / 3)
    assert math.isnan(best_threshold_f1(np.zeros(3, bool), np.arange(3.0)))
    with pytest.raises(ValueError):
        best_threshold_f1(np.ones(3, bool), np.ones(4))
    with pytest.raises(ValueError, match="-1"):
        best_threshold_f1(np.array([1, 0, -1]), np.arange(3.0))
    with pytest.raises(ValueError, match="finite"):
        best_threshold_f1(np.array([1, 0, 0]), np.array([np.nan, 1.0, 2.0]))


def test_best_threshold_metrics_bounds_the_fixed_rule_and_skips_one_class_findings():
    rng = np.random.default_rng(0)
    n = 80
    labels = np.where(rng.random((n, len(FINDINGS))) < 0.2, 1, 0).astype(np.int8)
    labels[rng.random(labels.shape) < 0.2] = -1
    labels[:, 3] = 0                       # no positive: left out
    labels[:, 5] = np.where(labels[:, 5] == -1, -1, 1)  # no negative: left out
    scores = rng.normal(size=labels.shape) + 0.5 * (labels == 1)
    fixed = zero_shot_metrics(scores, labels)
    best = best_threshold_metrics(scores, labels)
    assert best["per_finding"][FINDINGS[3]] is None and best["per_finding"][FINDINGS[5]] is None
    used = [f for f in FINDINGS if f not in fixed["excluded"]]
    assert sorted(used) == sorted(f for f, v in best["per_finding"].items() if v is not None)
    for j, f in enumerate(FINDINGS):
        if f in used:
            m = labels[:, j] != -1
            assert best["per_finding"][f] == pytest.approx(_brute_force_best_f1(labels[m, j] == 1, scores[m, j]))
            assert best["per_finding"][f] >= fixed["per_finding"][f]["f1"] - 1e-12
    assert best["macro_f1"] == pytest.approx(np.mean([best["per_finding"][f] for f in used]))


def test_best_thresholds_reproduce_the_best_f1_when_applied():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=(50, len(FINDINGS))).astype(np.int8)
    labels[rng.random(labels.shape) < 0.2] = -1
    labels[:, 4] = np.where(labels[:, 4] == -1, -1, 0)  # no positive: no threshold
    scores = np.round(rng.normal(size=labels.shape) + labels, 1)
    t = best_thresholds(scores, labels)
    assert math.isnan(t[4]) and np.isfinite(np.delete(t, 4)).all()
    for j in range(len(FINDINGS)):
        if j == 4:
            continue
        m = labels[:, j] != -1
        y, s = labels[m, j] == 1, scores[m, j]
        assert binary_f1(y, s > t[j]) == pytest.approx(_brute_force_best_f1(y, s), abs=1e-12)


def test_section_scores_read_each_finding_from_its_own_section():
    table = prompt_table()
    rng = np.random.default_rng(1)
    d = 24
    phrase_emb = rng.normal(size=(len(table.texts), d))
    n = 12
    labels = rng.integers(0, 2, size=(n, len(FINDINGS))).astype(np.int8)
    sections = sorted(set(FINDING_SECTION.values()))
    # Section embedding of study i: noise, except for one chosen finding per section, whose mean
    # positive (negative) phrase embedding is planted when the study is positive (negative).
    chosen = {s: next(j for j, f in enumerate(FINDINGS) if FINDING_SECTION[f] == s) for s in sections}
    emb, present = {}, {}
    for s in sections:
        j = chosen[s]
        pos, neg = phrase_emb[table.pos_index[j]].mean(0), phrase_emb[table.neg_index[j]].mean(0)
        emb[s] = np.where(labels[:, j:j + 1] == 1, pos, neg) + 1e-3 * rng.normal(size=(n, d))
        present[s] = np.ones(n, bool)
    present["liver"][:3] = False
    scores, new_labels = section_scores(emb, present, phrase_emb, table, labels)
    for s, j in chosen.items():
        m = new_labels[:, j] != -1
        assert np.array_equal(scores[m, j] > 0, labels[m, j] == 1), s
    liver = [j for j, f in enumerate(FINDINGS) if FINDING_SECTION[f] == "liver"]
    assert (new_labels[:3][:, liver] == -1).all() and np.array_equal(new_labels[3:], labels[3:])
    other = [j for j in range(len(FINDINGS)) if j not in liver]
    assert np.array_equal(new_labels[:, other], labels[:, other])


def _ridge_reference(x_tr, rows, t, x_ev, l2):
    """Ridge as least squares on the augmented system [Xc; sqrt(l2) I] w = [tc; 0], features
    standardised with all training studies, fitted on the labelled `rows`."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, e = ((x_tr - mu) / sd)[rows], (x_ev - mu) / sd
    ac, tc = a - a.mean(0), t - t.mean()
    aug = np.vstack([ac, math.sqrt(l2) * np.eye(a.shape[1])])
    w = np.linalg.lstsq(aug, np.r_[tc, np.zeros(a.shape[1])], rcond=None)[0]
    return e @ w


def test_ridge_probe_matches_least_squares_and_finds_a_planted_direction():
    rng = np.random.default_rng(2)
    n_tr, n_ev, d = 120, 60, 10
    y_tr = rng.integers(0, 2, size=(n_tr, len(FINDINGS))).astype(np.int8)
    y_ev = rng.integers(0, 2, size=(n_ev, len(FINDINGS))).astype(np.int8)
    y_tr[rng.random(y_tr.shape) < 0.1] = -1
    y_ev[:, 7] = 0  # one class only in evaluation: left out
    y_ev[rng.random(y_ev.shape) < 0.1] = -1
    x_tr, x_ev = rng.normal(size=(n_tr, d)), rng.normal(size=(n_ev, d))
    x_tr[:, 0] += 5 * (y_tr[:, 2] == 1)  # finding 2 is linearly visible
    x_ev[:, 0] += 5 * (y_ev[:, 2] == 1)
    out = ridge_probe(x_tr, y_tr, x_ev, y_ev, l2=5.0)
    assert out["per_finding"][FINDINGS[7]] is None
    assert out["per_finding"][FINDINGS[2]] > 0.95
    for j in (0, 2, 11):
        a, b = y_tr[:, j] != -1, y_ev[:, j] != -1
        ref = _ridge_reference(x_tr, a, np.where(y_tr[a, j] == 1, 1.0, -1.0), x_ev[b], 5.0)
        yb = y_ev[b, j] == 1
        u = mannwhitneyu(ref[yb], ref[~yb]).statistic / (yb.sum() * (~yb).sum())
        assert out["per_finding"][FINDINGS[j]] == pytest.approx(u, abs=1e-12)
    used = [v for v in out["per_finding"].values() if v is not None]
    assert out["macro_auroc"] == pytest.approx(np.mean(used))
    with pytest.raises(ValueError, match="l2"):
        ridge_probe(x_tr, y_tr, x_ev, y_ev, l2=0.0)
