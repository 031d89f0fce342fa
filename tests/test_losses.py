"""Losses against NumPy formulas written here (values and gradients), and the sharded global
InfoNCE against the single-device loss."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from vljax.losses import global_infonce, infonce, phenotype_bce


def _embeddings(b=8, e=16, seed=0):
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(b, e)), rng.normal(size=(b, e))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def _softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def numpy_infonce(img, txt, s):
    """Value and gradients (d/dimg, d/dtxt, d/ds) of the symmetric InfoNCE, by hand."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    sim = img @ txt.T
    z = s * sim
    b = z.shape[0]
    p_rows, p_cols = _softmax(z, 1), _softmax(z, 0)
    diag = np.arange(b)
    value = 0.5 * (-np.log(p_rows[diag, diag]).mean() - np.log(p_cols[diag, diag]).mean())
    dz = 0.5 / b * (p_rows - np.eye(b)) + 0.5 / b * (p_cols - np.eye(b))
    return value, s * dz @ txt, s * dz.T @ img, float((dz * sim).sum())


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_infonce_value_and_gradients_match_numpy(scale):
    img, txt = _embeddings()
    value, g_img, g_txt, g_s = numpy_infonce(img, txt, scale)
    got, grads = jax.value_and_grad(infonce, argnums=(0, 1, 2))(jnp.asarray(img), jnp.asarray(txt),
                                                                 jnp.float32(scale))
    np.testing.assert_allclose(got, value, rtol=1e-5)
    for g, ref in zip(grads, (g_img, g_txt, g_s)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_infonce_is_low_for_aligned_pairs_and_log_b_for_uninformative():
    img, _ = _embeddings()
    assert float(infonce(img, img, 100.0)) < 1e-3
    same = np.ones((8, 4), np.float32) / 2.0
    np.testing.assert_allclose(float(infonce(same, same, 10.0)), np.log(8), rtol=1e-6)


@pytest.mark.parametrize("n_dev", [2, 4, 8])
def test_global_infonce_equals_single_device_loss_and_gradients(n_dev):
    assert jax.device_count() >= n_dev, "tests expect fake CPU devices (see conftest)"
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    img, txt = _embeddings(b=16, e=8, seed=3)
    scale = jnp.float32(14.0)

    def sharded(i, t, s):
        f = jax.shard_map(lambda i, t, s: global_infonce(i, t, s, "data"), mesh=mesh,
                          in_specs=(P("data"), P("data"), P()), out_specs=P())
        return f(i, t, s)

    got, g_got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(img, txt, scale)
    ref, g_ref = jax.value_and_grad(infonce, argnums=(0, 1, 2))(img, txt, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_phenotype_bce_matches_numpy_with_and_without_mask():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6)).astype(np.float32) * 3
    y = (rng.uniform(size=(4, 6)) < 0.3).astype(np.float32)
    m = (rng.uniform(size=(4, 6)) < 0.7).astype(np.float32)
    per = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    sig = 1 / (1 + np.exp(-x))
    v, g = jax.value_and_grad(phenotype_bce)(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(v, per.mean(), rtol=1e-6)
    np.testing.assert_allclose(g, (sig - y) / x.size, rtol=1e-5, atol=1e-7)
    v, g = jax.value_and_grad(phenotype_bce)(jnp.asarray(x), jnp.asarray(y), jnp.asarray(m))
    np.testing.assert_allclose(v, (per * m).sum() / m.sum(), rtol=1e-6)
    np.testing.assert_allclose(g, (sig - y) * m / m.sum(), rtol=1e-5, atol=1e-7)


def test_loss_memory_bench_counts_the_sharded_and_the_replicated_embeddings():
    """`tools/bench.py loss` on the 8 fake devices: per-device arguments are exactly the local (b x D)
    or replicated (B x D) embeddings of both towers plus the scale; the naive temporaries hold at least
    the B x B logits, the all-gather ones the gathered B x D embeddings."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    from bench_loss import loss_memory

    for r in loss_memory(8, [4, 32], 64):
        assert r["gather_args"] == 2 * r["b"] * 64 * 4 + 4 and r["naive_args"] == 2 * r["B"] * 64 * 4 + 4
        assert r["naive_temps"] >= r["B"] * r["B"] * 4 and r["gather_temps"] >= r["B"] * 64 * 4
    assert r["naive_args"] + r["naive_temps"] > 2 * (r["gather_args"] + r["gather_temps"])
