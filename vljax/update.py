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

from vljax import losses
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


def jit_train_step(model: Model, tx, schedule, config, mesh: Mesh, state_shardings) -> Callable:
    """`make_train_step` jitted for the mesh: the state in and out with its shardings (donated), the
    batch as it arrives (`pipeline.to_global`: split over every device), the metrics replicated."""
    return jax.jit(make_train_step(model, tx, schedule, config, mesh), donate_argnums=0,
                   in_shardings=(state_shardings, None), out_shardings=(state_shardings, NamedSharding(mesh, P())))


def make_train_step(model: Model, tx, schedule, config, mesh: Mesh) -> Callable:
    contrastive = contrastive_loss_fn(mesh)
    phen_weight = float(config.model.phenotype_weight)

    def loss_fn(params, rest, batch, rng):
        m = nnx.merge(model.graphdef, params, rest, copy=True)
        feats = m.image_features(batch["image"], train=True)
        img = m.embed_image_features(feats, train=True)
        if "text_pooled" in batch:  # locked text tower, "sentence_mean": the texts' pooled features
            txt = m.embed_text_features(batch["text_pooled"])
        elif "text_hidden" in batch:  # locked text tower: its cached hidden states, trainable pooling
            txt = m.embed_text_features(m.pool_text(batch["text_hidden"], batch["attention_mask"]))
        else:
            txt = m.encode_text(batch["input_ids"], batch["attention_mask"], train=True,
                                rngs=nnx.Rngs(dropout=rng))
        scale = m.logit_scale()
        c_loss = contrastive(img, txt, scale)
        p_loss = jnp.zeros((), jnp.float32)
        if phen_weight > 0:
            target = batch["phenotypes"]
            p_loss = losses.phenotype_bce(m.phenotype_logits(feats), target > 0, target >= 0)
        loss = c_loss + phen_weight * p_loss
        new_rest = nnx.state(m, nnx.Not(nnx.Param))
        return loss, (new_rest, {"contrastive_loss": c_loss, "phenotype_loss": p_loss, "logit_scale": scale})

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        (loss, (new_rest, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["rest"], batch, rng)
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
        metrics = TrainMetrics.single_from_model_output(
            loss=loss, grad_norm=grad_norm, learning_rate=schedule(step), **aux)
        return new_state, metrics

    return train_step
