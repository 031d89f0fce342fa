"""ResNets over spatial rank 2 or 3 in Flax NNX: one block/stage/norm family for the 2D chest X-ray
tower (`ResNet2D`, torchvision's ResNet) and the I3D-inflated 3D CT tower (`vljax.models.resnet3d`).

Layout is torchvision's ResNet v1.5 (stride on the 3×3 conv of a bottleneck) with every conv of the
model's rank: 3×3(×3) and 1×1(×1) convs with stride s on every spatial axis, a max-pool 3/2/1, and the
rank's stem (`STEMS`: 7×7/2 in 2D, (3,7,7)/(1,2,2) in 3D). Inputs are channels-last (NHWC, NDHWC); a
one-channel image is treated as three identical channels by folding the stem kernel, so ImageNet
weights apply to a replicated grey image (no mean/std normalisation here: that is the input
pipeline's). Parameters are `nnx.Conv` kernels [k…,I,O] and BatchNorm/GroupNorm variables with the
same names in both ranks, so torchvision state dicts map onto either (`torchvision_targets`).

`conv` ("auto", "native", "depth_taps", `vljax/models/conv.py`) picks how 3D convolutions are computed;
depth taps exist only in 3D, so rank 2 always uses the native `lax.conv_general_dilated`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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

# rank -> stem conv (kernel, stride, padding). 3D: I3D inflation of torchvision's 7×7/2, stride 1 in depth.
STEMS: dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    2: ((7, 7), (2, 2), (3, 3)),
    3: ((3, 7, 7), (1, 2, 2), (1, 3, 3)),
}
_SPATIAL = {2: "HW", 3: "DHW"}

# torchvision (kaiming_normal_, fan_out, relu) for conv kernels.
_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def feature_dim(depth: int, width: int = 64) -> int:
    """Size of the pooled feature vector: 8·width·expansion (2048 for ResNet-50/101/152)."""
    kind, _ = RESNET_LAYOUTS[depth]
    return 8 * width * EXPANSION[kind]


def _conv(in_ch: int, out_ch: int, kernel: tuple[int, ...], stride: int | tuple[int, ...],
          padding: tuple[int, ...], *, conv: str, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv of rank len(kernel); `conv` resolved per kind in 3D, native in 2D."""
    stride = (stride,) * len(kernel) if isinstance(stride, int) else tuple(stride)
    impl = "native" if len(kernel) == 2 else resolve_conv(conv, conv_kind(kernel, stride), jax.default_backend())
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
    """3×3(×3) (stride s) → 3×3(×3), identity or 1×1(×1)-conv shortcut; `rank` 2 or 3."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, *, rank: int, norm: Norm, num_groups: int,
                 dtype, conv: str = "auto", bn_slices: int = 1, rngs: nnx.Rngs):
        nk = dict(norm=norm, num_groups=num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)
        ck = dict(conv=conv, dtype=dtype, rngs=rngs)
        k3, p1 = (3,) * rank, (1,) * rank
        self.conv1 = _conv(in_ch, planes, k3, stride, p1, **ck)
        self.norm1 = _norm(planes, **nk)
        self.conv2 = _conv(planes, planes, k3, 1, p1, **ck)
        self.norm2 = _norm(planes, **nk)
        self.downsample = _Downsample(in_ch, planes, stride, rank=rank, conv=conv, **nk) if (
            stride != 1 or in_ch != planes) else None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
        y = _apply_norm(self.norm2, self.conv2(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1×1 → 3×3 (stride s, torchvision v1.5) → 1×1 (×4 channels), plus shortcut; convs of `rank` 2 or 3."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, *, rank: int, norm: Norm, num_groups: int,
                 dtype, conv: str = "auto", bn_slices: int = 1, rngs: nnx.Rngs):
        nk = dict(norm=norm, num_groups=num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)
        ck = dict(conv=conv, dtype=dtype, rngs=rngs)
        k1, k3, p0, p1 = (1,) * rank, (3,) * rank, (0,) * rank, (1,) * rank
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, k1, 1, p0, **ck)
        self.norm1 = _norm(planes, **nk)
        self.conv2 = _conv(planes, planes, k3, stride, p1, **ck)
        self.norm2 = _norm(planes, **nk)
        self.conv3 = _conv(planes, out_ch, k1, 1, p0, **ck)
        self.norm3 = _norm(out_ch, **nk)
        self.downsample = _Downsample(in_ch, out_ch, stride, rank=rank, conv=conv, **nk) if (
            stride != 1 or in_ch != out_ch) else None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
        y = jax.nn.relu(_apply_norm(self.norm2, self.conv2(y), train))
        y = _apply_norm(self.norm3, self.conv3(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return jax.nn.relu(y + shortcut)


class _Downsample(nnx.Module):
    """Shortcut projection: 1×1(×1) conv with stride s, then norm (torchvision `downsample.{0,1}`)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rank: int, norm: Norm, num_groups: int,
                 dtype, conv: str = "auto", bn_slices: int = 1, rngs: nnx.Rngs):
        self.conv = _conv(in_ch, out_ch, (1,) * rank, stride, (0,) * rank, conv=conv, dtype=dtype, rngs=rngs)
        self.norm = _norm(out_ch, norm, num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return _apply_norm(self.norm, self.conv(x), train)


def max_pool(x: jax.Array) -> jax.Array:
    """3×…×3 max-pool, stride 2, padding 1 over every spatial axis of a channels-last batch (padded
    cells never win: -inf), as torch's MaxPool(3, 2, 1)."""
    rank = x.ndim - 2
    pad = [(0, 0)] + [(1, 1)] * rank + [(0, 0)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + (3,) * rank + (1,),
                                 (1,) + (2,) * rank + (1,), pad)


class ResNet(nnx.Module):
    """ResNet over spatial rank 2 or 3: images [B,(D,)H,W,C∈{1,3}] → pooled features
    [B, 8·width·expansion] (fp32). Use the named ranks, `ResNet2D` or `vljax.models.resnet3d.ResNet3D`.

    `norm="batch"` (eps 1e-5, momentum 0.9) or `"group"`; `remat=True` rematerialises every residual
    block in the backward pass; `dtype` is the compute dtype (e.g. bf16), parameters stay fp32;
    `conv` is "auto", "native" or "depth_taps" (3D only); `bn_slices` > 1 computes training
    BatchNorm statistics per slice of the batch (`SlicedBatchNorm`: per device).
    """

    def __init__(self, depth: int = 50, *, rank: int, width: int = 64, norm: Norm = "batch",
                 num_groups: int = 32, remat: bool = False, dtype=jnp.float32, conv: str = "auto",
                 bn_slices: int = 1, rngs: nnx.Rngs):
        if rank not in STEMS:
            raise ValueError(f"rank must be 2 or 3, got {rank}")
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if conv not in CONV_IMPLS:
            raise ValueError(f"conv must be one of {list(CONV_IMPLS)}, got {conv!r}")
        if rank == 2 and conv == "depth_taps":
            raise ValueError("conv='depth_taps' computes 3D convolutions; a 2D ResNet uses native convs")
        kind, blocks = RESNET_LAYOUTS[depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.width, self.norm, self.remat, self.dtype = depth, width, norm, remat, dtype
        self.block_kind, self.conv, self.rank = kind, conv, rank
        self.num_features = feature_dim(depth, width)
        kernel, stride, padding = STEMS[rank]
        self.conv1 = _conv(3, width, kernel, stride, padding, conv=conv, dtype=dtype, rngs=rngs)
        self.norm1 = _norm(width, norm, num_groups, dtype=dtype, rngs=rngs, bn_slices=bn_slices)
        in_ch = width
        for stage, n in enumerate(blocks):
            planes = width * 2**stage
            layer = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layer.append(block_cls(in_ch, planes, stride, rank=rank, norm=norm, num_groups=num_groups,
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
        _, stride, padding = STEMS[self.rank]
        sp = _SPATIAL[self.rank]
        kernel = jnp.sum(self.conv1.kernel[...], axis=-2, keepdims=True).astype(self.dtype)
        return self.conv1.conv_general_dilated(
            x.astype(self.dtype), kernel, window_strides=stride, padding=[(p, p) for p in padding],
            dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"))

    def feature_map(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Final feature map [B, (D/16,) H/32, W/32, C] before global pooling."""
        if x.ndim == self.rank + 1:
            x = x[..., None]
        if x.ndim != self.rank + 2 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected 1 or 3 input channels (N{_SPATIAL[self.rank]}C), got shape {x.shape}")
        x = x.astype(self.dtype)
        x = jax.nn.relu(_apply_norm(self.norm1, self._stem_conv(x), train))
        x = max_pool(x)
        for layer in self.stages:
            for block in layer:
                if self.remat:
                    x = _remat_block(block, x, train)
                else:
                    x = block(x, train=train)
        return x

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        fmap = self.feature_map(x, train=train).astype(jnp.float32)
        return jnp.mean(fmap, axis=tuple(range(1, self.rank + 1)))


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


class ResNet2D(ResNet):
    """torchvision's 2D ResNet (e.g. ResNet-50 for chest X-rays): images [B,H,W] or [B,H,W,C∈{1,3}] →
    pooled features [B, 8·width·expansion] ([B, 2048] for ResNet-50). Stem 7×7/2, max-pool 3×3/2;
    native convs. Fill from torchvision weights with `load_torchvision_2d`."""

    def __init__(self, depth: int = 50, *, width: int = 64, norm: Norm = "batch", num_groups: int = 32,
                 remat: bool = False, dtype=jnp.float32, bn_slices: int = 1, rngs: nnx.Rngs):
        super().__init__(depth, rank=2, width=width, norm=norm, num_groups=num_groups, remat=remat,
                         dtype=dtype, conv="native", bn_slices=bn_slices, rngs=rngs)


# ---------------------------------------------------------------------------------------------------
# torchvision state dicts (conv1, bn1, layer{s}.{i}.conv{k}/bn{k}, layer{s}.0.downsample.{0,1}, fc).


def _norm_targets(norm: nnx.Module, prefix: str) -> dict[str, tuple[nnx.Variable, str]]:
    return {f"{prefix}.weight": (norm.scale, "vector"), f"{prefix}.bias": (norm.bias, "vector"),
            f"{prefix}.running_mean": (norm.mean, "vector"), f"{prefix}.running_var": (norm.var, "vector")}


def torchvision_targets(model: ResNet) -> dict[str, tuple[nnx.Variable, str]]:
    """torchvision state-dict key → (the model's variable it fills, 'conv' or 'vector')."""
    if model.norm != "batch":
        raise ValueError("loading or inflating torchvision weights needs norm='batch' (they carry BatchNorm stats)")
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


def torch_to_hwio(kernel: np.ndarray) -> np.ndarray:
    """torch conv weight [O,I,kH,kW] → flax [kH,kW,I,O]."""
    return np.transpose(kernel, (2, 3, 1, 0))


def describe_torchvision_state(state_dict: Mapping[str, np.ndarray]) -> str:
    """'ResNet-50 of width 64' (or the block counts when they match no standard depth), read from
    the keys and the stem's shape; for error messages."""
    kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
    blocks = []
    for s in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{s}.") and k.split(".")[1].isdigit()}
        blocks.append(max(idx) + 1 if idx else 0)
    depths = [d for d, layout in RESNET_LAYOUTS.items() if layout == (kind, tuple(blocks))]
    name = f"ResNet-{depths[0]}" if depths else f"{kind} ResNet with blocks {tuple(blocks)}"
    stem = state_dict.get("conv1.weight")
    return name if stem is None else f"{name} of width {np.shape(stem)[0]}"


def fill_from_torchvision(model: ResNet, state_dict: Mapping[str, np.ndarray],
                          convert: Callable[[np.ndarray, tuple[int, ...]], np.ndarray], *, strict: bool,
                          verb: str) -> ResNet:
    """Check `state_dict` against `model` (every problem listed at once), then fill the model in place:
    conv weights through `convert(torch weight, kernel shape)`, vectors as they are.

    `fc.*` and `*.num_batches_tracked` are ignored. Missing or mis-shaped keys raise; with `strict`, so
    do unused keys (e.g. ResNet-50 weights into a ResNet-18).
    """
    targets = torchvision_targets(model)
    missing = [k for k in targets if k not in state_dict]
    shape_errors = []
    for key, (var, kind) in targets.items():
        if key not in state_dict:
            continue
        got = tuple(np.shape(state_dict[key]))
        shape = var[...].shape
        want = (shape[-1], shape[-2], shape[-4], shape[-3]) if kind == "conv" else shape  # [O,I,kH,kW]
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
        raise ValueError(f"cannot {verb} into {type(model).__name__}(depth={model.depth}, width={model.width}) "
                         f"(the state dict holds a {describe_torchvision_state(state_dict)}): "
                         + " | ".join(problems))
    for key, (var, kind) in targets.items():
        value = np.asarray(state_dict[key], np.float32)
        if kind == "conv":
            value = convert(value, var[...].shape)
        var[...] = jnp.asarray(value, var[...].dtype)
    return model


def load_torchvision_2d(model: ResNet2D, state_dict: Mapping[str, np.ndarray], *,
                        strict: bool = True) -> ResNet2D:
    """Fill a 2D `model` in place from a torchvision ResNet state dict (numpy arrays, e.g. from
    `load_torchvision_safetensors`), kernels transposed to [kH,kW,I,O]; returns `model`."""
    if model.rank != 2:
        raise ValueError(f"load_torchvision_2d fills a 2D ResNet, got rank {model.rank} "
                         "(inflate_from_torch_2d inflates torchvision weights into ResNet3D)")
    return fill_from_torchvision(model, state_dict, lambda w, shape: torch_to_hwio(w), strict=strict,
                                 verb="load")


def load_torchvision_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a torchvision ResNet state dict saved as `.safetensors` into numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(path))
