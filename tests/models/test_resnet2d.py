"""ResNet2D (vljax/models/resnet.py): equality with a torchvision-layout PyTorch ResNet in eval and
train mode, the torchvision loader's checks, and the 3D tower's unchanged parameter tree."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax import lax
from safetensors.numpy import save_file
from torch import nn

from tests.models.test_resnet3d import numpy_state_dict, random_torch_resnet
from vljax.models.resnet import (
    ResNet,
    ResNet2D,
    describe_torchvision_state,
    feature_dim,
    load_torchvision_2d,
    load_torchvision_safetensors,
    torchvision_targets,
)
from vljax.models.resnet3d import ResNet3D, inflate_from_torch_2d


@functools.cache
def _abstract(cls: type, depth: int, width: int, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: cls(depth, width=width, rngs=nnx.Rngs(0), **kwargs)))


def host_model(depth: int, width: int, *, seed: int = 0, cls=ResNet2D, **kwargs) -> ResNet:
    """A model with He-normal kernels and default norm parameters drawn on the host as jax arrays
    (no per-shape random-init compiles)."""
    graphdef, state = _abstract(cls, depth, width, **kwargs)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-2].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), jnp.float32)
        return (jnp.ones if name in ("scale", "var") else jnp.zeros)(leaf.shape, jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _state_dict(depth: int, width: int, seed: int) -> dict[str, np.ndarray]:
    return {k: v for k, v in numpy_state_dict(random_torch_resnet(depth, width, seed)).items()
            if not k.endswith("num_batches_tracked")}


def _eval_forward(model: ResNet, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(feature map, pooled features) in eval mode, run eagerly: the second call and the other channel
    count reuse the compiled ops, where jit would compile a whole network per function and shape."""
    fmap, pooled = model.feature_map(jnp.asarray(x), train=False), model(jnp.asarray(x), train=False)
    np.testing.assert_allclose(pooled, jnp.mean(fmap, axis=(1, 2)), rtol=1e-6, atol=1e-7)
    return np.asarray(fmap), np.asarray(pooled)


