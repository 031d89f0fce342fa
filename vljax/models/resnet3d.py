"""I3D-inflated 3D ResNet (Merlin's image tower) in Flax NNX, with 2D ImageNet weight inflation.

The rank-3 member of the ResNet family in `vljax/models/resnet.py` (blocks, stages, norms and the
torchvision key map are shared with the 2D tower): torchvision's ResNet v1.5 with every 2D conv turned
3D: stem (3,7,7)/(1,2,2), max-pool 3×3×3/2, 3×3×3 and 1×1×1 convs with stride (s,s,s). Inputs are
NDHWC with (D,H,W) = (z,x,y); a one-channel volume is treated as three identical channels, as Merlin
repeats it (no mean/std normalisation). `inflate_from_torch_2d` puts each 2D kernel in the centre
depth slice of its 3D kernel (other slices zero), so a depth-constant volume reproduces the 2D network
slice by slice.

`conv` picks how the 3D convolutions are computed (`vljax/models/conv.py`): "native"
(`lax.conv_general_dilated` in 3D), "depth_taps" (2D convolutions over the depth taps, much faster on
XLA:CPU) or "auto" (by conv kind and `jax.default_backend()`, resolved when the model is built).
Parameters are the same `nnx.Conv` kernels [kD,kH,kW,I,O] whichever is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vljax.models.resnet import (
    BN_EPSILON,
    BN_MOMENTUM,
    EXPANSION,
    RESNET_LAYOUTS,
    BasicBlock,
    Bottleneck,
    Norm,
    ResNet,
    SlicedBatchNorm,
    feature_dim,
    fill_from_torchvision,
    load_torchvision_safetensors,
    max_pool,
    torch_to_hwio,
    torchvision_targets,
)

# The family's names stay importable from here, their home before the 2D tower shared them.
__all__ = ["BN_EPSILON", "BN_MOMENTUM", "EXPANSION", "RESNET_LAYOUTS", "BasicBlock", "Bottleneck", "Norm",
           "ResNet3D", "SlicedBatchNorm", "feature_dim", "inflate_from_torch_2d", "inflate_kernel",
           "load_torchvision_safetensors", "max_pool_3d", "torchvision_targets"]


class ResNet3D(ResNet):
    """Inflated 3D ResNet: volume [B,D,H,W] or [B,D,H,W,C∈{1,3}] → pooled features
    [B, 8·width·expansion] (fp32).

    `norm="batch"` (eps 1e-5, momentum 0.9) or `"group"`; `remat=True` rematerialises every residual
    block in the backward pass; `dtype` is the compute dtype (e.g. bf16), parameters stay fp32;
    `conv` is "auto", "native" or "depth_taps" (module docstring); `bn_slices` > 1 computes training
    BatchNorm statistics per slice of the batch (`SlicedBatchNorm`: per device).
    """

    def __init__(self, depth: int = 50, *, width: int = 64, norm: Norm = "batch", num_groups: int = 32,
                 remat: bool = False, dtype=jnp.float32, conv: str = "auto", bn_slices: int = 1,
                 rngs: nnx.Rngs):
        super().__init__(depth, rank=3, width=width, norm=norm, num_groups=num_groups, remat=remat,
                         dtype=dtype, conv=conv, bn_slices=bn_slices, rngs=rngs)


def max_pool_3d(x: jax.Array) -> jax.Array:
    """3×3×3 max-pool, stride 2, padding 1 (padded cells never win: -inf), NDHWC."""
    if x.ndim != 5:
        raise ValueError(f"expected NDHWC, got shape {x.shape}")
    return max_pool(x)


# ---------------------------------------------------------------------------------------------------
# Inflation of torchvision 2D weights.


def inflate_kernel(kernel_2d: np.ndarray, depth: int) -> np.ndarray:
    """[O,I,kH,kW] → [depth,kH,kW,I,O] with the 2D kernel in the centre depth slice, zeros elsewhere."""
    hwio = torch_to_hwio(kernel_2d)
    out = np.zeros((depth,) + tuple(hwio.shape), np.float32)
    out[depth // 2] = hwio
    return out


def inflate_from_torch_2d(model: ResNet3D, state_dict: Mapping[str, np.ndarray], *,
                          strict: bool = True) -> ResNet3D:
    """Fill `model` in place from a torchvision ResNet state dict (numpy arrays); returns `model`.

    `fc.*` and `*.num_batches_tracked` are ignored. Missing or mis-shaped keys raise (all listed at
    once); with `strict`, so do unused keys (e.g. ResNet-50 weights into a ResNet-18).
    """
    if model.rank != 3:
        raise ValueError(f"inflate_from_torch_2d fills a 3D ResNet, got rank {model.rank} "
                         "(load_torchvision_2d loads torchvision weights into ResNet2D)")
    return fill_from_torchvision(model, state_dict, lambda w, shape: inflate_kernel(w, shape[0]),
                                 strict=strict, verb="inflate")
