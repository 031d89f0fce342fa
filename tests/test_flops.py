"""vljax/flops.py: the jaxpr walker against XLA:CPU's cost analysis and against the closed forms,
the peak table and MFU arithmetic, and `tools/bench.py fit`'s batch search."""

from __future__ import annotations

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from vljax import flops
from vljax.models import bert, two_tower
from vljax.models.resnet3d import ResNet3D

SDS = jax.ShapeDtypeStruct
F32 = jnp.float32
NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def _conv(strides=(1, 1, 1), padding="VALID", groups=1, rhs_dilation=None):
    return lambda x, k: lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=rhs_dilation,
                                                 dimension_numbers=NDHWC, feature_group_count=groups)


# ---------------------------------------------------------------------------------------------------
# (a) Against XLA:CPU, which counts 2 x multiply-adds on real input (so the same without padding).

CASES = {
    "valid 3x3x3": (_conv(), (2, 7, 9, 10, 4), (3, 3, 3, 4, 6)),
    "strided 3x3x3/2": (_conv((2, 2, 2)), (2, 9, 9, 11, 4), (3, 3, 3, 4, 6)),
    "stem-like 3x7x7/1x2x2": (_conv((1, 2, 2)), (1, 5, 17, 17, 1), (3, 7, 7, 1, 8)),
    "grouped (2 groups)": (_conv(groups=2), (2, 6, 7, 8, 4), (3, 3, 3, 2, 6)),
    "depthwise (4 groups)": (_conv(groups=4), (2, 6, 7, 8, 4), (3, 3, 3, 1, 4)),
    "rhs-dilated": (_conv(rhs_dilation=(1, 2, 2)), (1, 6, 11, 11, 3), (3, 3, 3, 3, 5)),
    "batched dot_general": (lambda a, b: jnp.einsum("bmik,bkn->bmin", a, b), (3, 5, 7, 11), (3, 11, 13)),
    "two batch dims, two contracted": (lambda a, b: lax.dot_general(a, b, (((2, 3), (2, 1)), ((0, 1), (0, 3)))),
                                       (2, 3, 4, 5, 6), (2, 5, 4, 3, 7)),
    "matmul": (lambda a, b: a @ b, (17, 19), (19, 23)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counter_equals_xla_cpu_without_padding(name):
    fn, xs, ks = CASES[name]
    args = (SDS(xs, F32), SDS(ks, F32))
    ours = flops.count_flops(fn, *args)
    assert ours > 0 and ours == _xla_flops(fn, *args)


def test_counter_matches_the_formula_and_xla_leaves_out_padding():
    """SAME padding: the counter takes the full kernel at every output (2·out·k³·I), XLA:CPU only the
    taps on real input, fewer by exactly the taps that fall on padding."""
    x, k = SDS((1, 4, 5, 6, 3), F32), SDS((3, 3, 3, 3, 2), F32)
    fn = _conv(padding="SAME")
    assert flops.count_flops(fn, x, k) == 2 * (4 * 5 * 6 * 2) * 27 * 3
    real_taps = math.prod(3 * n - 2 for n in (4, 5, 6))  # per axis, n outputs x 3 taps less the 2 at the edges
    assert _xla_flops(fn, x, k) == 2 * 2 * 3 * real_taps


def test_gradient_of_a_strided_conv_is_three_forwards_as_xla_counts():
    """Value and gradients of a VALID strided conv: forward, weight gradient (rhs-dilated) and input gradient
    (lhs-dilated: only the taps on real input count, not the inserted zeros) = 3 x the forward."""
    fn = _conv((2, 2, 2))
    x, k = SDS((2, 9, 9, 11, 4), F32), SDS((3, 3, 3, 4, 6), F32)
    fwd = flops.count_flops(fn, x, k)

    def value_and_grads(x, k, cotangent):  # no reduction: XLA would count its adds
        y, vjp = jax.vjp(fn, x, k)
        return y, vjp(cotangent)

    ct = SDS(jax.eval_shape(fn, x, k).shape, F32)
    assert flops.count_flops(value_and_grads, x, k, ct) == 3 * fwd == _xla_flops(value_and_grads, x, k, ct)


# ---------------------------------------------------------------------------------------------------
# The walker's control flow.


def test_walker_scales_scan_cond_remat_and_shard_map():
    a = SDS((8, 16), F32)
    mm = 2 * 8 * 16 * 16
    scan = lambda x: lax.scan(lambda c, _: (c @ jnp.ones((16, 16)), None), x, None, length=5)[0]  # noqa: E731
    assert flops.count_flops(scan, a) == 5 * mm
    cond = lambda x: lax.cond(x[0, 0] > 0, lambda x: (x @ jnp.ones((16, 16))) @ jnp.ones((16, 16)),  # noqa: E731
                              lambda x: x @ jnp.ones((16, 16)), x)
    assert flops.count_flops(cond, a) == 2 * mm  # the costlier branch
    remat = jax.checkpoint(lambda x: jnp.sin(x @ jnp.ones((16, 16))))
    assert flops.count_flops(jax.jit(remat), a) == mm
    # grad of sum(sin(x @ w)) w.r.t. x: forward + input gradient, and the forward once more under remat.
    assert flops.count_flops(jax.grad(lambda x: jnp.sum(remat(x))), a) == 3 * mm
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",))
    sm = jax.shard_map(lambda x: x @ jnp.ones((16, 16)), mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    x = SDS((8 * n, 16), F32, sharding=jax.NamedSharding(mesh, P("d")))
    assert flops.count_flops(sm, x) == 2 * (8 * n) * 16 * 16  # per-device body x n devices


# ---------------------------------------------------------------------------------------------------
# (b) The walker against the closed forms.


@pytest.mark.parametrize("depth,conv,channels", [(18, "native", 1), (50, "depth_taps", 1), (50, "native", 3)])
def test_resnet3d_walker_equals_closed_form(depth, conv, channels):
    """Odd volume sizes (the strides' floor), both conv implementations (the walker counts the model's
    math: depth taps are counted as native convs), the one- and three-channel stems."""
    model = nnx.eval_shape(lambda: ResNet3D(depth, width=4, conv=conv, rngs=nnx.Rngs(0)))
    volume = (5, 9, 11)
    x = SDS((2, *volume, channels), F32)
    walked = flops.module_flops(model, lambda m, x: m(x, train=True), x)
    closed = 2 * flops.resnet3d_forward_flops(depth, 4, volume, in_channels=channels)
    assert walked == closed
    if channels == 3:
        assert closed > 2 * flops.resnet3d_forward_flops(depth, 4, volume, in_channels=1)


def test_resnet152_merlin_volume_is_1_25_tflop_one_channel_1_33_three():
    """The published-geometry count: 160x224x224, one-channel stem (vljax) and Merlin's repeated
    three channels (the earlier hand count, 1.33 TF)."""
    one = flops.resnet3d_forward_flops(152, 64, (160, 224, 224), in_channels=1)
    three = flops.resnet3d_forward_flops(152, 64, (160, 224, 224), in_channels=3)
    stem = 2 * (160 * 112 * 112) * 64 * (3 * 7 * 7)  # one input channel's stem
    assert three - one == 2 * stem
    assert round(one / 1e12, 3) == 1.254 and round(three / 1e12, 3) == 1.329


def test_bert_walker_equals_closed_form():
    cfg = bert.BertConfig.tiny(intermediate_size=96)
    model = nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0)))
    ids = SDS((3, 16), jnp.int32)
    walked = flops.module_flops(model, lambda m, i, a: m(i, a), ids, ids)
    assert walked == 3 * flops.bert_forward_flops(cfg, 16)
    h, n = cfg.hidden_size, 16  # the attention products (QK^T, AV) are part of it
    assert walked - 3 * 2 * n * n * h * 2 * cfg.num_hidden_layers == 3 * cfg.num_hidden_layers * (
        2 * n * h * h * 4 + 2 * n * h * cfg.intermediate_size * 2)