def _close(got, want, rel):
    """|got − want| ≤ rel · max(max|want|, 1) everywhere (float32 summation order)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(np.abs(want).max(), 1.0))


# ---------------------------------------------------------------------------------------------------
# 1. Equality with the PyTorch reference, eval mode, weights through a safetensors file.


@pytest.mark.parametrize("depth,width", [(18, 8), (50, 4)])
def test_eval_features_equal_torchvision_layout_resnet(depth, width, tmp_path):
    net = random_torch_resnet(depth, width, seed=depth)
    path = tmp_path / f"resnet{depth}.safetensors"
    save_file(numpy_state_dict(net), str(path))  # with fc.* and num_batches_tracked, as torchvision saves
    model = load_torchvision_2d(host_model(depth, width, seed=1), load_torchvision_safetensors(path))
    assert model.num_features == feature_dim(depth, width)

    rng = np.random.default_rng(depth)
    grey = rng.uniform(0.0, 1.0, (2, 64, 64)).astype(np.float32)          # [B, H, W]: one channel
    colour = rng.uniform(-1.0, 1.0, (2, 64, 64, 3)).astype(np.float32)    # [B, H, W, 3]
    for x, x_torch in ((grey, np.repeat(grey[:, None], 3, axis=1)), (colour, colour.transpose(0, 3, 1, 2))):
        with torch.no_grad():
            ref = net.feature_map(torch.from_numpy(np.ascontiguousarray(x_torch))).numpy().transpose(0, 2, 3, 1)
        fmap, pooled = _eval_forward(model, x)
        assert fmap.shape == (2, 2, 2, feature_dim(depth, width))
        assert np.abs(ref).max() > 0.1  # a live signal, not a vanishing one
        _close(fmap, ref, 1e-5)
        _close(pooled, ref.mean(axis=(1, 2)), 1e-5)
        print(f"ResNet-{depth} w{width} C={x.shape[-1] if x.ndim == 4 else 1}: "
              f"max|jax-torch| = {np.abs(fmap - ref).max():.1e}, max|torch| = {np.abs(ref).max():.2f}")


# ---------------------------------------------------------------------------------------------------
# 2. Train mode: outputs and BatchNorm updates against torch's train mode.


def test_train_mode_batchnorm_equals_torch_train_mode():
    depth, width = 18, 8
    net = random_torch_resnet(depth, width, seed=7)
    model = load_torchvision_2d(host_model(depth, width), numpy_state_dict(net))
    old = {k: v for k, v in numpy_state_dict(net).items() if "running" in k}
    counts = {}  # BatchNorm name → values per channel in its input (batch × positions)

    def count(module: nn.Module, inputs: tuple, output, *, name: str) -> None:
        counts[name] = inputs[0].numel() // inputs[0].shape[1]

    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda *a, name=name: count(*a, name=name))
    x = np.random.default_rng(7).uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net.train().feature_map(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    fmap = model.feature_map(jnp.asarray(x), train=True)  # eagerly, updating the model's batch stats
    _close(fmap, ref.transpose(0, 2, 3, 1), 2e-4)  # statistics over 8 values at layer4 amplify rounding
    got = {k: np.asarray(var[...]) for k, (var, _) in torchvision_targets(model).items() if "running" in k}
    new = {k: v for k, v in numpy_state_dict(net).items() if "running" in k}
    assert set(got) == set(new) and len(got) == 2 * (1 + 8 * 2 + 3)  # 20 BatchNorms: mean and var each
    for key in new:
        assert not np.allclose(new[key], old[key])  # torch did update it
        if key.endswith("running_mean"):
            _close(got[key], new[key], 1e-4)
        else:
            # torch updates running_var with the unbiased (n/(n−1)) batch variance, flax with the
            # biased one (the variance both normalise with): undo Bessel's correction on torch's update.
            n = counts[key.removesuffix(".running_var")]
            want = 0.9 * old[key] + (new[key] - 0.9 * old[key]) * (n - 1) / n
            _close(got[key], want, 1e-4)
    assert min(counts.values()) == 8  # 2 images × 2×2: Bessel's factor 8/7 matters


# ---------------------------------------------------------------------------------------------------
# 3. The loader's checks.


@pytest.fixture(scope="module")
def resnet18_w4() -> dict[str, np.ndarray]:
    return _state_dict(18, 4, seed=0)


def test_loaded_kernels_are_torch_weights_transposed(resnet18_w4):
    model = load_torchvision_2d(host_model(18, 4), resnet18_w4)
    np.testing.assert_array_equal(model.conv1.kernel[...], resnet18_w4["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.layer3[0].downsample.conv.kernel[...],
                                  resnet18_w4["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.layer4[1].norm2.var[...], resnet18_w4["layer4.1.bn2.running_var"])
    assert describe_torchvision_state(resnet18_w4) == "ResNet-18 of width 4"


def test_wrong_depth_is_refused_with_both_architectures_named(resnet18_w4):
    model = host_model(50, 4)
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=r"cannot load into ResNet2D\(depth=50, width=4\) \(the state dict "
                                         r"holds a ResNet-18 of width 4\): missing keys: .*layer1\.0\.conv3\.weight"):
        load_torchvision_2d(model, resnet18_w4)
    jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model))  # refused before any copy
    with pytest.raises(ValueError, match=r"holds a ResNet-50 of width 8\).*unexpected keys: layer1\.0\.conv3"):
        load_torchvision_2d(host_model(18, 8), _state_dict(50, 8, seed=0))


def test_wrong_width_is_refused_with_both_widths_named(resnet18_w4):
    with pytest.raises(ValueError, match=r"ResNet2D\(depth=18, width=8\) \(the state dict holds a ResNet-18 of "
                                         r"width 4\): mis-shaped keys: conv1\.weight: expected \(8, 3, 7, 7\), "
                                         r"got \(4, 3, 7, 7\)"):
        load_torchvision_2d(host_model(18, 8), resnet18_w4)


def test_wrong_rank_or_norm_is_refused(resnet18_w4):
    with pytest.raises(ValueError, match="load_torchvision_2d fills a 2D ResNet, got rank 3"):
        load_torchvision_2d(host_model(10, 4, cls=ResNet3D), resnet18_w4)
    with pytest.raises(ValueError, match="inflate_from_torch_2d fills a 3D ResNet, got rank 2"):
        inflate_from_torch_2d(host_model(18, 4), resnet18_w4)
    with pytest.raises(ValueError, match="norm='batch'"):
        load_torchvision_2d(host_model(18, 4, norm="group"), resnet18_w4)
    with pytest.raises(ValueError, match="depth_taps"):
        ResNet(18, rank=2, width=4, conv="depth_taps", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------------
# 4. One family: the 2D tower's layout, and the 3D tower's parameter tree as it was before the 2D tower.


def test_resnet50_2d_is_torchvision_resnet50_without_fc():
    model = nnx.eval_shape(lambda: ResNet2D(50, rngs=nnx.Rngs(0)))
    assert [len(layer) for layer in model.stages] == [3, 4, 6, 3] and model.num_features == 2048
    # torchvision resnet50: 25,557,032 parameters, of which fc has 2048·1000 + 1000.
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == 25_557_032 - 2_049_000
    assert model.conv1.kernel.shape == (7, 7, 3, 64) and model.layer2[0].conv2.strides == (2, 2)
    # Native 2D convolutions whatever the backend ("auto" would pick depth taps for 3D kinds on CPU).
    assert {m.conv_general_dilated for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)} == {
        lax.conv_general_dilated}
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, train=False), state,
                         jax.ShapeDtypeStruct((2, 224, 224), jnp.float32))
    assert out.shape == (2, 2048) and out.dtype == jnp.float32


# `nnx.state(ResNet3D(10, width=4))` as git 8aefb4e built it, before the family moved to resnet.py:
# "path type shape" per variable. Checkpoints and inflated weights depend on exactly this tree.
RESNET3D_10_W4 = """
conv1.kernel Param 3,7,7,3,4
layer1.0.conv1.kernel Param 3,3,3,4,4
layer1.0.conv2.kernel Param 3,3,3,4,4
layer1.0.norm1.bias Param 4
layer1.0.norm1.mean BatchStat 4
layer1.0.norm1.scale Param 4
layer1.0.norm1.var BatchStat 4
layer1.0.norm2.bias Param 4
layer1.0.norm2.mean BatchStat 4
layer1.0.norm2.scale Param 4
layer1.0.norm2.var BatchStat 4
layer2.0.conv1.kernel Param 3,3,3,4,8
layer2.0.conv2.kernel Param 3,3,3,8,8
layer2.0.downsample.conv.kernel Param 1,1,1,4,8
layer2.0.downsample.norm.bias Param 8
layer2.0.downsample.norm.mean BatchStat 8
layer2.0.downsample.norm.scale Param 8
layer2.0.downsample.norm.var BatchStat 8
layer2.0.norm1.bias Param 8
layer2.0.norm1.mean BatchStat 8
layer2.0.norm1.scale Param 8
layer2.0.norm1.var BatchStat 8
layer2.0.norm2.bias Param 8
layer2.0.norm2.mean BatchStat 8
layer2.0.norm2.scale Param 8
layer2.0.norm2.var BatchStat 8
layer3.0.conv1.kernel Param 3,3,3,8,16
layer3.0.conv2.kernel Param 3,3,3,16,16
layer3.0.downsample.conv.kernel Param 1,1,1,8,16
layer3.0.downsample.norm.bias Param 16
layer3.0.downsample.norm.mean BatchStat 16
layer3.0.downsample.norm.scale Param 16
layer3.0.downsample.norm.var BatchStat 16
layer3.0.norm1.bias Param 16
layer3.0.norm1.mean BatchStat 16
layer3.0.norm1.scale Param 16
layer3.0.norm1.var BatchStat 16
layer3.0.norm2.bias Param 16
layer3.0.norm2.mean BatchStat 16
layer3.0.norm2.scale Param 16
layer3.0.norm2.var BatchStat 16
layer4.0.conv1.kernel Param 3,3,3,16,32
layer4.0.conv2.kernel Param 3,3,3,32,32
layer4.0.downsample.conv.kernel Param 1,1,1,16,32
layer4.0.downsample.norm.bias Param 32
layer4.0.downsample.norm.mean BatchStat 32
layer4.0.downsample.norm.scale Param 32
layer4.0.downsample.norm.var BatchStat 32
layer4.0.norm1.bias Param 32
layer4.0.norm1.mean BatchStat 32
layer4.0.norm1.scale Param 32
layer4.0.norm1.var BatchStat 32
layer4.0.norm2.bias Param 32
layer4.0.norm2.mean BatchStat 32
layer4.0.norm2.scale Param 32
layer4.0.norm2.var BatchStat 32
norm1.bias Param 4
norm1.mean BatchStat 4
norm1.scale Param 4
norm1.var BatchStat 4
"""


def _stored_tree(text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    rows = (line.split() for line in text.strip().splitlines())
    return {path: (kind, tuple(int(d) for d in shape.split(","))) for path, kind, shape in rows}


def _tree(model: nnx.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
    return {".".join(str(getattr(k, "key", k)) for k in path): (type(v).__name__, tuple(v.shape))
            for path, v in leaves}


def test_3d_parameter_tree_is_unchanged_and_2d_tree_is_its_slice():
    tree3 = _tree(nnx.eval_shape(lambda: ResNet3D(10, width=4, rngs=nnx.Rngs(0))))
    stored = _stored_tree(RESNET3D_10_W4)
    assert len(stored) == 60
    assert tree3 == stored
    # The same module family: the 2D tree has the same paths, kernels without their depth axis.
    tree2 = _tree(nnx.eval_shape(lambda: ResNet2D(10, width=4, rngs=nnx.Rngs(0))))
    assert tree2 == {k: (t, s[1:] if len(s) == 5 else s) for k, (t, s) in tree3.items()}


# ---------------------------------------------------------------------------------------------------
# 5. Variants shared with the 3D tower.


def test_bf16_compute_and_input_checks_in_2d():
    # remat shares `_remat_block` with the 3D tower (tests/models/test_resnet3d.py).
    model = nnx.eval_shape(lambda: ResNet2D(10, width=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    fmap = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).feature_map(v, train=True), state,
                          jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
    assert fmap.dtype == jnp.bfloat16 and fmap.shape == (1, 1, 1, 32)
    with pytest.raises(ValueError, match=r"expected 1 or 3 input channels \(NHWC\)"):
        jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, train=False), state,
                       jax.ShapeDtypeStruct((1, 32, 32, 2), jnp.float32))
