"""ResNet3D: inflation against a torchvision-layout 2D ResNet, ResNet-152 layout, norm/remat variants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from torch import nn

from vljax.models.resnet3d import (
    RESNET_LAYOUTS,
    ResNet3D,
    feature_dim,
    inflate_from_torch_2d,
    load_torchvision_safetensors,
)

# ---------------------------------------------------------------------------------------------------
# Reference: torchvision's ResNet (v1.5) written in plain torch.nn with torchvision's module names.


class TorchBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    def __init__(self, depth, width):
        super().__init__()
        kind, blocks = RESNET_LAYOUTS[depth]
        block = TorchBasicBlock if kind == "basic" else TorchBottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        for stage, n in enumerate(blocks):
            planes, layer = width * 2**stage, []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                down = None
                if stride != 1 or in_ch != planes * block.expansion:
                    down = nn.Sequential(nn.Conv2d(in_ch, planes * block.expansion, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * block.expansion))
                layer.append(block(in_ch, planes, stride, down))
                in_ch = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, 10)

    def feature_map(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def random_torch_resnet(depth: int, width: int, seed: int) -> TorchResNet:
    """Random weights and random BatchNorm affine/running stats, eval mode."""
    torch.manual_seed(seed)
    net = TorchResNet(depth, width)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def numpy_state_dict(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def host_initialised(depth: int, width: int, *, seed: int = 0, **kwargs) -> ResNet3D:
    """A ResNet3D with He-normal kernels and default norm parameters drawn on the host.

    Equivalent in distribution to the model's own initialisers, but avoids compiling one random op
    per parameter shape (seconds on XLA:CPU).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet3D(depth, width=width, rngs=nnx.Rngs(0),
                                                                **kwargs)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-2].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def eval_feature_map(model: ResNet3D, x: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, v: nnx.merge(graphdef, s).feature_map(v, train=False))(state, x)


# ---------------------------------------------------------------------------------------------------
# 1. Inflation equivalence.


@pytest.mark.parametrize("depth", [18, 50])
def test_inflated_network_reproduces_2d_network_on_depth_constant_volume(depth):
    # Every inflated kernel is zero off its centre depth slice, so each output depth position reads
    # only its own input position: zero depth-padding is multiplied by zero taps and the max-pool's
    # -inf padding never wins over equal neighbours. Hence *every* depth slice of the final map — and
    # so the global average — equals the 2D network's output, borders included.
    width, depth_slices, size = 8, 20, 32  # final map: depth 20→20→10→5→3→2, 32²→1²
    net2d = random_torch_resnet(depth, width, seed=depth)
    model = host_initialised(depth, width)
    inflate_from_torch_2d(model, numpy_state_dict(net2d))

    image = np.random.default_rng(depth).uniform(0.0, 1.0, (2, size, size)).astype(np.float32)
    with torch.no_grad():
        ref_map = net2d.feature_map(torch.from_numpy(image)[:, None].repeat(1, 3, 1, 1)).numpy()
    ref_map = ref_map.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    volume = np.repeat(image[:, None, :, :, None], depth_slices, axis=1)  # [B, D, H, W, 1]

    fmap = np.asarray(eval_feature_map(model, jnp.asarray(volume)))
    assert fmap.shape == (2, 2, 1, 1, feature_dim(depth, width))
    scale = np.abs(ref_map).max()
    for d in range(fmap.shape[1]):
        np.testing.assert_allclose(fmap[:, d], ref_map, atol=1e-4 * max(scale, 1.0), rtol=0)
    pooled = np.asarray(jnp.mean(fmap, axis=(1, 2, 3)))
    np.testing.assert_allclose(pooled, ref_map.mean(axis=(1, 2)), atol=1e-4 * max(scale, 1.0), rtol=0)
    print(f"depth {depth}: max|3D-2D| = {np.abs(fmap - ref_map[:, None]).max():.2e}, "
          f"max|2D| = {scale:.2f}")


# ---------------------------------------------------------------------------------------------------
# 2. ResNet-152 layout, without executing it.


def test_resnet152_layout_and_feature_map_shape():
    model = nnx.eval_shape(lambda: ResNet3D(152, rngs=nnx.Rngs(0)))
    assert [len(layer) for layer in model.stages] == [3, 8, 36, 3]
    assert model.num_features == feature_dim(152) == 2048

    # Per depth-1 slice, the parameters are torchvision ResNet-152's minus fc: 60,192,808 − 2,049,000.
    params = nnx.state(model, nnx.Param)
    n_2d = 0
    n_kernels = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        shape = leaf.shape
        if len(shape) == 5:
            n_kernels += 1
            n_2d += int(np.prod(shape[1:]))
        else:
            n_2d += int(np.prod(shape))
    assert n_kernels == 151 + 4  # 151 convs on the main path + 4 shortcut projections
    assert n_2d == 58_143_808

    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 160, 224, 224, 1), jnp.float32)
    fmap = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).feature_map(v, train=False), state, x)
    assert fmap.shape == (1, 10, 7, 7, 2048)
    out = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, train=False), state, x)
    assert out.shape == (1, 2048) and out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------
# 3. Norm / remat variants and batch statistics.


