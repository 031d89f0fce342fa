"""3D convolutions as 2D convolutions over the depth taps (vljax/models/conv.py) against
`lax.conv_general_dilated`: values and gradients, inside ResNet3D, and the "auto" choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from configs import merlin
from tests.models.test_resnet3d import host_initialised
from vljax.models.conv import (
    CPU_DEPTH_TAPS_KINDS,
    conv3d_depth_taps,
    conv_kind,
    depth_taps_conv_general_dilated,
    resolve_conv,
)
from vljax.models.resnet3d import ResNet3D
from vljax.models.two_tower import ModelSpec, build_model

NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def _native(x, k, strides, padding):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NDHWC)


def _value_and_grads(conv, x, k, strides, padding, cotangent):
    """conv(x, k) and the gradients of <conv(x, k), cotangent> w.r.t. x and k, jitted."""
    f = lambda x, k: conv(x, k, strides, padding)  # noqa: E731
    y = jax.jit(f)(x, k)
    gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * cotangent), (0, 1)))(x, k)
    return y, gx, gk


def _close(got, want, rel=2e-6):
    """Equal up to float32 summation order: |got − want| ≤ rel · max|want| everywhere."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(np.abs(want).max(), 1e-30))


# (x shape [N,D,H,W,I], kernel shape [kD,kH,kW,I,O], strides, padding pairs)
CASES = {
    "3x3x3 s1 pad1 odd": ((2, 5, 7, 9, 3), (3, 3, 3, 3, 4), (1, 1, 1), [(1, 1)] * 3),
    "3x3x3 s2 pad1 odd": ((2, 5, 7, 9, 3), (3, 3, 3, 3, 4), (2, 2, 2), [(1, 1)] * 3),
    "3x3x3 s1 pad0": ((3, 5, 6, 7, 2), (3, 3, 3, 2, 5), (1, 1, 1), [(0, 0)] * 3),
    "stem 3x7x7 s(1,2,2) pad(1,3,3)": ((2, 6, 9, 8, 1), (3, 7, 7, 1, 4), (1, 2, 2), [(1, 1), (3, 3), (3, 3)]),
    "kD7 s(2,1,2) asymmetric": ((2, 9, 8, 9, 2), (7, 3, 3, 2, 4), (2, 1, 2), [(0, 2), (1, 0), (2, 1)]),
    "kD7 s1 pad3": ((2, 5, 6, 5, 2), (7, 3, 3, 2, 3), (1, 1, 1), [(3, 3), (1, 1), (1, 1)]),
    "1x1x1 s2 (matmul)": ((2, 5, 7, 9, 3), (1, 1, 1, 3, 4), (2, 2, 2), [(0, 0)] * 3),
    "1x1x1 s1 (matmul)": ((2, 3, 4, 5, 6), (1, 1, 1, 6, 4), (1, 1, 1), [(0, 0)] * 3),
    "kD1 3x3 depth stride 2": ((2, 7, 6, 5, 3), (1, 3, 3, 3, 4), (2, 1, 1), [(0, 0), (1, 1), (1, 1)]),
    "kD1 padded depth": ((2, 5, 6, 5, 3), (1, 3, 3, 3, 2), (1, 2, 1), [(1, 2), (0, 1), (1, 0)]),
    "one slice: outer taps dropped": ((2, 1, 3, 3, 2), (3, 3, 3, 2, 4), (1, 1, 1), [(1, 1)] * 3),
    "non-adjacent taps kept": ((2, 1, 3, 3, 2), (3, 3, 3, 2, 4), (2, 1, 1), [(2, 2), (1, 1), (1, 1)]),
    "negative depth padding crops": ((2, 6, 5, 4, 3), (3, 1, 1, 3, 4), (2, 2, 3), [(-1, 2), (0, 0), (0, 0)]),
    # Output planes of <= MATMUL_MAX_PLANE positions: all taps stacked, one matrix product.
    "2x2 plane (matmul)": ((2, 3, 2, 2, 4), (3, 3, 3, 4, 5), (1, 1, 1), [(1, 1)] * 3),
    "1x1 plane s2, in-plane taps dropped": ((2, 2, 2, 2, 3), (3, 3, 3, 3, 4), (2, 2, 2), [(1, 1)] * 3),
    "non-adjacent in-plane taps": ((2, 3, 1, 1, 2), (3, 3, 3, 2, 3), (1, 2, 2), [(1, 1), (2, 2), (2, 2)]),
    "1x1x1 with in-plane padding": ((2, 3, 4, 5, 3), (1, 1, 1, 3, 4), (1, 1, 1), [(0, 0), (1, 0), (0, 2)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_depth_taps_equal_native_values_and_gradients(case):
    x_shape, k_shape, strides, padding = CASES[case]
    rng = np.random.default_rng(list(CASES).index(case))
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    want_shape = jax.eval_shape(lambda: _native(x, k, strides, padding)).shape
    cot = jnp.asarray(rng.standard_normal(want_shape), jnp.float32)
    want = _value_and_grads(_native, x, k, strides, padding, cot)
    got = _value_and_grads(conv3d_depth_taps, x, k, strides, padding, cot)
    assert np.abs(np.asarray(want[0])).max() > 0.1  # a real convolution, not zeros against zeros
    for g, w in zip(got, want):
        _close(g, w)


def test_all_taps_in_padding_gives_zeros_and_zero_gradients():
    # D=1, depth stride 2, padding (1,1): output depth 2, and both outputs read only padding.
    x = jnp.ones((2, 1, 4, 4, 3))
    k = jnp.ones((1, 3, 3, 3, 5))
    args = ((2, 1, 1), [(1, 1), (1, 1), (1, 1)])
    want = _native(x, k, *args)
    got = conv3d_depth_taps(x, k, *args)
    assert got.shape == want.shape == (2, 2, 4, 4, 5) and not np.asarray(want).any()
    np.testing.assert_array_equal(got, want)
    gk = jax.grad(lambda k: jnp.sum(conv3d_depth_taps(x, k, *args)))(k)
    assert gk.shape == k.shape and not np.asarray(gk).any()


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_drop_in_accepts_string_padding_and_nnx_dimension_numbers(padding):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 6, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, NDHWC)  # what nnx.Conv passes
    _close(depth_taps_conv_general_dilated(x, k, (2, 1, 2), padding, dimension_numbers=dn),
           _native(x, k, (2, 1, 2), padding))


def test_drop_in_falls_back_to_lax_for_what_it_does_not_decompose():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 6, 7, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)
    grouped = dict(dimension_numbers=NDHWC, feature_group_count=2)
    np.testing.assert_array_equal(
        depth_taps_conv_general_dilated(x, k, (1, 1, 1), [(1, 1)] * 3, **grouped),
        lax.conv_general_dilated(x, k, (1, 1, 1), [(1, 1)] * 3, **grouped))
    k4 = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 4)), jnp.float32)
    dilated = dict(rhs_dilation=(2, 1, 1), dimension_numbers=NDHWC)
    np.testing.assert_array_equal(
        depth_taps_conv_general_dilated(x, k4, (1, 1, 1), [(2, 2), (1, 1), (1, 1)], **dilated),
        lax.conv_general_dilated(x, k4, (1, 1, 1), [(2, 2), (1, 1), (1, 1)], **dilated))
    x2, k2 = x[:, 0], k4[0]  # a 2D convolution
    np.testing.assert_array_equal(
        depth_taps_conv_general_dilated(x2, k2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        lax.conv_general_dilated(x2, k2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))


# ---------------------------------------------------------------------------------------------------
# Inside ResNet3D.


def _conv_fns(model: nnx.Module) -> set:
    return {m.conv_general_dilated for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)}


