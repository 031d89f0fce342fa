"""CXR-CLIP's linear probe on frozen features (DESIGN.md §2), on the host arrays the evaluator gives.

`linear_probe`: multi-label L2-regularised logistic regression, fitted full-batch with optax L-BFGS
(`fit_linear_probe`) on features standardised with the training subset's statistics, on a seeded,
nested 10 % / 100 % subset of the training rows (`probe_subset`). Labels follow `cxr_eval`: 1 / 0 /
-1 uncertain / -2 or NaN missing, and an optional bool mask; only rows labelled 0 or 1 count.
`random_feature_probe` is the probe's own chance level.

Results are plain Python types (NaN -> None) that `json.dumps(..., allow_nan=False)` accepts. Classes
that cannot be fitted or scored are listed in "excluded" and left out of the macro average.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vljax.evals.cxr_eval import _class_names, _label_state, _macro
from vljax.evals.zero_shot import _none_if_nan, auroc


def probe_subset(n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted rows of a seeded subset of round(fraction * n_rows) rows (at least 1): the first rows of
    `np.random.default_rng(seed).permutation(n_rows)`. With one seed, the 10 % subset is inside the 100 %."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_rows < 1:
        raise ValueError("need at least one training row")
    k = max(1, min(n_rows, int(fraction * n_rows + 0.5)))
    return np.sort(np.random.default_rng(seed).permutation(n_rows)[:k])


def _logistic_loss(params, x, y, m, l2):
    w, b = params
    z = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b
    bce = jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))   # -log sigmoid(+-z), stable
    per_class = jnp.sum(bce * m, axis=0) / jnp.maximum(jnp.sum(m, axis=0), 1.0)
    return jnp.sum(per_class) + 0.5 * l2 * jnp.sum(w * w)


@jax.jit
def _fit_logistic(x, y, m, l2, tol, max_steps):
    """L-BFGS (zoom line search) from zero weights until |grad| <= tol or max_steps; every argument is
    traced, so one compilation serves all l2 / tol / max_steps for an [N, D] x [N, C] shape."""
    params = (jnp.zeros((x.shape[1], y.shape[1]), x.dtype), jnp.zeros((y.shape[1],), x.dtype))
    loss = lambda p: _logistic_loss(p, x, y, m, l2)  # noqa: E731
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, state, k, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        p = optax.apply_updates(p, updates)   # the line search left the new point's gradient in `state`
        return p, state, k + 1, optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))

    grad_norm = optax.tree_utils.tree_norm(jax.grad(loss)(params))
    carry = (params, opt.init(params), jnp.zeros((), jnp.int32), grad_norm)
    params, _, k, grad_norm = jax.lax.while_loop(lambda c: (c[2] < max_steps) & (c[3] > tol), step, carry)
    return params, k, grad_norm


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ weight + bias. `trained[c]` is False for classes
    whose subset had no labelled positive or negative (weights 0). `rows` are the training rows used."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    rows: np.ndarray
    trained: np.ndarray
    steps: int
    grad_norm: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, *, fraction: float = 1.0, seed: int = 0,
                     l2: float = 1e-2, steps: int = 500, tol: float = 1e-6, mask: np.ndarray | None = None,
                     device: jax.Device | None = None) -> LinearProbe:
    """Fit one sigmoid per class on `probe_subset(N, fraction, seed)`. The objective is, per class,
    the mean binary cross-entropy over that class's rows labelled 0/1, plus l2/2 * |w_c|^2 (the bias is
    not penalised), summed over classes. Features are standardised with the subset's mean and std
    (std 0 -> 1), and the fit runs in float32 on `device` (default: JAX's default device)."""
    x = np.asarray(train_x, dtype=np.float64)
    known, positive, _ = _label_state(train_y, mask)
    if x.ndim != 2 or x.shape[0] != known.shape[0] or not np.isfinite(x).all():
        raise ValueError(f"train_x must be finite [N, D] with N = {known.shape[0]}, got {x.shape}")
    if not (l2 >= 0 and steps >= 0 and tol >= 0):
        raise ValueError("l2, steps and tol must be >= 0")
    rows = probe_subset(x.shape[0], fraction, seed)
    x, known, positive = x[rows], known[rows], positive[rows]
    trained = (positive & known).any(axis=0) & (~positive & known).any(axis=0)
    known &= trained[None, :]
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    args = [((x - mean) / std).astype(np.float32), positive.astype(np.float32), known.astype(np.float32),
            np.float32(l2), np.float32(tol), np.int32(steps)]
    (w, b), k, grad_norm = jax.device_get(_fit_logistic(*jax.device_put(args, device)))
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise FloatingPointError("linear probe diverged (non-finite weights)")
    return LinearProbe(mean, std, np.asarray(w, np.float64), np.asarray(b, np.float64), rows, trained,
                       int(k), float(grad_norm))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 fraction: float = 1.0, seed: int = 0, l2: float = 1e-2, steps: int = 500, tol: float = 1e-6,
                 train_mask: np.ndarray | None = None, test_mask: np.ndarray | None = None,
                 classes: Sequence[str] | None = None, device: jax.Device | None = None) -> dict:
    """Test AUROC of a `fit_linear_probe` probe per class (over test rows labelled 0/1) and its macro
    mean over classes that were trained and have both labels in the test set. The others are listed
    in "excluded". "baselines": "constant_auroc" is the AUROC of a constant score (0.5)."""
    probe = fit_linear_probe(train_x, train_y, fraction=fraction, seed=seed, l2=l2, steps=steps, tol=tol,
                             mask=train_mask, device=device)
    known, positive, _ = _label_state(test_y, test_mask)
    tx = np.asarray(test_x)
    if tx.ndim != 2 or tx.shape != (known.shape[0], probe.mean.size) or known.shape[1] != probe.bias.size:
        raise ValueError(f"test_x {tx.shape} / test_y {known.shape} do not match the training data")
    logits = probe.logits(tx)
    names = _class_names(classes, known.shape[1])
    per_class, excluded, used = {}, [], []
    for c, name in enumerate(names):
        k = known[:, c]
        value = auroc(positive[k, c], logits[k, c]) if probe.trained[c] and k.any() else math.nan
        per_class[name] = _none_if_nan(value)
        if math.isnan(value):
            excluded.append(name)
        else:
            used.append(value)
    return {
        "macro_auroc": _macro(used),
        "per_class_auroc": per_class,
        "n_classes": len(used),
        "excluded": excluded,
        "train_examples": int(probe.rows.size),
        "test_examples": int(tx.shape[0]),
        "fraction": float(fraction), "seed": int(seed), "l2": float(l2),
        "steps": probe.steps, "grad_norm": _none_if_nan(probe.grad_norm),
        "baselines": {"constant_auroc": 0.5 if used else None},
    }


def random_feature_probe(train_y: np.ndarray, test_y: np.ndarray, *, dim: int, fraction: float = 1.0,
                         seed: int = 0, **kwargs) -> dict:
    """`linear_probe` on standard normal features of width `dim`, drawn from
    `np.random.default_rng(seed)` (train rows, then test rows). This is the chance level of the probe
    itself (about 0.5, a little lower or higher by overfitting), which the trainer may report beside the
    real one."""
    rng = np.random.default_rng(seed)
    train_x = rng.standard_normal((np.shape(train_y)[0], dim))
    test_x = rng.standard_normal((np.shape(test_y)[0], dim))
    return linear_probe(train_x, train_y, test_x, test_y, fraction=fraction, seed=seed, **kwargs)
