"""CXR-CLIP's loss (DESIGN.md §2) against a float64 NumPy implementation written from the formulas
(values and hand-derived gradients), on one device and on 8 fake devices through `shard_map`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from vljax.losses import cxr_loss_fn, global_cross_entropy, infonce

NAMES = ("i1", "i2", "t1", "t2")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _views(b=16, e=8, seed=0):
    """Two images and two texts per study: related (each a noisy copy of a study vector), not equal."""
    rng = np.random.default_rng(seed)
    study = rng.normal(size=(b, e))
    return {k: _unit(study + 0.8 * rng.normal(size=(b, e))).astype(np.float32) for k in NAMES}


def numpy_ell(a, b, s):
    """ℓ(A, B) = mean_i -log softmax_j(s·aᵢ·bⱼ)[i] and its gradients (d/da, d/db, d/ds), by hand."""
    sim = a @ b.T
    z = s * sim
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = a.shape[0]
    value = -np.log(p[np.arange(n), np.arange(n)]).mean()
    dz = (p - np.eye(n)) / n
    return value, s * dz @ b, s * dz.T @ a, float((dz * sim).sum())


def numpy_cxr(views, s, icl_weight, tcl_weight):
    """L_CLIP, L_ICL, L_TCL as written in DESIGN.md §2; returns (loss, parts, grads by name + "s")."""
    v = {k: x.astype(np.float64) for k, x in views.items()}
    terms = {"clip_loss": [], "icl_loss": [], "tcl_loss": []}
    for x in ("i1", "i2"):
        for y in ("t1", "t2"):
            terms["clip_loss"] += [(0.5 * 0.25, x, y), (0.5 * 0.25, y, x)]
    terms["icl_loss"] = [(0.5, "i1", "i2"), (0.5, "i2", "i1")]
    terms["tcl_loss"] = [(0.5, "t1", "t2"), (0.5, "t2", "t1")]
    weights = {"clip_loss": 1.0, "icl_loss": icl_weight, "tcl_loss": tcl_weight}
    parts = {}
    grads = {k: np.zeros_like(x) for k, x in v.items()} | {"s": 0.0}
    for part, items in terms.items():
        parts[part] = 0.0
        for coef, x, y in items:
            val, gx, gy, gs = numpy_ell(v[x], v[y], s)
            parts[part] += coef * val
            w = weights[part] * coef
            grads[x] += w * gx
            grads[y] += w * gy
            grads["s"] += w * gs
    loss = sum(weights[k] * parts[k] for k in parts)
    return loss, parts, grads


@functools.cache
def _value_and_grad(mesh, *weights):
    """Jitted once per (mesh, weights): loss, parts and the gradients in all five inputs. No weights:
    `cxr_loss_fn`'s defaults."""
    return jax.jit(jax.value_and_grad(cxr_loss_fn(mesh, *weights), argnums=(0, 1, 2, 3, 4), has_aux=True))


def _jax_cxr(mesh, views, s, *weights):
    args = [jnp.asarray(views[k]) for k in NAMES] + [jnp.float32(s)]
    (loss, parts), grads = _value_and_grad(mesh, *weights)(*args)
    return loss, parts, dict(zip(NAMES + ("s",), grads))


def _mesh(n_dev):
    assert jax.device_count() >= n_dev, "tests expect fake CPU devices (see conftest)"
    return Mesh(np.array(jax.devices()[:n_dev]), ("data",))


def test_numpy_reference_gradients_match_finite_differences():
    views = {k: x.astype(np.float64) for k, x in _views(b=4, e=3, seed=5).items()}
    s, eps = 3.0, 1e-6
    _, _, grads = numpy_cxr(views, s, 0.7, 1.3)
    f = lambda vs, sc: numpy_cxr(vs, sc, 0.7, 1.3)[0]  # noqa: E731
    for k in NAMES:
        fd = np.zeros_like(views[k])
        for idx in np.ndindex(views[k].shape):
            up, down = dict(views), dict(views)
            up[k], down[k] = views[k].copy(), views[k].copy()
            up[k][idx] += eps
            down[k][idx] -= eps
            fd[idx] = (f(up, s) - f(down, s)) / (2 * eps)
        np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads["s"], (f(views, s + eps) - f(views, s - eps)) / (2 * eps), rtol=1e-6)


