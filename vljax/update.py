"""One training update: AdamW with warm-up and cosine decay (a locked text tower gets no update),
the global-batch InfoNCE (+ phenotype BCE) loss, and the jittable step with its metrics. A step
whose loss or gradient is not finite changes nothing and records where it happened.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax
from clu import metrics as clu_metrics
from flax import nnx

from vljax import losses, sharding
from vljax.modeling import Model
from vljax.sharding import BATCH


# Built with `create` (not a class body): this module uses postponed annotations, which clu's
# dataclass-based Collection cannot resolve.
TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    contrastive_loss=clu_metrics.Average.from_output("contrastive_loss"),
    phenotype_loss=clu_metrics.Average.from_output("phenotype_loss"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    logit_scale=clu_metrics.LastValue.from_output("logit_scale"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
)


def _param_labels(params, freeze_text: bool):
    def label(path, _):
        top = getattr(path[0], "key", None)
        return "frozen" if freeze_text and top == "text_tower" else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warm-up and cosine decay, global-norm clipping, weight decay on matrices only;
    a locked text tower (`model.text.trainable=False`) gets no updates at all (no decay either)."""
    o = config.optim
    if not 0 <= o.warmup_steps < config.total_steps:
        raise ValueError(f"config.optim.warmup_steps={o.warmup_steps} must be in [0, total_steps="
                         f"{config.total_steps})")
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, config.total_steps,
                                                  end_value=o.lr * o.end_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    tx = optax.chain(*parts)
    if not config.model.text.trainable:
        if config.model.text.init != "pretrained":
            raise ValueError("config.model.text.trainable=False needs config.model.text.init='pretrained' "
                             "(a locked randomly initialised text tower cannot learn)")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   functools.partial(_param_labels, freeze_text=True))
    return tx, schedule


def contrastive_loss_fn(mesh: Mesh) -> Callable:
    """Global-batch InfoNCE: local rows x all-gathered columns inside `shard_map` over the batch's
    mesh axes (`sharding.BATCH`: every device)."""
    return jax.shard_map(lambda i, t, s: losses.global_infonce(i, t, s, BATCH), mesh=mesh,
                         in_specs=(P(BATCH), P(BATCH), P()), out_specs=P())


def jit_train_step(model: Model, tx, schedule, config, mesh: Mesh, state_shardings, *,
                   grad_fn: Callable | None = None, metrics=None) -> Callable:
    """`make_train_step` jitted for the mesh: the state in and out with its shardings (donated), the
    batch as it arrives (`pipeline.to_global`: split over every device), the metrics replicated."""
    return jax.jit(make_train_step(model, tx, schedule, config, mesh, grad_fn=grad_fn, metrics=metrics),
                   donate_argnums=0,
                   in_shardings=(state_shardings, None), out_shardings=(state_shardings, NamedSharding(mesh, P())))


def _split_micro(x: jax.Array, k: int, shards: int) -> jax.Array:
    """[B, ...] → [k, B/k, ...]: micro-batch i takes the i-th consecutive chunk of every device's rows,
    so each micro-batch stays split evenly over the devices (no data moves between them)."""
    b = x.shape[0] // (k * shards)
    return x.reshape(shards, k, b, *x.shape[1:]).swapaxes(0, 1).reshape(k, shards * b, *x.shape[1:])


def _merge_micro(x: jax.Array, k: int, shards: int) -> jax.Array:
    """Inverse of `_split_micro`: [k, B/k, ...] → [B, ...] in the batch's own row order."""
    b = x.shape[1] // shards
    return x.reshape(k, shards, b, *x.shape[2:]).swapaxes(0, 1).reshape(k * shards * b, *x.shape[2:])


def accum_steps(config) -> int:
    """`config.accum_steps` (absent from configs saved before it existed: 1)."""
    return int(config.get("accum_steps", 1))


def check_accum_steps(config, mesh: Mesh) -> None:
    k, shards = accum_steps(config), sharding.batch_shards(mesh)
    if k < 1 or config.batch_size % (k * shards):
        raise ValueError(f"config.accum_steps={k}: the batch ({config.batch_size}) must split into {k} "
                         f"micro-batches of equal size on each of the {shards} devices; choose accum_steps "
                         f"dividing batch_size / devices = {config.batch_size / shards:g}")


