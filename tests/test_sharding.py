"""The (data, fsdp) mesh and FSDP state shardings (`vljax/sharding.py`): the train step sharded over
4x2, 1x8 and 8x1 meshes of the 8 fake CPU devices equals the same step on one device, for both
BatchNorm statistics; checkpoints move between meshes; per-device BatchNorm is what each device alone
computes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import merlin
from vljax import checkpointing, modeling, sharding, update
from vljax.data import pipeline
from vljax.models import resnet3d

from tests.runs import random_batches


def _mesh_config(data, fsdp, min_size=0):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, fsdp_min_size=min_size))


def test_mesh_shape_from_config():
    assert sharding.mesh_shape(None, 8) == (8, 1)
    assert sharding.mesh_shape(_mesh_config(-1, 2), 8) == (4, 2)
    assert sharding.mesh_shape(_mesh_config(1, -1), 8) == (1, 8)
    assert sharding.mesh_shape(_mesh_config(2, 4), 8) == (2, 4)
    for data, fsdp, error in [(-1, 3, "does not divide the 8 devices"), (2, 2, "= 4 devices, but there are 8"),
                              (-1, -1, "both -1"), (0, 8, r"config\.mesh\.data=0")]:
        with pytest.raises(ValueError, match=error):
            sharding.mesh_shape(_mesh_config(data, fsdp), 8)
    mesh = sharding.make_mesh(_mesh_config(-1, 2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2} and mesh.size == 8
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


def test_each_host_must_hold_a_contiguous_block_of_the_batch():
    """Hosts' input slices are consecutive blocks in process order; so must be their devices in the mesh."""
    sharding.check_host_rows(np.array([[0, 0], [1, 1]]), 2)            # data across hosts, fsdp within
    sharding.check_host_rows(np.array([[0, 0, 1, 1]]), 2)              # fsdp over all devices, hosts in order
    sharding.check_host_rows(np.zeros((4, 2), int), 1)
    for layout in ([[0, 1], [0, 1]], [[1, 1], [0, 0]], [[0, 1, 0, 1]]):
        with pytest.raises(ValueError, match="each host must hold a contiguous block of the batch"):
            sharding.check_host_rows(np.array(layout), 2)
    # What make_mesh falls back to when the topology order interleaves hosts: host by host, stable.
    import types

    fake = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate([1, 0, 1, 0, 0, 1, 1, 0])]
    ordered = sharding.host_ordered(fake)
    assert [d.id for d in ordered] == [1, 3, 4, 7, 0, 2, 5, 6]
    sharding.check_host_rows(np.array([d.process_index for d in ordered]).reshape(4, 2), 2)


def test_fsdp_rule_splits_the_largest_divisible_dimension_of_large_arrays():
    spec = sharding.fsdp_spec
    assert spec((3, 3, 3, 64, 128), 8, 1024) == P(None, None, None, None, "fsdp")
    assert spec((512, 384), 8, 1024) == P("fsdp")
    assert spec((30522, 384), 8, 1024) == P(None, "fsdp")      # 30522 is not divisible by 8
    assert spec((64, 64), 8, 1024) == P(None, "fsdp")          # equal sizes: the last
    assert spec((384,), 8, 1024) == P()                        # small: replicated
    assert spec((7, 9), 2, 0) == P()                           # nothing divisible
    assert spec((), 8, 0) == P() and spec((4096, 512), 1, 0) == P()


def _config(bn_stats: str):
    c = merlin.get_config("tiny")
    c.model.image.bn_stats = bn_stats
    c.model.image.conv = "native"  # one HLO convolution per conv (depth taps: several): compiles faster
    c.model.phenotype_weight = 1.0
    c.optim.warmup_steps = 1
    # Adam's first steps are sign(gradient) * lr: with eps 1e-8 a gradient that cancels to rounding level
    # (1e-10) becomes a full step whose sign is the rounding's. 1e-3 keeps the update a smooth function
    # of the gradient, so that what is compared is the step's arithmetic, not Adam's amplification.
    c.optim.eps = 1e-3
    c.batch_size = 32  # 4 examples per device: per-device BatchNorm over 2 (at 1 voxel in the last stage) is too ill-conditioned to compare
    return c