def test_global_cross_entropy_is_one_direction():
    """ℓ(A, B) on 8 devices: value and gradients against `numpy_ell`, and not symmetric."""
    views, s = _views(seed=6), 6.0
    f = jax.shard_map(lambda a, b, sc: global_cross_entropy(a, b, sc, "data"), mesh=_mesh(8),
                      in_specs=(P("data"), P("data"), P()), out_specs=P())
    got, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(views["i1"], views["t1"], jnp.float32(s))
    ref = numpy_ell(views["i1"].astype(np.float64), views["t1"].astype(np.float64), s)
    np.testing.assert_allclose(got, ref[0], rtol=1e-5)
    for g, r in zip(grads, ref[1:]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    reverse = numpy_ell(views["t1"].astype(np.float64), views["i1"].astype(np.float64), s)[0]
    assert abs(ref[0] - reverse) > 1e-3


@pytest.mark.parametrize("n_dev", [1, 8])
def test_cxr_loss_value_parts_and_gradients_match_numpy(n_dev):
    views, s = _views(seed=1), 9.0
    loss, parts, grads = _jax_cxr(_mesh(n_dev), views, s, 0.3, 2.0)
    ref_loss, ref_parts, ref_grads = numpy_cxr(views, s, 0.3, 2.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in ref_parts:
        np.testing.assert_allclose(parts[k], ref_parts[k], rtol=1e-5, err_msg=k)
    for k in ref_grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_cxr_loss_on_8_devices_equals_the_single_device_loss():
    """The trainer's mesh layout (batch over both axes `data` x `fsdp`) against one device; the default
    weights are DESIGN.md's λ_I = 1, λ_T = 0.5."""
    views, s = _views(seed=2), 1 / 0.07
    mesh8 = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    got_loss, got_parts, got_grads = _jax_cxr(mesh8, views, s)
    ref_loss, ref_parts, ref_grads = _jax_cxr(_mesh(1), views, s)
    np.testing.assert_allclose(ref_loss, numpy_cxr(views, s, 1.0, 0.5)[0], rtol=1e-5)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for k in ref_parts:
        np.testing.assert_allclose(got_parts[k], ref_parts[k], rtol=1e-6, err_msg=k)
    for k in ref_grads:
        np.testing.assert_allclose(got_grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_zero_weights_reduce_to_the_clip_term():
    views, s = _views(seed=3), 5.0
    loss, parts, grads = _jax_cxr(_mesh(8), views, s, 0.0, 0.0)
    ref_loss, ref_parts, ref_grads = numpy_cxr(views, s, 0.0, 0.0)
    assert ref_parts["icl_loss"] > 0.1 and ref_parts["tcl_loss"] > 0.1  # the dropped terms are not tiny
    np.testing.assert_allclose(loss, ref_parts["clip_loss"], rtol=1e-5)
    np.testing.assert_allclose(loss, parts["clip_loss"], rtol=1e-6)
    for k in ref_grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_identical_views_make_the_clip_term_plain_infonce():
    views, s = _views(seed=4), 14.0
    same = {"i1": views["i1"], "i2": views["i1"], "t1": views["t1"], "t2": views["t1"]}
    _, parts, _ = _jax_cxr(_mesh(8), same, s, 0.3, 2.0)
    ref = infonce(jnp.asarray(views["i1"]), jnp.asarray(views["t1"]), jnp.float32(s))
    np.testing.assert_allclose(parts["clip_loss"], ref, rtol=1e-6)
    _, parts_distinct, _ = _jax_cxr(_mesh(8), views, s, 0.3, 2.0)
    assert abs(float(parts_distinct["clip_loss"]) - float(ref)) > 1e-3  # distinct views do change it


def test_each_embedding_set_is_gathered_once():
    views = _views()
    f = cxr_loss_fn(_mesh(8))
    jaxpr = str(jax.make_jaxpr(f)(*(views[k] for k in NAMES), jnp.float32(2.0)))
    assert jaxpr.count("all_gather[") == 4