@pytest.mark.parametrize("phenotypes", [0, 5])
def test_two_tower_forward_is_image_plus_text_plus_heads(phenotypes):
    spec = two_tower.ModelSpec(image_depth=18, image_width=4, text_init="scratch", text_size="tiny",
                               vocab_size=1000, embed_dim=16, num_phenotypes=phenotypes)
    model = nnx.eval_shape(lambda: two_tower.build_model(spec, nnx.Rngs(0)))
    b, length, volume = 3, 12, (4, 8, 8)
    cfg = spec.text_config()
    batch = {"image": SDS((b, *volume), F32), "input_ids": SDS((b, length), jnp.int32),
             "attention_mask": SDS((b, length), jnp.int32)}
    parts = flops.two_tower_forward_flops(model, batch)
    f, h, e = model.image_tower.num_features, cfg.hidden_size, 16
    assert parts == {"image": b * flops.resnet3d_forward_flops(18, 4, volume),
                     "text": b * flops.bert_forward_flops(cfg, length),
                     "heads": 2 * b * (f + h) * e + 2 * b * f * phenotypes + flops.infonce_flops(b, e)}
    both = flops.module_flops(model, lambda m, x, i, a: (m.encode_image(x, train=True),
                                                         m.encode_text(i, a, train=False)), *batch.values())
    assert both == parts["image"] + parts["text"] + 2 * b * (f + h) * e
    cached = flops.two_tower_forward_flops(model, {"image": batch["image"], "text_pooled": SDS((b, h), F32)})
    assert cached["text"] == 0 and cached["image"] == parts["image"]


# ---------------------------------------------------------------------------------------------------
# (c) Peaks, MFU, the fit search.


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4),
                                       ("NVIDIA H100 PCIe", 756.0), ("TPU v4", 275.0), ("tpu  V4", 275.0),
                                       ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("cpu", None),
                                       ("NVIDIA A100-SXM4-40GB", 312.0)])
def test_peak_by_device_kind(kind, peak):
    assert flops.peak_tflops(kind) == peak


def test_mfu_arithmetic():
    assert flops.achieved_tflops(31.9e12, 0.5) == pytest.approx(63.8)
    assert flops.mfu(494.7e12, 1.0, 989.4) == pytest.approx(0.5)
    assert flops.mfu(3 * 1.254e12 * 8, 0.25, 275.0) == pytest.approx(3 * 1.254 * 8 / 0.25 / 275.0)
    assert flops.mfu(1e12, 1.0, None) is None


def test_fit_search_finds_the_largest_batch_with_few_probes():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    from bench_step import largest_batch

    for limit, cap in [(1, 64), (37, 1000), (64, 1000), (63, 64), (200, 64), (0, 8)]:
        probes = []

        def fits(b):
            probes.append(b)
            return b <= limit

        best, capped = largest_batch(fits, cap)
        assert best == min(limit, cap) and capped == (limit >= cap)
        assert len(probes) <= 2 * math.ceil(math.log2(cap)) + 1 and len(set(probes)) == len(probes)
