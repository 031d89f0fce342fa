"""Analytic model FLOPs: a jaxpr walker, closed forms for the towers, and MFU against device peaks.

XLA's cost analysis is no FLOP count to report: on GPU it leaves out convolutions lowered to cuDNN
custom calls (0.36 TF printed for an image step of ~31.9 TF), and on CPU it counts a convolution's
multiply-adds on real input only, not on padding. The convention here is the usual analytic one:
FLOPs = 2 x multiply-adds of convolutions and matrix products, a kernel's full extent counted at every
output position (padding included); elementwise work, norms, softmax and pooling are not counted.

`jaxpr_flops` walks a jaxpr (recursing into jit, remat, custom_jvp/vjp, shard_map x its devices,
scan x length, cond = its costliest branch, while = one trip) and counts `conv_general_dilated` and
`dot_general`. `resnet3d_forward_flops` and `bert_forward_flops` count the towers from their shapes
alone, so the two can check each other. A train step's model FLOPs are 3 x the forward's (forward,
gradient of activations, gradient of weights); rematerialisation's recompute is not model work and
is left out: walking the jaxpr of the whole step counts what the program issues, recompute included.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax import lax
from jax.extend import core

from vljax.models.resnet3d import EXPANSION, RESNET_LAYOUTS

# ---------------------------------------------------------------------------------------------------
# Jaxpr walker


def _conv_taps(n_in: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int, n_out: int) -> int:
    """(output position, kernel tap) pairs along one spatial axis. Undilated input: all of them
    (padding included). An lhs-dilated (transposed) convolution, as autodiff emits for the input
    gradient of a strided one: only taps on real input, not on the zeros it inserts or pads."""
    if lhs_dil == 1:
        return n_out * k
    last = (n_in - 1) * lhs_dil
    return sum(1 for o in range(n_out) for t in range(k)
               if 0 <= (q := o * stride + t * rhs_dil - pad_lo) <= last and q % lhs_dil == 0)


def conv_flops(eqn: core.JaxprEqn) -> int:
    """2 x multiply-adds of a `conv_general_dilated` equation: output batch x output features x the
    kernel taps met at each output position x input features per group."""
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    ndim = len(lhs_spec) - 2
    lhs_dil = p["lhs_dilation"] or (1,) * ndim
    rhs_dil = p["rhs_dilation"] or (1,) * ndim
    taps = 1
    for i in range(ndim):
        taps *= _conv_taps(lhs.shape[lhs_spec[2 + i]], rhs.shape[rhs_spec[2 + i]], p["window_strides"][i],
                           p["padding"][i][0], lhs_dil[i], rhs_dil[i], out.shape[out_spec[2 + i]])
    return 2 * out.shape[out_spec[0]] * out.shape[out_spec[1]] * taps * rhs.shape[rhs_spec[1]]


def dot_flops(eqn: core.JaxprEqn) -> int:
    """2 x multiply-adds of a `dot_general` equation: 2 x (batch x free dims) x contracted size."""
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _shard_map_devices(params: Mapping[str, Any]) -> int:
    """How many devices run a shard_map body (its shapes are per device): the newly manual axes."""
    mesh = params["mesh"]
    axes = params.get("newly_manual_axes", params.get("manual_axes", mesh.axis_names))
    return math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes)


def jaxpr_flops(jaxpr: core.Jaxpr | core.ClosedJaxpr) -> int:
    """FLOPs of the convolutions and matrix products a jaxpr issues, over all devices (a shard_map
    body counts once per device); a while loop counts one trip (its trip count is not static)."""
    if isinstance(jaxpr, core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += conv_flops(eqn)
        elif name == "dot_general":
            total += dot_flops(eqn)
        else:
            subs = [jaxpr_flops(j) for j in core.jaxprs_in_params(eqn.params)]
            if name == "cond":
                total += max(subs, default=0)
            elif name == "scan":
                total += eqn.params["length"] * sum(subs)
            elif name == "shard_map":
                total += _shard_map_devices(eqn.params) * sum(subs)
            else:
                total += sum(subs)
    return total


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """`jaxpr_flops` of `fn(*args, **kwargs)`; arrays may be abstract (`jax.ShapeDtypeStruct`)."""
    return jaxpr_flops(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args))


# ---------------------------------------------------------------------------------------------------
# NNX models


def use_native_convs(module) -> None:
    """Point every `nnx.Conv` of `module` at `lax.conv_general_dilated`: the model's math, whichever
    implementation it was built with (depth taps drop taps that read only padding)."""
    from flax import nnx

    for _, m in nnx.iter_graph(module):
        if isinstance(m, nnx.Conv):
            m.conv_general_dilated = lax.conv_general_dilated


def module_flops(module, method: Callable, *args) -> int:
    """FLOPs of `method(module, *args)` with native convolutions; `module` may be abstract
    (`nnx.eval_shape`) and is left untouched."""
    from flax import nnx

    graphdef, state = nnx.split(module)

    def run(state, *args):
        m = nnx.merge(graphdef, state)
        use_native_convs(m)
        return method(m, *args)

    return count_flops(run, state, *args)


def infonce_flops(batch: int, dim: int) -> int:
    """The two [B, E] x [E, B] logit products of the symmetric InfoNCE loss."""
    return 2 * 2 * batch * batch * dim


def two_tower_forward_flops(model, batch: Mapping[str, Any]) -> dict[str, int]:
    """Forward FLOPs of one training batch (`inputs.batch_spec` keys) through a `TwoTower`, split as
    {image, text, heads}: image = the image tower; text = what the step runs of the text side (the
    tower on "input_ids", a trainable pooling on a locked tower's cached "text_hidden", nothing on
    cached "text_pooled" features); heads = projections, phenotype head and the InfoNCE logits."""
    sds = jax.ShapeDtypeStruct
    b = batch["image"].shape[0]
    out = {"image": module_flops(model, lambda m, x: m.image_features(x, train=True), batch["image"])}
    if "input_ids" in batch:
        out["text"] = module_flops(model, lambda m, i, a: m.text_features(i, a, train=False),
                                   batch["input_ids"], batch["attention_mask"])
    elif "text_hidden" in batch:
        out["text"] = module_flops(model, lambda m, h, a: m.pool_text(h, a), batch["text_hidden"],
                                   batch["attention_mask"])
    else:
        out["text"] = 0
    feats = sds((b, model.image_tower.num_features), "float32")
    txt = sds((b, model.text_tower.config.hidden_size), "float32")

    def heads(m, f, t):
        y = (m.embed_image_features(f, train=True), m.embed_text_features(t))
        return y + ((m.phenotype_logits(f),) if m.phenotype_head is not None else ())

    out["heads"] = module_flops(model, heads, feats, txt) + infonce_flops(b, model.image_proj.out_features)
    return out


# ---------------------------------------------------------------------------------------------------
# Closed forms


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def resnet3d_forward_flops(depth: int, width: int, volume: tuple[int, int, int], in_channels: int = 1) -> int:
    """Forward FLOPs of one (D, H, W) volume through `ResNet3D(depth, width)`, padding included.
    vljax feeds one-channel volumes and sums the stem kernel over its three input channels (a third
    of the stem); `in_channels=3` counts the stem as Merlin's repeated-channel input runs it."""
    kind, blocks = RESNET_LAYOUTS[depth]
    size = tuple(_conv_out(n, k, s, p) for n, k, s, p in zip(volume, (3, 7, 7), (1, 2, 2), (1, 3, 3)))
    flops = 2 * math.prod(size) * width * 3 * 7 * 7 * in_channels
    size = tuple(_conv_out(n, 3, 2, 1) for n in size)  # max-pool
    in_ch = width

    def conv(n_out: tuple[int, ...], k: int, c_in: int, c_out: int) -> int:
        return 2 * math.prod(n_out) * k ** 3 * c_in * c_out

    for stage, n in enumerate(blocks):
        planes = width * 2 ** stage
        out_ch = planes * EXPANSION[kind]
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            out = tuple(_conv_out(v, 3, stride, 1) for v in size)
            if kind == "bottleneck":
                flops += conv(size, 1, in_ch, planes) + conv(out, 3, planes, planes) + conv(out, 1, planes, out_ch)
            else:
                flops += conv(out, 3, in_ch, planes) + conv(out, 3, planes, planes)
            if stride != 1 or in_ch != out_ch:
                flops += conv(out, 1, in_ch, out_ch)  # the projection shortcut
            size, in_ch = out, out_ch
    return flops