def _train(config, mesh, spec, batches, init_state=None):
    """Three steps on `mesh`: (losses, final state as numpy, state shardings)."""
    model = modeling.abstract_model(spec, config.seed)
    tx, schedule = update.make_optimizer(config)
    abstract = checkpointing.abstract_train_state(model, tx, config.seed, mesh, sharding.min_size(config))
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    if init_state is None:
        state = checkpointing.init_train_state(model, tx, config.seed, abstract)
    else:
        state = jax.device_put(init_state, shardings)
    step = update.jit_train_step(model, tx, schedule, config, mesh, shardings)
    losses = []
    for batch in batches:
        state, metrics = step(state, pipeline.to_global(batch, mesh))
        losses.append(float(metrics.compute()["loss"]))
    return losses, jax.tree.map(np.asarray, state), shardings


@pytest.fixture(scope="module")
def reference():
    """The single-device runs (both BatchNorm choices): {bn_stats: (initial state, losses, final state)}.
    Per-device statistics on one device use 8 slices of the batch, as 8 devices would."""
    out, init = {}, None
    one = modeling.make_mesh(devices=jax.devices()[:1])
    for bn_stats in ("global", "per_device"):
        config = _config(bn_stats)
        spec = modeling.model_spec(config, _manifest())
        spec = dataclasses.replace(spec, image_bn_slices=8 if bn_stats == "per_device" else 1)
        if init is None:  # the same variables for both BatchNorm choices
            model = modeling.abstract_model(spec, config.seed)
            tx, _ = update.make_optimizer(config)
            abstract = checkpointing.abstract_train_state(model, tx, config.seed, one)
            init = jax.tree.map(np.asarray, checkpointing.init_train_state(model, tx, config.seed, abstract))
        batches = random_batches(config, 16, spec.text_config().hidden_size, 3)
        losses, final, _ = _train(config, one, spec, batches, init)
        out[bn_stats] = init, losses, final, batches
    return out


def _manifest():
    import types

    return types.SimpleNamespace(phenotype_codes=tuple(f"code{i}" for i in range(16)))


@pytest.mark.parametrize("bn_stats", ["global", "per_device"])
@pytest.mark.parametrize("shape", [(4, 2), (1, 8)])
def test_sharded_train_step_equals_the_single_device_step(reference, shape, bn_stats):
    init, want_losses, want, batches = reference[bn_stats]
    config = _config(bn_stats)
    config.mesh = _mesh_config(*shape, min_size=256)
    mesh = modeling.make_mesh(config)
    spec = modeling.model_spec(config, _manifest(), mesh)
    assert spec.image_bn_slices == (8 if bn_stats == "per_device" else 1)
    losses, got, shardings = _train(config, mesh, spec, batches, init)

    # FSDP is really on: with fsdp > 1 the large arrays (parameters and both Adam moments) are split.
    flat = jax.tree_util.tree_leaves_with_path(shardings)
    split = [jax.tree_util.keystr(p) for p, s in flat if "fsdp" in s.spec]
    if shape[1] > 1:
        assert any("opt_state" in k for k in split) and any("params" in k and "image_tower" in k for k in split)
        assert sum(int(np.prod(s.shard_shape(x.shape))) for s, x in zip(jax.tree.leaves(shardings),
                   jax.tree.leaves(got))) < 0.6 * sum(x.size for x in jax.tree.leaves(got))
    else:
        assert not split
    # The first loss (same parameters, same batch) differs only by how the reductions are split across
    # devices: float32 rounding. The steps then amplify rounding, most where a BatchNorm statistic has
    # few values (per-device statistics over 4 examples at the last stage's single voxel): measured,
    # after 3 steps, losses within 1.4e-4 (relative), parameters within 1e-4, 0.44 % of the distance
    # they travelled (global statistics: 1e-6, 2e-7, 0.002 %). Tolerances: 3-5x those.
    np.testing.assert_allclose(losses[0], want_losses[0], rtol=1e-5)
    np.testing.assert_allclose(losses, want_losses, rtol=5e-4)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4, err_msg=jax.tree_util.keystr(path))
    dist = lambda x, y: np.sqrt(sum(np.sum((np.float64(a) - b) ** 2) for a, b in  # noqa: E731
                                    zip(jax.tree.leaves(x), jax.tree.leaves(y))))
    assert dist(got["params"], want["params"]) < 2e-2 * dist(want["params"], init["params"])
    if bn_stats == "global":  # no few-value statistics: much closer
        assert dist(got["params"], want["params"]) < 2e-4 * dist(want["params"], init["params"])


