"""3D convolutions as 2D convolutions over the depth taps, a faster path on XLA:CPU.

XLA:CPU runs small NDHWC 3D convolutions, and above all their gradients, far below what it reaches on
2D ones (DESIGN.md §4b). `conv3d_depth_taps` computes exactly what

    lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

computes with 2D operations: for every output depth position the kD input slices its taps read
(depth padding and stride applied by `lax.pad` and a strided slice) are stacked along the channel
axis, batch and output depth are folded into one batch axis, and a single 2D convolution with a
[kH, kW, kD·I, O] kernel does the rest. A 1×1 spatial kernel, or an output plane of at most
`MATMUL_MAX_PLANE` positions, stacks the in-plane taps as well and becomes one matrix product. Taps
that read only padding (e.g. the outer taps of a 3×3×3 conv on a one-slice map) are dropped. Plain
JAX ops, so autodiff gives the gradients; the stacked input costs kD× the conv input's memory.

`depth_taps_conv_general_dilated` has `lax.conv_general_dilated`'s signature (so it can be handed
to `nnx.Conv(conv_general_dilated=...)`) and falls back to it for anything other than an undilated,
ungrouped NDHWC/DHWIO convolution. `resolve_conv` turns the config's `model.image.conv` ("auto",
"native", "depth_taps") into the implementation of one conv kind on one backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "native", "depth_taps")

# Conv kinds (`conv_kind`) that "auto" computes by depth taps on XLA:CPU: every kind of the I3D
# ResNets. Measured with `python tools/bench.py conv` (BUILD_NOTES.md) in ResNet-18 width 16 at
# 16×24×24 and 32×48×48 and ResNet-50 width 8 at 16×24×24, batch 8: alone, each is faster forward
# and backward (except 1×1×1 convs that take under 0.1 ms either way); in the tower's AdamW step,
# leaving any one kind native is slower, or within noise for ResNet-18's 1×1×1 downsample.
CPU_DEPTH_TAPS_KINDS = frozenset({"3x7x7/1x2x2", "3x3x3", "3x3x3/2x2x2", "1x1x1", "1x1x1/2x2x2"})

_NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def conv_kind(kernel_size: Sequence[int], strides: Sequence[int]) -> str:
    """'3x3x3' for a stride-1 3×3×3 kernel, '3x7x7/1x2x2' for the stem: the key of `resolve_conv`."""
    kind = "x".join(str(int(k)) for k in kernel_size)
    if any(int(s) != 1 for s in strides):
        kind += "/" + "x".join(str(int(s)) for s in strides)
    return kind


def resolve_conv(conv: str, kind: str, backend: str) -> str:
    """'native' or 'depth_taps' for one conv kind: `conv` itself unless it is 'auto', which picks
    depth taps on the 'cpu' backend for the kinds in `CPU_DEPTH_TAPS_KINDS` and the native 3D
    convolution everywhere else (GPU/TPU, and kinds not measured on CPU)."""
    if conv not in CONV_IMPLS:
        raise ValueError(f"config.model.image.conv={conv!r}: use one of {list(CONV_IMPLS)}")
    if conv != "auto":
        return conv
    return "depth_taps" if backend == "cpu" and kind in CPU_DEPTH_TAPS_KINDS else "native"


# Output planes (Ho·Wo) up to this size, as in the last stages of a ResNet, stack the in-plane taps
# too and run one matrix product: XLA:CPU's 2D convolution is slow on 1×1 and 2×2 maps.
MATMUL_MAX_PLANE = 4


def _out_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return max(0, (size + pad[0] + pad[1] - k) // stride + 1)


def _reading_taps(size: int, k: int, stride: int, pad_low: int, out: int) -> list[int]:
    """Taps t (of k) for which some output position z reads real input z·stride + t − pad_low."""
    return [t for t in range(k) if any(0 <= z * stride + t - pad_low < size for z in range(out))]


def _take(a: jax.Array, axis: int, idx: list[int]) -> jax.Array:
    if idx == list(range(idx[0], idx[-1] + 1)):
        return lax.slice_in_dim(a, idx[0], idx[-1] + 1, axis=axis)
    # A stride larger than the input can leave non-adjacent taps.
    return jnp.concatenate([lax.slice_in_dim(a, t, t + 1, axis=axis) for t in idx], axis=axis)


def conv3d_depth_taps(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                      padding: Sequence[tuple[int, int]], *, precision: lax.PrecisionLike = None,
                      preferred_element_type=None) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NDHWC/DHWIO/NDHWC)`.

    x [N, D, H, W, I], kernel [kD, kH, kW, I, O], strides (sd, sh, sw), padding three (low, high)
    pairs (negative values crop, as in lax) → [N, Do, Ho, Wo, O].
    """
    if x.ndim != 5 or kernel.ndim != 5 or x.shape[-1] != kernel.shape[3]:
        raise ValueError(f"expected x [N,D,H,W,I] and kernel [kD,kH,kW,I,O], got {x.shape} and "
                         f"{kernel.shape}")
    n, d, h, w, c = x.shape
    kd, kh, kw, _, o = kernel.shape
    sd, sh, sw = (int(s) for s in strides)
    pd, ph, pw = (tuple(int(v) for v in p) for p in padding)
    do, ho, wo = _out_size(d, kd, sd, pd), _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    taps_d = _reading_taps(d, kd, sd, pd[0], do)
    if not (taps_d and ho and wo):  # every output reads only padding (or there is no output)
        return jnp.zeros((n, do, ho, wo, o), preferred_element_type or jnp.result_type(x, kernel))
    kernel = _take(kernel, 0, taps_d)
    zero = jnp.zeros((), x.dtype)
    if (kh == kw == 1) or ho * wo <= MATMUL_MAX_PLANE:
        # Every tap that reads data, stacked on channels (tap-major), then one matrix product.
        taps_h, taps_w = _reading_taps(h, kh, sh, ph[0], ho), _reading_taps(w, kw, sw, pw[0], wo)
        kernel = _take(_take(kernel, 1, taps_h), 2, taps_w)
        xp = lax.pad(x, zero, [(0, 0, 0), (*pd, 0), (*ph, 0), (*pw, 0), (0, 0, 0)])
        cols = [lax.slice(xp, (0, a, b, e, 0),
                          (n, a + (do - 1) * sd + 1, b + (ho - 1) * sh + 1, e + (wo - 1) * sw + 1, c),
                          (1, sd, sh, sw, 1))
                for a in taps_d for b in taps_h for e in taps_w]
        cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
        return lax.dot_general(cols, kernel.reshape(-1, o), (((4,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=preferred_element_type)
    # The depth taps stacked on channels (tap-major), batch and depth folded: one 2D convolution.
    xp = lax.pad(x, zero, [(0, 0, 0), (*pd, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)])
    slices = [lax.slice_in_dim(xp, t, t + (do - 1) * sd + 1, sd, axis=1) for t in taps_d]
    stacked = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)  # [N,Do,H,W,T·I]
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, len(taps_d) * c, o)
    y = lax.conv_general_dilated(stacked.reshape(n * do, h, w, len(taps_d) * c), k2, (sh, sw), [ph, pw],
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
                                 preferred_element_type=preferred_element_type)
    return y.reshape(n, do, ho, wo, o)


def depth_taps_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                                    padding: str | Sequence[tuple[int, int]],
                                    lhs_dilation: Sequence[int] | None = None,
                                    rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                                    feature_group_count: int = 1, batch_group_count: int = 1,
                                    precision: lax.PrecisionLike = None, preferred_element_type=None,
                                    out_sharding=None) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated`: depth taps for undilated, ungrouped NDHWC/DHWIO 3D
    convolutions (as `nnx.Conv` issues them), `lax.conv_general_dilated` itself otherwise."""
    native = lambda: lax.conv_general_dilated(  # noqa: E731
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        out_sharding=out_sharding)
    if lhs.ndim != 5 or rhs.ndim != 5 or dimension_numbers is None:
        return native()
    ndhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NDHWC)
    if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != ndhwc
            or any(v != 1 for v in (lhs_dilation or ())) or any(v != 1 for v in (rhs_dilation or ()))
            or feature_group_count != 1 or batch_group_count != 1 or out_sharding is not None):
        return native()
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
    return conv3d_depth_taps(lhs, rhs, window_strides, padding, precision=precision,
                             preferred_element_type=preferred_element_type)


def conv_function(impl: str) -> Callable[..., jax.Array]:
    """The `conv_general_dilated` callable of a resolved implementation ('native' or 'depth_taps')."""
    if impl == "native":
        return lax.conv_general_dilated
    if impl == "depth_taps":
        return depth_taps_conv_general_dilated
    raise ValueError(f"conv implementation {impl!r}: resolve 'auto' first (resolve_conv)")
