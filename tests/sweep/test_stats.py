"""vljax.sweep.stats against hand-computed values: Student-t and chi-square quantiles are written out
(from tables / closed forms), not taken from scipy, and the bootstrap against a plain loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from vljax.evals import zero_shot
from vljax.sweep import stats

T975_DF2 = 4.302652729911275  # t_{0.975}(2), from tables
T975_DF3 = 3.182446305284263  # t_{0.975}(3)


def t3_cdf(t: float) -> float:
    """Student's t CDF with 3 degrees of freedom in closed form."""
    return 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi


def test_summary_mean_std_and_t_interval_by_hand():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == 2.5
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)
    assert s.std == pytest.approx(std, rel=1e-15)
    half = T975_DF3 * std / 2
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)

    s = stats.summarize([0.60, 0.64, 0.71])
    std = math.sqrt(sum((x - 0.65) ** 2 for x in (0.60, 0.64, 0.71)) / 2)
    assert s.mean == pytest.approx(0.65) and s.std == pytest.approx(std)
    assert s.ci_high - s.mean == pytest.approx(T975_DF2 * std / math.sqrt(3))

    one = stats.summarize([0.7])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert stats.summarize([]).n == 0
    with pytest.raises(ValueError, match="finite"):
        stats.summarize([0.5, math.nan])