def _with_conv(model: ResNet3D, conv: str) -> ResNet3D:
    """The same parameters and batch statistics (as jax arrays) in a ResNet3D built with `conv`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ResNet3D(
        model.depth, width=model.width, norm=model.norm, conv=conv, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, nnx.state(model)))


def _features_and_grads(model: ResNet3D, x: jax.Array, train: bool):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        out = m(x, train=train)
        return jnp.sum(out**2), (out, nnx.state(m, nnx.BatchStat))

    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, stats, grads


def _compare(got, want, rel):
    (out1, stats1, g1), (out0, stats0, g0) = got, want
    assert np.abs(np.asarray(out0)).max() > 0.01
    _close(out1, out0, rel)
    for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats0)):
        _close(a, b, rel)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert np.abs(b).max() > 0
        _close(a, b, rel)


@pytest.fixture(scope="module")
def resnet_pair():
    host = host_initialised(10, 4, seed=2)  # ResNet-10: every conv kind of a basic-block ResNet
    native, taps = _with_conv(host, "native"), _with_conv(host, "depth_taps")
    assert _conv_fns(native) == {lax.conv_general_dilated}
    assert _conv_fns(taps) == {depth_taps_conv_general_dilated}  # really a different computation
    return native, taps


def test_resnet_parameters_do_not_depend_on_conv(resnet_pair):
    # Checkpoints and torchvision inflation see the same variables either way.
    native, taps = resnet_pair
    assert jax.tree.structure(nnx.state(native)) == jax.tree.structure(nnx.state(taps))
    shapes = lambda m: [v.shape for v in jax.tree.leaves(nnx.state(m))]  # noqa: E731
    assert shapes(native) == shapes(taps)
    assert taps.conv1.kernel[...].shape == (3, 7, 7, 3, 4)
    assert taps.layer2[0].downsample.conv.kernel[...].shape == (1, 1, 1, 4, 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet_with_depth_taps_matches_native_in_eval_mode(resnet_pair, channels):
    x = jax.random.uniform(jax.random.key(7), (2, 9, 16, 16, channels))
    native, taps = resnet_pair
    _compare(_features_and_grads(taps, x, False), _features_and_grads(native, x, False), rel=1e-5)


def test_resnet_with_depth_taps_matches_native_in_train_mode(resnet_pair):
    # Batch statistics over a few voxels of the last stages amplify float32 rounding differences
    # (2×9×16² input: 1e-4 in the features, 1e-2 in some gradients; eval mode stays within 3e-6),
    # so train mode is compared on a larger volume, at looser tolerances.
    x = jax.random.uniform(jax.random.key(8), (4, 16, 32, 32, 1))
    native, taps = resnet_pair
    _compare(_features_and_grads(taps, x, True), _features_and_grads(native, x, True), rel=5e-4)


# ---------------------------------------------------------------------------------------------------
# Choosing the implementation.


RESNET_KINDS = ["3x7x7/1x2x2", "3x3x3", "3x3x3/2x2x2", "1x1x1", "1x1x1/2x2x2"]


def test_conv_kind_names():
    assert conv_kind((3, 7, 7), (1, 2, 2)) == "3x7x7/1x2x2"
    assert conv_kind((3, 3, 3), (1, 1, 1)) == "3x3x3"
    assert conv_kind((1, 1, 1), (2, 2, 2)) == "1x1x1/2x2x2"


@pytest.mark.parametrize("backend", ["gpu", "cuda", "rocm", "tpu"])
def test_auto_is_native_off_cpu(backend):
    assert {resolve_conv("auto", kind, backend) for kind in RESNET_KINDS} == {"native"}


def test_auto_on_cpu_and_explicit_choices():
    assert set(RESNET_KINDS) == CPU_DEPTH_TAPS_KINDS
    assert {resolve_conv("auto", kind, "cpu") for kind in RESNET_KINDS} == {"depth_taps"}
    assert resolve_conv("auto", "5x5x5", "cpu") == "native"  # a kind nobody measured
    for backend in ("cpu", "gpu", "tpu"):
        assert resolve_conv("native", "3x3x3", backend) == "native"
        assert resolve_conv("depth_taps", "3x3x3", backend) == "depth_taps"
    with pytest.raises(ValueError, match="use one of"):
        resolve_conv("fast", "3x3x3", "cpu")
    with pytest.raises(ValueError, match="conv must be one of"):
        ResNet3D(18, width=4, conv="fast", rngs=nnx.Rngs(0))


def test_config_field_reaches_the_image_tower():
    config = merlin.get_config("phantom")
    assert config.model.image.conv == "auto"
    config.model.text.update(init="scratch", size="tiny", vocab_size=64)
    expected = {"auto": depth_taps_conv_general_dilated if jax.default_backend() == "cpu"
                else lax.conv_general_dilated,
                "native": lax.conv_general_dilated, "depth_taps": depth_taps_conv_general_dilated}
    for conv, fn in expected.items():
        config.model.image.conv = conv
        spec = ModelSpec.from_config(config.model)
        assert spec.image_conv == conv
        model = nnx.eval_shape(lambda spec=spec: build_model(spec, nnx.Rngs(0)))
        assert _conv_fns(model.image_tower) == {fn}
    config.model.image.conv = "fast"
    with pytest.raises(ValueError, match=r"config\.model\.image\.conv='fast'"):
        ModelSpec.from_config(config.model)
    del config.model.image["conv"]  # a config saved before the field existed
    assert ModelSpec.from_config(config.model).image_conv == "auto"
