"""I3D-inflated 3D ResNet (Merlin's image tower) in Flax NNX, with 2D ImageNet weight inflation.

Layout follows torchvision's ResNet v1.5 (stride on the 3×3 conv of a bottleneck) with every 2D conv
turned 3D: stem (3,7,7)/(1,2,2), max-pool 3×3×3/2, 3×3×3 and 1×1×1 convs with stride (s,s,s). Inputs
are NDHWC with (D,H,W) = (z,x,y); a one-channel volume is treated as three identical channels, as
Merlin repeats it (no mean/std normalisation). `inflate_from_torch_2d` puts each 2D kernel in the
centre depth slice of its 3D kernel (other slices zero), so a depth-constant volume reproduces the 2D
network slice by slice.

`conv` picks how the 3D convolutions are computed (`vljax/models/conv.py`): "native"
(`lax.conv_general_dilated` in 3D), "depth_taps" (2D convolutions over the depth taps, much faster on
XLA:CPU) or "auto" (by conv kind and `jax.default_backend()`, resolved when the model is built).
Parameters are the same `nnx.Conv` kernels [kD,kH,kW,I,O] whichever is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vljax.models.conv import CONV_IMPLS, conv_function, conv_kind, resolve_conv

Norm = Literal["batch", "group"]

# depth -> (block kind, blocks per stage).
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),   # MedicalNet's 3D ResNet-10; the tiny test config's tower
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: PyTorch momentum 0.1.

# torchvision (kaiming_normal_, fan_out, relu) for conv kernels.
_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def feature_dim(depth: int, width: int = 64) -> int:
    """Size of the pooled feature vector: 8·width·expansion (2048 for ResNet-50/101/152)."""
    kind, _ = RESNET_LAYOUTS[depth]
    return 8 * width * EXPANSION[kind]


def _conv(in_ch: int, out_ch: int, kernel: tuple[int, int, int], stride: int | tuple[int, ...],
          padding: tuple[int, int, int], *, conv: str, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    impl = resolve_conv(conv, conv_kind(kernel, stride), jax.default_backend())
    return nnx.Conv(in_ch, out_ch, kernel, stride, padding=[(p, p) for p in padding], use_bias=False,
                    dtype=dtype, param_dtype=jnp.float32, kernel_init=_conv_init,
                    conv_general_dilated=conv_function(impl), rngs=rngs)


class SlicedBatchNorm(nnx.BatchNorm):
    """BatchNorm whose training-mode statistics are those of each of `slices` equal, consecutive slices
    of the batch ("ghost" batch norm). With the batch split evenly over the devices, slice k is device
    k's examples: per-device statistics, as data parallelism without synchronised BatchNorm computes
    them, while `slices=1` is nn.BatchNorm over the whole (global) batch. The running averages take the
    mean of the slices' statistics; evaluation uses them, so it does not depend on `slices`. Same
    variables as nn.BatchNorm (checkpoints and inflated weights are interchangeable)."""

    def __init__(self, num_features: int, *, slices: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.slices = slices

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        train = not (self.use_running_average if use_running_average is None else use_running_average)
        if not train or self.slices == 1:
            return super().__call__(x, use_running_average=use_running_average, mask=mask)
        if x.shape[0] % self.slices:
            raise ValueError(f"BatchNorm per device: batch {x.shape[0]} is not divisible into {self.slices} slices")
        xs = x.reshape(self.slices, x.shape[0] // self.slices, *x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, xs.ndim - 1))
        mean = xs.mean(axes)                                                   # [slices, C]
        var = jnp.maximum((xs * xs).mean(axes) - mean * mean, 0.0)             # flax's fast variance
        m = self.momentum
        self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean.mean(0))
        self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var.mean(0))
        shape = (self.slices,) + (1,) * len(axes) + (x.shape[-1],)
        y = (xs - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(x.shape).astype(self.dtype or x.dtype)


def _norm(channels: int, norm: Norm, num_groups: int, *, dtype, rngs: nnx.Rngs, bn_slices: int = 1) -> nnx.Module:
    if norm == "batch":
        if bn_slices > 1:
            return SlicedBatchNorm(channels, slices=bn_slices, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                   dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
    if norm == "group":
        # Tiny test widths may not be divisible by 32 groups: use the largest common divisor.
        return nnx.GroupNorm(channels, num_groups=math.gcd(num_groups, channels), epsilon=BN_EPSILON,
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")


def _apply_norm(norm: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
    if isinstance(norm, nnx.BatchNorm):
        return norm(x, use_running_average=not train)
    return norm(x)


class BasicBlock(nnx.Module):
    """3×3×3 (stride s) → 3×3×3, identity or 1×1×1-conv shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, *, norm: Norm, num_groups: int, dtype,
                 conv: str = "auto", bn_slices: int = 1, rngs: nnx.Rngs):
        nk = dict(norm=norm, num_groups=num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)
        ck = dict(conv=conv, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(in_ch, planes, (3, 3, 3), stride, (1, 1, 1), **ck)
        self.norm1 = _norm(planes, **nk)
        self.conv2 = _conv(planes, planes, (3, 3, 3), 1, (1, 1, 1), **ck)
        self.norm2 = _norm(planes, **nk)
        self.downsample = _Downsample(in_ch, planes, stride, conv=conv, **nk) if (
            stride != 1 or in_ch != planes) else None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
        y = _apply_norm(self.norm2, self.conv2(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1×1×1 → 3×3×3 (stride s, torchvision v1.5) → 1×1×1 (×4 channels), plus shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, *, norm: Norm, num_groups: int, dtype,
                 conv: str = "auto", bn_slices: int = 1, rngs: nnx.Rngs):
        nk = dict(norm=norm, num_groups=num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)
        ck = dict(conv=conv, dtype=dtype, rngs=rngs)
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, (1, 1, 1), 1, (0, 0, 0), **ck)
        self.norm1 = _norm(planes, **nk)
        self.conv2 = _conv(planes, planes, (3, 3, 3), stride, (1, 1, 1), **ck)
        self.norm2 = _norm(planes, **nk)
        self.conv3 = _conv(planes, out_ch, (1, 1, 1), 1, (0, 0, 0), **ck)
        self.norm3 = _norm(out_ch, **nk)
        self.downsample = _Downsample(in_ch, out_ch, stride, conv=conv, **nk) if (
            stride != 1 or in_ch != out_ch) else None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
        y = jax.nn.relu(_apply_norm(self.norm2, self.conv2(y), train))
        y = _apply_norm(self.norm3, self.conv3(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return jax.nn.relu(y + shortcut)


class _Downsample(nnx.Module):
    """Shortcut projection: 1×1×1 conv with stride (s,s,s), then norm (torchvision `downsample.{0,1}`)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, norm: Norm, num_groups: int, dtype,
                 conv: str = "auto", bn_slices: int = 1, rngs: nnx.Rngs):
        self.conv = _conv(in_ch, out_ch, (1, 1, 1), stride, (0, 0, 0), conv=conv, dtype=dtype, rngs=rngs)
        self.norm = _norm(out_ch, norm, num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return _apply_norm(self.norm, self.conv(x), train)


def max_pool_3d(x: jax.Array) -> jax.Array:
    """3×3×3 max-pool, stride 2, padding 1 (padded cells never win: -inf), NDHWC."""
    pad = [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 3, 1),
                                 (1, 2, 2, 2, 1), pad)


class ResNet3D(nnx.Module):
    """Inflated 3D ResNet: volume [B,D,H,W,C∈{1,3}] → pooled features [B, 8·width·expansion] (fp32).

    `norm="batch"` (eps 1e-5, momentum 0.9) or `"group"`; `remat=True` rematerialises every residual
    block in the backward pass; `dtype` is the compute dtype (e.g. bf16), parameters stay fp32;
    `conv` is "auto", "native" or "depth_taps" (module docstring); `bn_slices` > 1 computes training
    BatchNorm statistics per slice of the batch (`SlicedBatchNorm`: per device).
    """

    def __init__(self, depth: int = 50, *, width: int = 64, norm: Norm = "batch", num_groups: int = 32,
                 remat: bool = False, dtype=jnp.float32, conv: str = "auto", bn_slices: int = 1,
                 rngs: nnx.Rngs):
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if conv not in CONV_IMPLS:
            raise ValueError(f"conv must be one of {list(CONV_IMPLS)}, got {conv!r}")
        kind, blocks = RESNET_LAYOUTS[depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.width, self.norm, self.remat, self.dtype = depth, width, norm, remat, dtype
        self.block_kind, self.conv = kind, conv
        self.num_features = feature_dim(depth, width)
        self.conv1 = _conv(3, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), conv=conv, dtype=dtype, rngs=rngs)
        self.norm1 = _norm(width, norm, num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)
        in_ch = width
        for stage, n in enumerate(blocks):
            planes = width * 2**stage
            layer = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layer.append(block_cls(in_ch, planes, stride, norm=norm, num_groups=num_groups,
                                       dtype=dtype, conv=conv, bn_slices=bn_slices, rngs=rngs))
                in_ch = planes * block_cls.expansion
            setattr(self, f"layer{stage + 1}", nnx.List(layer))

    @property
    def stages(self) -> tuple[nnx.List, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def _stem_conv(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] == 3:
            return self.conv1(x)
        # Three identical input channels: summing the kernel over its input axis gives the same
        # result (and gradient) at a third of the stem's cost. Same implementation as conv1's.
        kernel = jnp.sum(self.conv1.kernel[...], axis=3, keepdims=True).astype(self.dtype)
        return self.conv1.conv_general_dilated(
            x.astype(self.dtype), kernel, window_strides=(1, 2, 2), padding=[(1, 1), (3, 3), (3, 3)],
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    def feature_map(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Final feature map [B, D/16, H/32, W/32, C] before global pooling."""
        if x.ndim == 4:
            x = x[..., None]
        if x.shape[-1] not in (1, 3):
            raise ValueError(f"expected 1 or 3 input channels (NDHWC), got shape {x.shape}")
        x = x.astype(self.dtype)
        x = jax.nn.relu(_apply_norm(self.norm1, self._stem_conv(x), train))
        x = max_pool_3d(x)
        for layer in self.stages:
            for block in layer:
                if self.remat:
                    x = _remat_block(block, x, train)
                else:
                    x = block(x, train=train)
        return x

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jnp.mean(self.feature_map(x, train=train).astype(jnp.float32), axis=(1, 2, 3))


def _remat_block(block: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
    """Run `block` under `jax.checkpoint`, threading its state (batch stats) explicitly.

    Pure split/merge rather than `nnx.remat`, so it also works when the model was merged inside an
    outer JAX transform (e.g. `jax.value_and_grad` over parameters).
    """
    graphdef, state = nnx.split(block)

    def pure(state, x):
        inner = nnx.merge(graphdef, state)
        return inner(x, train=train), nnx.state(inner)

    y, new_state = jax.checkpoint(pure)(state, x)
    if train:
        nnx.update(block, new_state)
    return y


# ---------------------------------------------------------------------------------------------------
# Inflation of torchvision 2D weights.


def _norm_targets(norm: nnx.Module, prefix: str) -> dict[str, tuple[nnx.Variable, str]]:
    return {f"{prefix}.weight": (norm.scale, "vector"), f"{prefix}.bias": (norm.bias, "vector"),
            f"{prefix}.running_mean": (norm.mean, "vector"), f"{prefix}.running_var": (norm.var, "vector")}


def torchvision_targets(model: ResNet3D) -> dict[str, tuple[nnx.Variable, str]]:
    """torchvision state-dict key → (the model's variable it fills, 'conv' or 'vector')."""
    if model.norm != "batch":
        raise ValueError("inflating torchvision weights needs norm='batch' (they carry BatchNorm stats)")
    targets: dict[str, tuple[nnx.Variable, str]] = {"conv1.weight": (model.conv1.kernel, "conv")}
    targets.update(_norm_targets(model.norm1, "bn1"))
    for s, layer in enumerate(model.stages):
        for i, block in enumerate(layer):
            p = f"layer{s + 1}.{i}"
            n_convs = 3 if isinstance(block, Bottleneck) else 2
            for k in range(1, n_convs + 1):
                targets[f"{p}.conv{k}.weight"] = (getattr(block, f"conv{k}").kernel, "conv")
                targets.update(_norm_targets(getattr(block, f"norm{k}"), f"{p}.bn{k}"))
            if block.downsample is not None:
                targets[f"{p}.downsample.0.weight"] = (block.downsample.conv.kernel, "conv")
                targets.update(_norm_targets(block.downsample.norm, f"{p}.downsample.1"))
    return targets


def inflate_kernel(kernel_2d: np.ndarray, depth: int) -> np.ndarray:
    """[O,I,kH,kW] → [depth,kH,kW,I,O] with the 2D kernel in the centre depth slice, zeros elsewhere."""
    out = np.zeros((depth,) + tuple(np.transpose(kernel_2d, (2, 3, 1, 0)).shape), np.float32)
    out[depth // 2] = np.transpose(kernel_2d, (2, 3, 1, 0))
    return out


def inflate_from_torch_2d(model: ResNet3D, state_dict: Mapping[str, np.ndarray], *,
                          strict: bool = True) -> ResNet3D:
    """Fill `model` in place from a torchvision ResNet state dict (numpy arrays); returns `model`.

    `fc.*` and `*.num_batches_tracked` are ignored. Missing or mis-shaped keys raise (all listed at
    once); with `strict`, so do unused keys (e.g. ResNet-50 weights into a ResNet-18).
    """
    targets = torchvision_targets(model)
    missing = [k for k in targets if k not in state_dict]
    shape_errors = []
    for key, (var, kind) in targets.items():
        if key not in state_dict:
            continue
        got = tuple(np.shape(state_dict[key]))
        shape = var[...].shape
        want = (shape[4], shape[3], shape[1], shape[2]) if kind == "conv" else shape
        if got != want:
            shape_errors.append(f"{key}: expected {want}, got {got}")
    unused = [k for k in state_dict if k not in targets and not k.startswith("fc.")
              and not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if shape_errors:
        problems.append(f"mis-shaped keys: {'; '.join(shape_errors)}")
    if strict and unused:
        problems.append(f"unexpected keys: {', '.join(unused)}")
    if problems:
        raise ValueError(f"cannot inflate into ResNet3D(depth={model.depth}, width={model.width}): "
                         + " | ".join(problems))
    for key, (var, kind) in targets.items():
        value = np.asarray(state_dict[key], np.float32)
        if kind == "conv":
            value = inflate_kernel(value, var[...].shape[0])
        var[...] = jnp.asarray(value, var[...].dtype)
    return model


def load_torchvision_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a torchvision ResNet state dict saved as `.safetensors` into numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(path))