def test_per_device_batchnorm_is_each_devices_own_batchnorm():
    """SlicedBatchNorm(slices=4) on a batch of 8 = four nn.BatchNorms on consecutive pairs; running
    averages are the mean of theirs; evaluation mode is nn.BatchNorm's."""
    x = jax.random.normal(jax.random.key(1), (8, 3, 4, 5, 6)) * 3 + 1
    sliced = resnet3d.SlicedBatchNorm(6, slices=4, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    sliced.scale[...] = jnp.arange(1.0, 7.0)
    sliced.bias[...] = jnp.linspace(-1, 1, 6)
    y = sliced(x, use_running_average=False)
    means, variances = [], []
    for k in range(4):
        bn = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
        bn.scale[...], bn.bias[...] = sliced.scale[...], sliced.bias[...]
        np.testing.assert_allclose(y[2 * k:2 * k + 2], bn(x[2 * k:2 * k + 2], use_running_average=False),
                                   rtol=1e-5, atol=1e-5)
        means.append(bn.mean[...])
        variances.append(bn.var[...])
    np.testing.assert_allclose(sliced.mean[...], np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(sliced.var[...], np.mean(variances, 0), rtol=1e-5)
    bn = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    for name in ("scale", "bias", "mean", "var"):
        getattr(bn, name)[...] = getattr(sliced, name)[...]
    np.testing.assert_array_equal(sliced(x, use_running_average=True), bn(x, use_running_average=True))
    with pytest.raises(ValueError, match="batch 6 is not divisible into 4 slices"):
        sliced(x[:6], use_running_average=False)


def test_a_checkpoint_written_on_one_mesh_restores_on_another(reference, tmp_path):
    """Saved FSDP-sharded on 1x8, restored replicated on 8x1 and sharded on 4x2: the same values."""
    init, _, _, _ = reference["global"]
    config = _config("global")
    config.mesh = _mesh_config(1, 8, min_size=256)
    mesh = modeling.make_mesh(config)
    model = modeling.abstract_model(modeling.model_spec(config, _manifest(), mesh), config.seed)
    tx, _ = update.make_optimizer(config)
    abstract = checkpointing.abstract_train_state(model, tx, config.seed, mesh, 256)
    state = jax.device_put(init, jax.tree.map(lambda x: x.sharding, abstract))
    mngr = checkpointing.checkpoint_manager(tmp_path, config)
    checkpointing.save(mngr, 3, state, config, {})
    mngr.wait_until_finished()
    for shape in [(8, 1), (4, 2)]:
        other = modeling.make_mesh(config=ml_collections.ConfigDict({"mesh": _mesh_config(*shape)}))
        target = checkpointing.abstract_train_state(model, tx, config.seed, other, 256)
        restored = checkpointing.restore_state(mngr, 3, target)
        for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(init), jax.tree.leaves(target)):
            assert a.sharding == t.sharding
            np.testing.assert_array_equal(np.asarray(a), b)
    mngr.close()