def bert_forward_flops(config, seq_len: int) -> int:
    """Forward FLOPs of one sequence of `seq_len` tokens (padding included: it is computed) through
    a `BertConfig`'s encoder: Q, K, V and output projections, QK^T and AV, the MLP (the embedding
    lookups are gathers, not products)."""
    h, i, n = config.hidden_size, config.intermediate_size, seq_len
    per_layer = 2 * n * h * h * 4 + 2 * n * n * h * 2 + 2 * n * h * i * 2
    return config.num_hidden_layers * per_layer


# ---------------------------------------------------------------------------------------------------
# Peaks and MFU

# Dense bf16 peak TFLOP/s per chip, by a substring of `jax.Device.device_kind` (the longest matching
# key wins: "TPU v5 lite" before "TPU v5", "H100 PCIe" before "H100"). Vendors' data sheets.
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.4,        # "NVIDIA H200"; GH200 too
    "H100": 989.4,        # SXM: "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5": 459.0,       # v5p
    "TPU v6 lite": 918.0,  # v6e (Trillium)
}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of a device kind (`PEAK_TFLOPS`), None when unknown (e.g. a CPU)."""
    kind = " ".join(device_kind.lower().split())
    hits = [k for k in PEAK_TFLOPS if k.lower() in kind]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def achieved_tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def mfu(flops_per_device: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s of one device over its peak (TFLOP/s); None without a peak."""
    if not peak:
        return None
    return achieved_tflops(flops_per_device, seconds) / peak
