"""Contrastive and phenotype losses.

`infonce` is the symmetric CLIP loss over one array of embeddings (a single device, or a batch
that is already global). `global_infonce` computes the same number when the batch is sharded over a
mesh axis: called inside `jax.shard_map`, each device all-gathers the *other* tower's embeddings and
scores its local rows against all global columns, in both directions, so memory per device is
O(B_local x B_global) instead of O(B_global^2). The all-gather's transpose is a reduce-scatter, so
gradients reach the device that owns each embedding (open_clip's "local loss + gather with grad").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def infonce(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, matching pairs on the
    diagonal. Embeddings [B, E] (already L2-normalised); `logit_scale` is the multiplier exp(s)."""
    logits = logit_scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (i2t + t2i)


def global_infonce(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, axis_name: str) -> jax.Array:
    """`infonce` over the global batch, for use inside `shard_map` with the batch split on `axis_name`.

    Returns the same (replicated) scalar on every device: the global mean of both directions.
    """
    b_local = image_emb.shape[0]
    offset = jax.lax.axis_index(axis_name) * b_local
    labels = offset + jnp.arange(b_local)
    img = image_emb.astype(jnp.float32)
    txt = text_emb.astype(jnp.float32)
    all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)  # [B_global, E]
    all_img = jax.lax.all_gather(img, axis_name, tiled=True)
    i2t = optax.softmax_cross_entropy_with_integer_labels(logit_scale * img @ all_txt.T, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logit_scale * txt @ all_img.T, labels)
    return 0.5 * (jax.lax.pmean(i2t.mean(), axis_name) + jax.lax.pmean(t2i.mean(), axis_name))


def phenotype_bce(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Multi-label binary cross-entropy with logits, mean over the (unmasked) entries."""
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
