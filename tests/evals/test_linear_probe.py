"""The CXR-CLIP linear probe against a NumPy Newton solve of its objective, with masked, separable,
random and untrainable labels."""

from __future__ import annotations

import json

import numpy as np

from vljax.evals.cxr_eval import MISSING
from vljax.evals.linear_probe import fit_linear_probe, linear_probe, probe_subset, random_feature_probe


def json_roundtrip(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))


# Every fit trains on [200, 6] features and 3 classes, so the jitted L-BFGS compiles once.

N, D, C = 200, 6, 3


def newton_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """argmin over (w, b) of mean BCE(y, x w + b) + l2/2 |w|^2 by Newton's method, float64: [w..., b]."""
    xb = np.c_[x, np.ones(len(x))]
    reg = np.diag([l2] * x.shape[1] + [0.0])
    beta = np.zeros(xb.shape[1])
    for _ in range(30):
        p = 1 / (1 + np.exp(-xb @ beta))
        grad = xb.T @ (p - y) / len(y) + reg @ beta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + reg
        beta -= np.linalg.solve(hess, grad)
    assert np.abs(grad).max() < 1e-10
    return beta


def logistic_data(seed: int, n: int = N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)) * [1, 2, 0.5, 3, 1, 1] + [0, 1, -2, 0, 5, 0]
    w = rng.normal(size=(D, C))
    y = (rng.random((n, C)) < 1 / (1 + np.exp(-(x - x.mean(0)) / x.std(0) @ w))).astype(np.int64)
    return x, y, rng


def test_probe_matches_newton_on_labelled_rows():
    x, y, rng = logistic_data(0)
    y[rng.random(y.shape) < 0.15] = -1
    y[rng.random(y.shape) < 0.15] = MISSING
    probe = fit_linear_probe(x, y, fraction=1.0, l2=1e-2, steps=500)
    xs = (x - x.mean(0)) / x.std(0)
    for c in range(C):
        keep = y[:, c] >= 0
        want = newton_logistic(xs[keep], y[keep, c], 1e-2)
        np.testing.assert_allclose(np.r_[probe.weight[:, c], probe.bias[c]], want, atol=1e-4)
    assert probe.trained.all() and probe.steps < 500 and probe.rows.size == N


def test_probe_ignores_masked_labels():
    x, y, rng = logistic_data(1)
    hidden = rng.random(y.shape) < 0.3
    with_codes = np.where(hidden, -1, y)
    flipped = np.where(hidden, 1 - y, y)            # other values under mask=False
    a = fit_linear_probe(x, with_codes, l2=1e-2)
    b = fit_linear_probe(x, flipped, l2=1e-2, mask=~hidden)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)


def test_probe_separable_and_label_independent():
    rng = np.random.default_rng(2)
    train_x, test_x = rng.normal(size=(N, D)), rng.normal(size=(400, D))
    sep = linear_probe(train_x, (train_x[:, :C] > 0).astype(int), test_x, (test_x[:, :C] > 0).astype(int),
                       fraction=1.0, seed=0, classes=["a", "b", "c"])
    assert all(v > 0.99 for v in sep["per_class_auroc"].values()) and sep["macro_auroc"] > 0.99
    assert (sep["train_examples"], sep["test_examples"], sep["baselines"]["constant_auroc"]) == (N, 400, 0.5)
    noise = linear_probe(train_x, rng.integers(0, 2, size=(N, C)), test_x, rng.integers(0, 2, size=(400, C)),
                         fraction=1.0, seed=0)
    assert abs(noise["macro_auroc"] - 0.5) < 0.1
    test_y = rng.integers(0, 2, size=(400, C))
    rand = random_feature_probe(rng.integers(0, 2, size=(N, C)), test_y, dim=D, seed=5)
    assert abs(rand["macro_auroc"] - 0.5) < 0.1
    json_roundtrip(rand)


def test_probe_subset_nested_deterministic_and_fraction():
    ten, half, full = (probe_subset(10 * N, f, seed=4) for f in (0.1, 0.5, 1.0))
    assert ten.size == N and set(ten) < set(half) < set(full) and full.size == 10 * N
    assert np.array_equal(ten, probe_subset(10 * N, 0.1, seed=4))
    assert not np.array_equal(ten, probe_subset(10 * N, 0.1, seed=5))
    x, y, _ = logistic_data(3, n=10 * N)
    first = linear_probe(x, y, x[:300], y[:300], fraction=0.1, seed=4)
    assert first == linear_probe(x, y, x[:300], y[:300], fraction=0.1, seed=4)
    assert first["train_examples"] == N
    assert np.array_equal(fit_linear_probe(x, y, fraction=0.1, seed=4).rows, ten)


def test_probe_excludes_untrainable_classes():
    x, y, _ = logistic_data(4)
    y[:, 1] = 1                                       # no negative in training: not fitted
    out = linear_probe(x, y, x, np.c_[y[:, :1], np.r_[np.zeros(100), np.ones(100)], y[:, 2:]].astype(int),
                       classes=["a", "b", "c"])
    assert out["per_class_auroc"]["b"] is None and out["excluded"] == ["b"] and out["n_classes"] == 2