def make_grad_fn(model: Model, config, mesh: Mesh) -> Callable:
    """`grad_fn(params, rest, batch, rng) -> (loss, grads, new_rest, aux)`.

    The towers produce *features* (pooled image features, pooled text features); the head turns the
    whole batch's features into the loss (feature BatchNorm, projections, global InfoNCE, phenotype
    BCE). With `config.accum_steps = k > 1` the step is GradCache (Gao et al. 2021; open_clip's
    accumulation): the towers run on k micro-batches without gradients, the head's loss and the
    gradient of its features are computed on all of them at once, and each micro-batch is run again
    and back-propagated with its slice of that gradient. Loss and gradients are the unaccumulated
    step's, with the towers' activations held for one micro-batch at a time. What changes: training
    BatchNorm inside the image tower normalises over each micro-batch (per device: `bn_stats`), as
    ghost batch norm with k times more slices (the running averages take their mean), and text
    dropout draws one mask per micro-batch.
    """
    contrastive = contrastive_loss_fn(mesh)
    phen_weight = float(config.model.phenotype_weight)
    k, shards = accum_steps(config), sharding.batch_shards(mesh)
    check_accum_steps(config, mesh)
    constrain = lambda spec: lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))  # noqa: E731
    batch_sharded, micro_sharded = constrain(P(BATCH)), constrain(P(None, BATCH))

    def towers(m, batch, rng):
        """Per-example features of both towers: {"image": [B, F], "text": [B, H]} (fp32)."""
        out = {"image": m.image_features(batch["image"], train=True)}
        if "text_hidden" in batch:  # locked text tower: its cached hidden states, trainable pooling
            out["text"] = m.pool_text(batch["text_hidden"], batch["attention_mask"])
        elif "text_pooled" not in batch:  # "sentence_mean": the texts' pooled features are the input
            out["text"] = m.text_features(batch["input_ids"], batch["attention_mask"], train=True,
                                          rngs=nnx.Rngs(dropout=rng))
        return out

    def head(m, feats, batch):
        img = m.embed_image_features(feats["image"], train=True)
        txt = m.embed_text_features(feats["text"] if "text" in feats else batch["text_pooled"])
        scale = m.logit_scale()
        c_loss = contrastive(img, txt, scale)
        p_loss = jnp.zeros((), jnp.float32)
        if phen_weight > 0:
            target = batch["phenotypes"]
            p_loss = losses.phenotype_bce(m.phenotype_logits(feats["image"]), target > 0, target >= 0)
        return c_loss + phen_weight * p_loss, {"contrastive_loss": c_loss, "phenotype_loss": p_loss,
                                               "logit_scale": scale}

    def plain(params, rest, batch, rng):
        def loss_fn(p):
            m = nnx.merge(model.graphdef, p, rest, copy=True)
            loss, aux = head(m, towers(m, batch, rng), batch)
            return loss, (nnx.state(m, nnx.Not(nnx.Param)), aux)

        (loss, (new_rest, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_rest, aux

    def gradcache(params, rest, batch, rng):
        micro = jax.tree.map(lambda x: micro_sharded(_split_micro(x, k, shards)), batch)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))

        def tower_fn(p, mb, key):
            m = nnx.merge(model.graphdef, p, rest, copy=True)
            return towers(m, mb, key), nnx.state(m, nnx.Not(nnx.Param))

        # 1. Features of every micro-batch, no gradients: only [B, F] + [B, H] stay.
        _, (feats, rests) = jax.lax.scan(lambda c, xs: (c, tower_fn(params, *xs)), None, (micro, keys))
        feats = jax.tree.map(lambda x: batch_sharded(_merge_micro(x, k, shards)), feats)
        # Running statistics: the mean over micro-batches (what ghost batch norm's slices give).
        tower_rest = jax.tree.map(lambda r, r0: r.mean(0).astype(r0.dtype) if jnp.issubdtype(r0.dtype, jnp.floating)
                                  else r[-1], rests, rest)

        # 2. The loss on the whole batch's features; its gradient in the head's parameters and features.
        def head_fn(p, f):
            m = nnx.merge(model.graphdef, p, tower_rest, copy=True)
            loss, aux = head(m, f, batch)
            return loss, (nnx.state(m, nnx.Not(nnx.Param)), aux)

        (loss, (new_rest, aux)), (grads, feat_grads) = jax.value_and_grad(head_fn, (0, 1), has_aux=True)(params, feats)
        feat_grads = jax.tree.map(lambda g: micro_sharded(_split_micro(g, k, shards)), feat_grads)

        # 3. Each micro-batch again, back-propagating its features' gradient; the sum is the gradient.
        def backward(acc, xs):
            mb, key, ct = xs
            _, vjp = jax.vjp(lambda p: tower_fn(p, mb, key)[0], params)
            return jax.tree.map(jnp.add, acc, vjp(ct)[0]), None

        grads, _ = jax.lax.scan(backward, grads, (micro, keys, feat_grads))
        return loss, grads, new_rest, aux

    return gradcache if k > 1 else plain


def make_train_step(model: Model, tx, schedule, config, mesh: Mesh, *, grad_fn: Callable | None = None,
                    metrics=None) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`: `grad_fn` (default: the CT model's
    `make_grad_fn`; CXR-CLIP: `vljax.cxr.make_grad_fn`) and the optimiser update; `metrics` is the
    clu collection its outputs fill (default `TrainMetrics`)."""
    grad_fn = grad_fn or make_grad_fn(model, config, mesh)
    metrics_cls = metrics or TrainMetrics

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        loss, grads, new_rest, aux = grad_fn(state["params"], state["rest"], batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        # A non-finite step changes nothing; the host stops at its next check and names the step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {
            "params": keep(new_params, state["params"]),
            "rest": keep(new_rest, state["rest"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": step + 1,
            "rng": state["rng"],
            "bad_step": jnp.where(~finite & (state["bad_step"] < 0), step, state["bad_step"]),
        }
        return new_state, metrics_cls.single_from_model_output(
            loss=loss, grad_norm=grad_norm, learning_rate=schedule(step), **aux)

    return train_step
