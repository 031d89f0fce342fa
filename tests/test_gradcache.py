"""GradCache (`config.accum_steps`, vljax/update.py `make_grad_fn`): the loss, gradients and running
statistics of the accumulated step are the unaccumulated step's, on the tiny config.

Text dropout is switched off (GradCache draws one mask per micro-batch, the plain step one for the
batch), and training BatchNorm inside the image tower normalises over each micro-batch, which the
plain step reproduces as ghost batch norm with one slice per micro-batch (`SlicedBatchNorm`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import merlin
from vljax import modeling, update
from vljax.data import pipeline
from vljax.models import two_tower

from tests.runs import random_batches

B, K = 32, 4


@pytest.fixture(autouse=True)
def _no_text_dropout(monkeypatch):
    original = two_tower.ModelSpec.text_config
    monkeypatch.setattr(two_tower.ModelSpec, "text_config", lambda self: dataclasses.replace(
        original(self), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _config(norm: str, accum: int):
    c = merlin.get_config("tiny")
    c.model.image.update(norm=norm, num_groups=2, conv="native", bn_stats="per_device")
    c.model.image.feature_norm = False
    c.model.phenotype_weight = 1.0
    c.batch_size, c.accum_steps = B, accum
    return c


def _random_state(model):
    """Parameters drawn in NumPy (no compiled initialiser: they only need to be reasonable): kernels
    scaled by their fan-in, norm scales near 1, biases and BatchNorm statistics near 0 and 1."""
    rng = np.random.default_rng(1)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim >= 2:
            return rng.normal(0, 1 / np.sqrt(np.prod(x.shape[:-1])), x.shape).astype(x.dtype)
        base = 1.0 if ("scale" in name or "'var'" in name) else 0.0
        return (base + 0.1 * rng.normal(size=x.shape)).astype(x.dtype)

    return tuple(jax.tree_util.tree_map_with_path(draw, tree) for tree in (model.abstract_params, model.abstract_rest))


def _grads(config, mesh, bn_slices: int):
    """(loss, grads, new_rest, aux) of one step, as numpy, and the state it started from."""
    spec = two_tower.ModelSpec.from_config(config.model, num_phenotypes=3)
    model = modeling.abstract_model(dataclasses.replace(spec, image_bn_slices=bn_slices), config.seed)
    params, rest = _random_state(model)
    grad_fn = jax.jit(update.make_grad_fn(model, config, mesh))
    out = grad_fn(params, rest, pipeline.to_global(random_batches(config, 3, 0, 1)[0], mesh), jax.random.key(3))
    return jax.tree.map(np.asarray, out), rest


def _assert_close(got, want, tol):
    """Each array's error norm within `tol` of its norm. float32 rounding differs between a batch and
    its micro-batches (XLA picks other loop orders for other shapes) and BatchNorm over few examples
    amplifies it: the plain step on a permutation of the batch that keeps the slices (the same
    numbers mathematically) differs from itself by up to 3e-5 (4 slices of 4), GradCache from it by
    up to 6e-5, and up to 3e-4 in the stem with 8 slices of 4 (test_sharding.py allows 1e-3 for the
    same reason); a wrong micro-batch, row order or sum is off by percents. Arrays whose exact gradient is 0 (attention
    key biases: rounding only) are compared against the largest array's norm."""
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    if not flat_got:
        return
    floor = 1e-5 * max(np.linalg.norm(w) for w in jax.tree.leaves(want))
    for (path, g), w in zip(flat_got, jax.tree.leaves(want)):
        err = np.linalg.norm(np.asarray(g, np.float64) - w) / max(np.linalg.norm(w), floor)
        assert err < tol, f"{jax.tree_util.keystr(path)}: relative error {err:.1e}"


def test_gradcache_equals_the_unaccumulated_step():
    """GroupNorm in the image tower: the same model, one device."""
    mesh = modeling.make_mesh(devices=jax.devices()[:1])
    (loss, grads, rest, aux), _ = _grads(_config("group", 1), mesh, bn_slices=1)
    (loss_k, grads_k, rest_k, aux_k), _ = _grads(_config("group", K), mesh, bn_slices=1)
    np.testing.assert_allclose(loss_k, loss, rtol=2e-5)
    assert float(aux["phenotype_loss"]) > 0 and float(aux["contrastive_loss"]) > 0
    _assert_close(aux_k, aux, 2e-5)
    _assert_close(grads_k, grads, 2e-4)
    _assert_close(rest_k, rest, 1e-6)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))  # not vacuous


def test_gradcache_with_batchnorm_on_a_mesh():
    """2 devices, per-device BatchNorm: micro-batch i is every device's i-th chunk of rows, so the
    statistics are those of one device holding the batch with 2 x K ghost slices; the running
    averages take their mean, as ghost batch norm's do."""
    one = modeling.make_mesh(devices=jax.devices()[:1])
    (loss, grads, rest, _), rest0 = _grads(_config("batch", 1), one, bn_slices=2 * K)
    (loss_k, grads_k, rest_k, _), _ = _grads(_config("batch", K), modeling.make_mesh(devices=jax.devices()[:2]),
                                             bn_slices=2)
    np.testing.assert_allclose(loss_k, loss, rtol=2e-5)
    _assert_close(grads_k, grads, 1e-3)
    _assert_close(rest_k, rest, 1e-5)
    moved = [not np.allclose(r, np.asarray(r0)) for r, r0 in zip(jax.tree.leaves(rest_k), jax.tree.leaves(rest0))]
    assert sum(moved) > 20  # the running statistics of every BatchNorm layer moved


def test_micro_batches_are_chunks_of_each_devices_rows():
    x = jnp.arange(16)
    micro = update._split_micro(x, 4, 2)  # device 0 holds 0..7, device 1 holds 8..15
    np.testing.assert_array_equal(micro, [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]])
    np.testing.assert_array_equal(update._merge_micro(micro, 4, 2), x)


def test_accum_steps_must_divide_each_devices_batch():
    mesh = modeling.make_mesh(devices=jax.devices()[:2])
    for batch, accum in ((16, 3), (12, 4), (16, 0)):
        c = _config("group", accum)
        c.batch_size = batch
        with pytest.raises(ValueError, match=rf"config.accum_steps={accum}: the batch \({batch}\) must split"):
            update.check_accum_steps(c, mesh)
    update.check_accum_steps(_config("group", 8), mesh)
    assert update.accum_steps(ml_collections.ConfigDict({"batch_size": 8})) == 1  # configs saved before it