def test_paired_t_test_by_hand_and_against_scipy():
    a, b = [1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 1.0, 2.0]  # d = 1, 0, 2, 3
    d = stats.paired_difference(a, b)
    sd = math.sqrt(5 / 3)
    t = 1.5 / (sd / 2)
    assert (d.n, d.mean) == (4, 1.5) and d.std == pytest.approx(sd)
    assert d.t_p == pytest.approx(2 * (1 - t3_cdf(t)), rel=1e-10)
    assert d.t_p == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    assert (d.ci_low, d.ci_high) == pytest.approx((1.5 - T975_DF3 * sd / 2, 1.5 + T975_DF3 * sd / 2))
    # Sign flips of (1, 0, 2, 3): |sum| >= 6 for +-(1, +-0, 2, 3): 4 of 16.
    assert d.sign_flip_p == 4 / 16
    # Equal differences: t undefined, sign flip still exact.
    same = stats.paired_difference([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    assert math.isnan(same.t_p) and same.sign_flip_p == 2 / 8
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_sign_flip_p_enumerated_by_hand():
    # +-1 +-2 +-3: |sums| 6, 4, 2, 0, 0, 2, 4, 6 -> two of eight reach 6, four reach 4.
    assert stats.sign_flip_p([1, 2, 3]) == 2 / 8
    assert stats.sign_flip_p([-1, 2, 3]) == 4 / 8
    assert stats.sign_flip_p([1, -1]) == 1.0  # observed mean 0
    assert stats.sign_flip_p([0.1, 0.2, 0.3]) == 2 / 8  # rounding of the tied |sums| does not matter
    assert stats.sign_flip_p([0.02]) == 1.0


def test_sign_flip_p_equals_brute_force_enumeration():
    rng = np.random.default_rng(0)
    d = rng.normal(0.01, 0.02, 12)
    obs = abs(d.sum())
    brute = sum(abs(np.dot(e, d)) >= obs - 1e-12 for e in itertools.product((1, -1), repeat=12)) / 2**12
    assert stats.sign_flip_p(d) == brute
    # 2^20 sign vectors still exact; beyond the limit it refuses.
    assert stats.sign_flip_p(np.full(20, 0.01)) == 2 / 2**20
    with pytest.raises(ValueError, match="n=21"):
        stats.sign_flip_p(np.ones(21))


def _toy_run(n=40, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1], size=(n, 30), p=[0.2, 0.5, 0.3]).astype(np.int8)
    scores = rng.normal(0, 1, (n, 30)) + 0.8 * (labels == 1)
    img = rng.normal(size=(n, 8)).astype(np.float32)
    txt = (img + rng.normal(scale=1.5, size=(n, 8))).astype(np.float32)
    return scores, labels, img, txt


def test_bootstrap_equals_a_plain_loop_with_the_same_seed():
    scores, labels, img, txt = _toy_run()
    n, b_count = len(scores), 60
    got = stats.bootstrap_run(scores, labels, img, txt, resamples=b_count, seed=5)

    # Ranks of the true report, one query at a time.
    unit = lambda x: x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    sim = unit(img.astype(np.float64)) @ unit(txt.astype(np.float64)).T
    ranks = np.array([sum(sim[i, j] >= sim[i, i] for j in range(n) if j != i) for i in range(n)])
    rng = np.random.default_rng(5)
    f1s, aucs, recalls = [], [], {1: [], 5: [], 10: []}
    for _ in range(b_count):
        idx = rng.integers(0, n, n)
        s, lab = scores[idx], labels[idx]
        f1, auc = [], []
        for f in range(30):
            m = lab[:, f] != -1
            y = lab[m, f] == 1
            if y.any() and not y.all():
                f1.append(zero_shot.binary_f1(y, s[m, f] > 0))
                auc.append(zero_shot.auroc(y, s[m, f]))
        f1s.append(np.mean(f1))
        aucs.append(np.mean(auc))
        for k in recalls:
            recalls[k].append(np.mean(ranks[idx] < k))
    full = zero_shot.zero_shot_metrics(scores, labels)
    retrieval = zero_shot.retrieval_metrics(img, txt)
    for key, values, estimate in [("macro_f1", f1s, full["macro_f1"]), ("macro_auroc", aucs, full["macro_auroc"])] + [
            (f"r{k}", recalls[k], retrieval[f"r{k}"]) for k in (1, 5, 10)]:
        ci = got[key]
        assert ci.estimate == pytest.approx(estimate, abs=1e-15)
        assert (ci.ci_low, ci.ci_high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
        assert (ci.resamples, ci.valid, ci.seed, ci.n) == (b_count, b_count, 5, n)
        assert ci.ci_low < ci.ci_high
    # Another seed, other resamples.
    assert stats.bootstrap_run(scores, labels, resamples=b_count, seed=6)["macro_f1"].ci_low != got["macro_f1"].ci_low


def test_retrieval_ranks_give_the_evaluators_recall():
    _, _, img, txt = _toy_run(n=30, seed=2)
    txt[3] = txt[4]  # a tie: counts against the true match, as in retrieval_metrics
    ranks = stats.retrieval_ranks(img, txt)
    want = zero_shot.retrieval_metrics(img, txt)
    assert {f"r{k}": float(np.mean(ranks < k)) for k in (1, 5, 10)} == {k: want[k] for k in ("r1", "r5", "r10")}


def test_variance_decomposition_on_constructed_grids():
    init_only, data_only, both = [1.0, 2.0, 3.0], [1.0, 3.0, 5.0], [0.0, 5.0]
    dec = stats.variance_decomposition(init_only, data_only, both)
    assert (dec.init.variance, dec.data.variance, dec.both.variance) == pytest.approx((1.0, 4.0, 12.5))
    assert (dec.init.n, dec.data.n, dec.both.n) == (3, 3, 2)
    assert dec.total == pytest.approx(5.0) and dec.ratio == pytest.approx(0.4) and dec.init_share == pytest.approx(0.2)
    # Chi-square interval; with 2 degrees of freedom the quantile is -2 ln(1 - p).
    q_hi, q_lo = -2 * math.log(0.025), -2 * math.log(0.975)
    assert (dec.init.ci_low, dec.init.ci_high) == pytest.approx((2 / q_hi, 2 / q_lo), rel=1e-10)
    # An additive model y = mu + a(init) + b(data) with fixed effects: the one-factor grids recover
    # each factor's spread, and the fully crossed grid's variance is their (population) sum.
    a, b = np.array([-0.01, 0.0, 0.01]), np.array([-0.02, 0.0, 0.02, 0.0])
    crossed = [0.6 + x + y for x in a for y in b]
    dec = stats.variance_decomposition(0.6 + a + b[1], 0.6 + a[1] + b, crossed)
    assert dec.init.variance == pytest.approx(np.var(a, ddof=1))
    assert dec.data.variance == pytest.approx(np.var(b, ddof=1))
    assert dec.both.variance * (len(crossed) - 1) / len(crossed) == pytest.approx(np.var(a) + np.var(b))
    one = stats.variance_decomposition([0.5], [0.5, 0.6], [0.5, 0.7])
    assert math.isnan(one.init.variance) and math.isnan(one.total) and math.isnan(one.init_share)
