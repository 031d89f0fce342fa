"""Contrastive and phenotype losses.

`infonce` is the symmetric CLIP loss over one array of embeddings (a single device, or a batch
that is already global). `global_infonce` computes the same number when the batch is sharded over a
mesh axis: called inside `jax.shard_map`, each device all-gathers the *other* tower's embeddings and
scores its local rows against all global columns, in both directions, so memory per device is
O(B_local x B_global) instead of O(B_global^2). The all-gather's transpose is a reduce-scatter, so
gradients reach the device that owns each embedding (open_clip's "local loss + gather with grad").

`global_cross_entropy` is one direction of that loss, ℓ(A, B); `cxr_clip_loss` builds CXR-CLIP's
objective from it (DESIGN.md §2): CLIP over the four image-text pairs of two images and two texts per
study, plus the image-image (ICL) and text-text (TCL) terms, each embedding set gathered once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P


def infonce(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, matching pairs on the
    diagonal. Embeddings [B, E] (already L2-normalised); `logit_scale` is the multiplier exp(s)."""
    logits = logit_scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (i2t + t2i)


AxisName = str | tuple[str, ...]


def _global_rows(rows: jax.Array, columns: jax.Array, logit_scale: jax.Array, axis_name: AxisName) -> jax.Array:
    """ℓ from local rows [b, E] against already-gathered global columns [B, E] (fp32): the global mean
    over rows of -log softmax at the matching column (row i of device k matches column k*b + i)."""
    labels = jax.lax.axis_index(axis_name) * rows.shape[0] + jnp.arange(rows.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels(logit_scale * rows @ columns.T, labels)
    return jax.lax.pmean(ce.mean(), axis_name)


def global_cross_entropy(a: jax.Array, b: jax.Array, logit_scale: jax.Array, axis_name: AxisName) -> jax.Array:
    """One direction ℓ(A, B), inside `shard_map`: mean over the global rows i of -log softmax_j(s·aᵢ·bⱼ)
    at the matching j, columns j over the global batch (B is all-gathered). `global_infonce(I, T)` is
    ½[ℓ(I, T) + ℓ(T, I)]."""
    cols = jax.lax.all_gather(b.astype(jnp.float32), axis_name, tiled=True)
    return _global_rows(a.astype(jnp.float32), cols, logit_scale, axis_name)


def global_infonce(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, axis_name: str) -> jax.Array:
    """`infonce` over the global batch, for use inside `shard_map` with the batch split on `axis_name`.

    Returns the same (replicated) scalar on every device: the global mean of both directions.
    """
    img = image_emb.astype(jnp.float32)
    txt = text_emb.astype(jnp.float32)
    all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)  # [B_global, E]
    all_img = jax.lax.all_gather(img, axis_name, tiled=True)
    i2t = _global_rows(img, all_txt, logit_scale, axis_name)
    t2i = _global_rows(txt, all_img, logit_scale, axis_name)
    return 0.5 * (i2t + t2i)


def cxr_clip_loss(i1: jax.Array, i2: jax.Array, t1: jax.Array, t2: jax.Array, logit_scale: jax.Array,
                  axis_name: AxisName, icl_weight: float = 1.0, tcl_weight: float = 0.5
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CXR-CLIP's loss on the global batch, inside `shard_map` with the batch split on `axis_name`.

    Two images (i1, i2) and two texts (t1, t2) per study, [b, E] each, L2-normalised; one shared scale.
    L_CLIP = ½[¼Σ ℓ(X, Y) + ¼Σ ℓ(Y, X)] over X ∈ {I1, I2}, Y ∈ {T1, T2};
    L_ICL = ½[ℓ(I1, I2) + ℓ(I2, I1)]; L_TCL = ½[ℓ(T1, T2) + ℓ(T2, T1)].
    Returns (L_CLIP + icl_weight·L_ICL + tcl_weight·L_TCL, {"clip_loss", "icl_loss", "tcl_loss"}), the
    same on every device. Each set is all-gathered once (4 gathers); memory O(b·B) per device.
    """
    local = [x.astype(jnp.float32) for x in (i1, i2, t1, t2)]
    gathered = [jax.lax.all_gather(x, axis_name, tiled=True) for x in local]
    (ri1, ri2, rt1, rt2), (ci1, ci2, ct1, ct2) = local, gathered
    ell = lambda rows, cols: _global_rows(rows, cols, logit_scale, axis_name)  # noqa: E731
    image_to_text = ell(ri1, ct1) + ell(ri1, ct2) + ell(ri2, ct1) + ell(ri2, ct2)
    text_to_image = ell(rt1, ci1) + ell(rt2, ci1) + ell(rt1, ci2) + ell(rt2, ci2)
    clip = 0.5 * (0.25 * image_to_text + 0.25 * text_to_image)
    icl = 0.5 * (ell(ri1, ci2) + ell(ri2, ci1))
    tcl = 0.5 * (ell(rt1, ct2) + ell(rt2, ct1))
    loss = clip + icl_weight * icl + tcl_weight * tcl
    return loss, {"clip_loss": clip, "icl_loss": icl, "tcl_loss": tcl}


def cxr_loss_fn(mesh: Mesh, icl_weight: float = 1.0, tcl_weight: float = 0.5,
                axis_name: AxisName | None = None) -> Callable:
    """`cxr_clip_loss` wrapped in `shard_map` over `mesh`: `f(i1, i2, t1, t2, logit_scale) -> (loss, parts)`
    with the batch split over `axis_name` (default: every mesh axis, as `sharding.BATCH`), outputs
    replicated."""
    axes = tuple(mesh.axis_names) if axis_name is None else axis_name

    def loss(i1, i2, t1, t2, s):
        return cxr_clip_loss(i1, i2, t1, t2, s, axes, icl_weight, tcl_weight)

    return jax.shard_map(loss, mesh=mesh, in_specs=(P(axes),) * 4 + (P(),), out_specs=P())


def phenotype_bce(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Multi-label binary cross-entropy with logits, mean over the (unmasked) entries."""
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