def _loss_and_grads(model: ResNet3D, x: jax.Array, train: bool):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(x, train=train)
        return jnp.sum(out**2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, out, grads


def _nnx_loss_and_grads(model: ResNet3D, x: jax.Array, train: bool):
    loss = lambda m, v: jnp.sum(m(v, train=train) ** 2)  # noqa: E731
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model, x)
    return value, nnx.state(model, nnx.BatchStat), grads


@pytest.mark.parametrize("norm,train,style", [("batch", True, "nnx"), ("group", False, "jax")])
def test_remat_does_not_change_values_or_gradients(norm, train, style):
    # "nnx": nnx.value_and_grad inside nnx.jit (batch stats updated in train mode); "jax": parameters
    # split out and merged inside jax.value_and_grad. 4 groups: the final 1-voxel map must not be
    # normalised per channel (that is identically zero).
    x = jax.random.uniform(jax.random.key(1), (2, 8, 16, 16, 1))
    run = _nnx_loss_and_grads if style == "nnx" else _loss_and_grads
    (v0, aux0, g0), (v1, aux1, g1) = [
        run(host_initialised(10, 4, seed=3, norm=norm, num_groups=4, remat=r), x, train) for r in (False, True)]
    assert np.isfinite(v0) and v0 > 0
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), aux0, aux1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(g0))


def test_group_norm_has_no_batch_stats_and_is_batch_independent():
    model = host_initialised(18, 4, norm="group")
    assert not jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    x = jax.random.uniform(jax.random.key(2), (2, 8, 16, 16, 1))
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v, train=True))
    both = f(state, x)
    one = f(state, x[:1])
    np.testing.assert_allclose(both[:1], one, rtol=1e-5, atol=1e-6)


def test_train_mode_batchnorm_updates_running_stats():
    model = host_initialised(18, 4)
    x = jax.random.uniform(jax.random.key(4), (2, 8, 16, 16, 1))
    stem = np.asarray(model._stem_conv(x))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    nnx.jit(lambda m, v: m(v, train=True))(model, x)
    after = nnx.state(model, nnx.BatchStat)
    # Flax momentum 0.9 = PyTorch 0.1: new = 0.9·old + 0.1·batch (old mean 0, old var 1).
    np.testing.assert_allclose(model.norm1.mean[...], 0.1 * stem.mean(axis=(0, 1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(model.norm1.var[...], 0.9 + 0.1 * stem.var(axis=(0, 1, 2, 3)),
                               rtol=1e-5)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)
    assert all(jax.tree.leaves(changed))
    # Eval mode leaves them alone.
    nnx.jit(lambda m, v: m(v, train=False))(model, x)
    jax.tree.map(np.testing.assert_array_equal, after, nnx.state(model, nnx.BatchStat))


def test_bf16_compute_keeps_fp32_params():
    model = nnx.eval_shape(lambda: ResNet3D(18, width=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 8, 16, 16, 1), jnp.float32)
    fmap = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).feature_map(v, train=True), state, x)
    assert fmap.dtype == jnp.bfloat16
    out = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, train=True), state, x)
    assert out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------
# 4. Loader errors.


@pytest.fixture(scope="module")
def resnet18_safetensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18_w4.safetensors"
    sd = numpy_state_dict(random_torch_resnet(18, 4, seed=0))
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(path))
    return path


def test_safetensors_round_trip_loads(resnet18_safetensors):
    sd = load_torchvision_safetensors(resnet18_safetensors)
    assert "layer4.1.bn2.running_var" in sd and "fc.weight" in sd
    model = inflate_from_torch_2d(host_initialised(18, 4), sd)
    kernel = np.asarray(model.layer1[0].conv1.kernel[...])
    assert kernel.shape == (3, 3, 3, 4, 4)
    np.testing.assert_array_equal(kernel[1], sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
    assert not kernel[0].any() and not kernel[2].any()
    np.testing.assert_array_equal(model.layer2[0].downsample.norm.var[...],
                                  sd["layer2.0.downsample.1.running_var"])


def test_missing_key_is_named(resnet18_safetensors):
    sd = load_torchvision_safetensors(resnet18_safetensors)
    del sd["layer3.1.bn2.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys: layer3\.1\.bn2\.running_mean"):
        inflate_from_torch_2d(host_initialised(18, 4), sd)


def test_misshaped_key_is_named(resnet18_safetensors):
    sd = load_torchvision_safetensors(resnet18_safetensors)
    sd["layer2.0.conv1.weight"] = np.zeros((8, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight: expected \(8, 4, 3, 3\)"):
        inflate_from_torch_2d(host_initialised(18, 4), sd)


def test_wrong_depth_or_norm_is_rejected(resnet18_safetensors):
    sd = load_torchvision_safetensors(resnet18_safetensors)
    with pytest.raises(ValueError, match=r"unexpected keys: layer1\.2\.conv1\.weight"):
        inflate_from_torch_2d(host_initialised(18, 4),
                              {**sd, "layer1.2.conv1.weight": sd["layer1.1.conv1.weight"]})
    with pytest.raises(ValueError, match="missing keys: .*layer1.0.conv3.weight"):
        inflate_from_torch_2d(host_initialised(50, 1), sd)
    with pytest.raises(ValueError, match="norm='batch'"):
        inflate_from_torch_2d(host_initialised(18, 4, norm="group"), sd)
