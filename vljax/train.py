r"""Contrastive training of the CT dual encoder, end to end.

  python -m vljax.train --config=configs/merlin.py:phantom --workdir=/tmp/vljax_run

Writes into the workdir: `config.json` (the resolved config), `checkpoints/` (orbax: parameters,
optimiser state, step, RNG, data-iterator state, config; asynchronous), `tb/` (TensorBoard events and
`metrics.jsonl`), `run_stats.json` (what the run's batches contain: unique studies, class counts,
steps per text unit, normal fraction per batch), `train_batches.jsonl` (text unit and study ids of
every step trained) and, at the end, `results.json` (zero-shot and retrieval on `config.final_eval_split`)
and `zero_shot_<split>.png` (per-finding F1 and AUROC against the baselines; the log gets the macro
scores and the best and worst findings). Started again on the same workdir, the run resumes from its
last checkpoint with the same data order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Callable

from absl import app, flags, logging
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metrics as clu_metrics
from flax import nnx

from vljax import losses
from vljax.data import ct as ct_lib
from vljax.data import pipeline
from vljax.data import reports as reports_lib
from vljax.data import sampling as sampling_lib
from vljax.data.manifest import Manifest, load_manifest
from vljax.evals import report, zero_shot
from vljax.metric_writer import MetricWriter, Progress
from vljax.models import two_tower

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/merlin.py[:args])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, results)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() (multi-host TPU/GPU)")

# Fields that may differ between a checkpointed run and its resumption (they change nothing learnt).
# `data.geometry_backend` only says where `geometry=auto` was resolved; a changed `data.geometry` (or
# spacing/shape) is refused.
_RESUMABLE_FIELDS = {"log_every", "eval_every", "eval_max_studies", "ckpt_every", "keep_checkpoints",
                     "data.workers", "data.prefetch", "final_eval_split", "eval_batch_size", "data.dir",
                     "data.geometry_backend", "data.cache_volumes", "zero_shot_prompts"}


class NonFiniteLossError(RuntimeError):
    """The loss or gradients became NaN/inf; no update from that step was applied or saved."""


# ===================================================================================================
# Logging
# ===================================================================================================


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class _DropLibraryChatter(logging.logging.Filter):
    """Orbax logs every save phase at INFO through absl; keep its warnings, drop the rest."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def code_version() -> dict:
    """vljax version and, when run from a git checkout, the commit and whether it had local changes."""
    import subprocess

    import vljax

    out = {"vljax": vljax.__version__, "jax": jax.__version__}
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ===================================================================================================
# Mesh
# ===================================================================================================


def make_mesh() -> Mesh:
    """One `data` axis over every device of every process (data parallel, replicated parameters)."""
    return Mesh(np.array(jax.devices()), ("data",))


# ===================================================================================================
# Input
# ===================================================================================================


def resolve_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Manifest:
    """Loads the manifest named by `config.data.dir`, generating the phantom first when asked."""
    data_dir = config.data.dir
    if config.data.phantom:
        from vljax.data.phantom import PhantomConfig, generate_phantom

        data_dir = data_dir or str(workdir / "phantom")
        if jax.process_index() == 0:
            generate_phantom(data_dir, PhantomConfig(num_studies=config.data.phantom_studies,
                                                     seed=config.data.phantom_seed,
                                                     signs=config.data.get("phantom_signs", "designed"),
                                                     workers=max(1, min(4, os.cpu_count() or 1))),
                             log=logging.info)
    if not data_dir:
        raise ValueError(
            "config.data.dir is not set: pass --config.data.dir=/path/to/merlin_data (a folder in the "
            "Merlin release layout, or a .jsonl manifest), or use the embedded synthetic dataset with "
            "--config=configs/merlin.py:phantom")
    return load_manifest(data_dir)


def ct_config(config: ml_collections.ConfigDict) -> ct_lib.CTPreprocessConfig:
    d = config.data
    return ct_lib.CTPreprocessConfig(spacing=tuple(d.spacing), shape=tuple(d.shape),
                                     hu_window=tuple(d.hu_window), dtype=d.dtype)


def tokenizer_for(config: ml_collections.ConfigDict):
    path = config.data.tokenizer or (config.model.text.path if config.model.text.init == "pretrained" else None)
    return reports_lib.load_tokenizer(path)


def text_table(config, tokenizer, records) -> pipeline.TextTable:
    return pipeline.tokenize_table(tokenizer, pipeline.full_report_texts(records), config.data.max_text_len)


def run_text_tower(table: pipeline.TextTable, text_fn: Callable, batch: int = 32, bucket: int = 32,
                   out_dtype=np.float32, ragged: bool = False):
    """`text_fn(ids, mask)` over every row of `table`, in the table's order.

    Rows are sorted by length and grouped by their length rounded up to `bucket` tokens; a group of
    width w runs in batches of `batch * (max_len // w)` rows (few compiled shapes, about the same
    number of tokens per call, far fewer tokens than padding everything to max_len). Attention
    masking makes the result independent of the padding length.

    Pooled outputs come back as [n, H]. Token states come back as [n, max_len, H] (zero beyond each
    batch's width), or with `ragged=True` as (flat [sum of row lengths, H], offsets [n + 1]).
    """
    n, max_len = table.input_ids.shape
    lengths = table.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    order = np.argsort(-lengths, kind="stable")
    width_of = lambda length: min(max_len, int(-(-max(int(length), 1) // bucket) * bucket))  # noqa: E731
    out = None
    s = 0
    while s < n:
        # Short rows (e.g. report sections) go in larger batches: about batch x max_len tokens each.
        width = width_of(lengths[order[s]])
        rows = batch * max(1, max_len // width)
        idx = order[s:s + rows]
        idx = idx[[width_of(lengths[i]) == width for i in idx]]  # one width per batch
        s += len(idx)
        ids, mask = table.input_ids[idx, :width], table.attention_mask[idx, :width]
        pad = rows - len(idx)
        if pad:  # keep the batch dimension fixed (one shape per width)
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        feats = np.asarray(text_fn(ids, mask))[:len(idx)]
        if out is None:
            if feats.ndim == 2:
                shape = (n, feats.shape[-1])
            else:
                shape = (int(offsets[-1]), feats.shape[-1]) if ragged else (n, max_len, feats.shape[-1])
            out = np.zeros(shape, out_dtype)
        if feats.ndim == 2:
            out[idx] = feats
        elif ragged:
            for k, r in enumerate(idx):
                out[offsets[r]:offsets[r + 1]] = feats[k, :lengths[r]]
        else:
            out[idx, :width] = feats
    return (out, offsets) if ragged else out


def cache_text_features(table: pipeline.TextTable, text_fn: Callable) -> pipeline.TextTable:
    """Adds the locked text tower's last hidden states to `table`, ragged (only each row's own tokens;
    computed once; stored as float16 to halve host memory, ~2e-4 relative rounding; the trainable
    pooling sees them as float32). The tower runs once per distinct text: report sections repeat
    (63 % of the phantom's 8,516 training text rows are copies of another row)."""
    _, first, inverse = np.unique(table.input_ids, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first)  # distinct rows in order of first appearance (deterministic batching)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    distinct = first[order]
    sub = pipeline.TextTable(table.input_ids[distinct], table.attention_mask[distinct])
    feats, sub_offsets = run_text_tower(sub, text_fn, out_dtype=np.float16, ragged=True)
    lengths = table.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    features = np.empty((int(offsets[-1]), feats.shape[-1]), np.float16)
    for r, u in enumerate(rank[inverse]):
        features[offsets[r]:offsets[r + 1]] = feats[sub_offsets[u]:sub_offsets[u + 1]]
    return dataclasses.replace(table, features=features, offsets=offsets)


def sentence_features(texts: Sequence[str], tokenizer, pooled_fn: Callable, max_len: int) -> np.ndarray:
    """[len(texts), H] float32: each text's mean over its sentences (`reports.split_sentences` of the
    normalised text) of `pooled_fn(ids, mask)`, the locked tower's mean-pooled features of one
    sentence. Every distinct sentence goes through the tower once: the 47,000 training texts of the
    6,000-study phantom hold 470 distinct sentences, so this takes seconds where the token-level
    cache (`cache_text_features`) takes minutes."""
    where: dict[str, int] = {}
    members: list[list[int]] = []
    for k, text in enumerate(texts):
        sentences = reports_lib.split_sentences(text)
        if not sentences:
            raise ValueError(f"text {k} has no sentence after normalisation (empty text)")
        members.append([where.setdefault(x, len(where)) for x in sentences])
    enc = reports_lib.tokenize(tokenizer, list(where), max_len)
    feats = run_text_tower(pipeline.TextTable(enc["input_ids"], enc["attention_mask"]), pooled_fn)
    out = np.empty((len(texts), feats.shape[-1]), np.float32)
    for k, idx in enumerate(members):
        out[k] = feats[idx].mean(axis=0)
    return out


def train_records(config, manifest: Manifest) -> list:
    """The training split, or its seeded `config.data.train_fraction` subset (nested across fractions)."""
    records = manifest.split("train")
    keep = sampling_lib.subset_indices(len(records), config.data.train_fraction, config.subset_seed)
    return [records[i] for i in keep]


def make_sampler(config, records) -> tuple[sampling_lib.BatchSampler, list[dict[str, str]]]:
    d = config.data
    texts = sampling_lib.unit_texts(records)
    units = sampling_lib.study_units(records, texts)
    sampler = sampling_lib.make_sampler(
        units, config.batch_size, config.data_seed, strategy=d.sampling, balance_ratio=d.balance_ratio,
        alternate=d.alternate, sections=None if d.sections is None else tuple(d.sections),
        period=d.section_period, order=d.section_order)
    return sampler, texts


def train_source(config, manifest: Manifest, tokenizer, text_fn: Callable | None = None) -> pipeline.TrainBatches:
    records = train_records(config, manifest)
    sampler, texts = make_sampler(config, records)
    units = (sampling_lib.FULL,) + sampler.schedule.sections
    if text_fn is not None and config.model.text.pooling == "sentence_mean":
        t0 = time.perf_counter()
        flat, rows = pipeline.unit_strings(texts, units)
        pooled = sentence_features(flat, tokenizer, text_fn, config.data.max_text_len)
        unit_texts = pipeline.UnitTexts(pipeline.TextTable.from_pooled(pooled), rows)
        logging.info("text features of %d training texts from their sentences in %.1f s", len(flat),
                     time.perf_counter() - t0)
    else:
        unit_texts = pipeline.tokenize_units(tokenizer, texts, units, config.data.max_text_len)
        if text_fn is not None:
            unit_texts = dataclasses.replace(unit_texts, table=cache_text_features(unit_texts.table, text_fn))
    volumes = None
    if config.data.get("cache_volumes", False):  # small inputs: decode and resample every training volume once
        t0 = time.perf_counter()
        volumes = pipeline.preload_volumes(records, ct_config(config), workers=max(1, os.cpu_count() or 1))
        logging.info("cached %d preprocessed training volumes (%.1f MiB) in %.1f s", len(volumes),
                     volumes.nbytes / 2**20, time.perf_counter() - t0)
    return pipeline.TrainBatches(records, unit_texts, sampler,
                                 config.total_steps, ct_config(config),
                                 with_phenotypes=config.model.phenotype_weight > 0,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 volumes=volumes)


# ===================================================================================================
# Model
# ===================================================================================================


@dataclasses.dataclass
class Model:
    """The model's static structure plus what is needed to rebuild and shard its state."""

    spec: two_tower.ModelSpec
    graphdef: Any
    abstract_params: Any
    abstract_rest: Any


def model_spec(config, manifest: Manifest | None) -> two_tower.ModelSpec:
    num_phen = 0
    if config.model.phenotype_weight > 0:
        if manifest is None or not manifest.phenotype_codes:
            raise ValueError("config.model.phenotype_weight > 0 but the dataset has no phenotype table")
        num_phen = len(manifest.phenotype_codes)
    return two_tower.ModelSpec.from_config(config.model, num_phenotypes=num_phen)


def abstract_model(spec: two_tower.ModelSpec, seed: int) -> Model:
    abstract = nnx.eval_shape(lambda: two_tower.build_model(spec, nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return Model(spec, graphdef, params, rest)


def init_model(model: Model, seed: int, replicated: NamedSharding) -> tuple[Any, Any]:
    """Random init compiled once, placed replicated on the mesh; pretrained text weights loaded after."""

    def init():
        _, params, rest = nnx.split(two_tower.build_model(model.spec, nnx.Rngs(seed)), nnx.Param, ...)
        return params, rest

    params, rest = jax.jit(init, out_shardings=replicated)()
    if model.spec.text_init == "pretrained":
        m = nnx.merge(model.graphdef, params, rest, copy=True)
        two_tower.load_pretrained(m, model.spec)
        _, params, rest = nnx.split(m, nnx.Param, ...)
        params, rest = jax.device_put((params, rest), replicated)
    return params, rest


# ===================================================================================================
# Update
# ===================================================================================================


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
    """Global-batch InfoNCE: local rows x all-gathered columns inside `shard_map` over `data`."""
    return jax.shard_map(lambda i, t, s: losses.global_infonce(i, t, s, "data"), mesh=mesh,
                         in_specs=(P("data"), P("data"), P()), out_specs=P())


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


def new_train_state(params, rest, tx, seed: int) -> dict:
    return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed), "bad_step": jnp.full((), -1, jnp.int32)}


def abstract_train_state(model: Model, tx, seed: int, sharding: NamedSharding) -> dict:
    """Shapes, dtypes and shardings of the train state (restore target; nothing is allocated)."""
    state = jax.eval_shape(lambda p, r: new_train_state(p, r, tx, seed), model.abstract_params,
                           model.abstract_rest)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


# ===================================================================================================
# Checkpoint
# ===================================================================================================


def checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=("state", "data", "config"))


def check_resumable(saved: dict, config) -> None:
    """Refuse to resume a workdir whose run had a different recipe (names the differing fields)."""
    now, before = _flat(_config_json(config)), _flat(saved)
    differ = sorted(k for k in set(now) | set(before)
                    if k not in _RESUMABLE_FIELDS and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"the checkpoints in this workdir come from a different config (fields "
                         f"{', '.join(differ)}); resume with the same config or use a new --workdir")


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state) -> Any:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


# ===================================================================================================
# Evals
# ===================================================================================================


def make_embed_fns(model: Model, mesh: Mesh) -> tuple[Callable, Callable]:
    """Jitted (image embeddings, text embeddings) functions in evaluation mode."""
    replicated = NamedSharding(mesh, P())

    @functools.partial(jax.jit, out_shardings=replicated)
    def embed_image(params, rest, image):
        return nnx.merge(model.graphdef, params, rest, copy=True).encode_image(image, train=False)

    @functools.partial(jax.jit, out_shardings=replicated)
    def embed_text(params, rest, input_ids, attention_mask):
        return nnx.merge(model.graphdef, params, rest, copy=True).encode_text(input_ids, attention_mask,
                                                                             train=False)

    return embed_image, embed_text


def make_text_embedder(model: Model, mesh: Mesh, params, rest, tokenizer, max_len: int) -> Callable:
    """`embed(texts)`: L2-normalised text embeddings [N, E] of normalised texts, in evaluation mode,
    by the model's own text path (token ids through the tower, or with "sentence_mean" pooling the
    mean of the texts' sentence features through the projection)."""
    replicated = NamedSharding(mesh, P())
    if model.spec.pooling != "sentence_mean":
        _, embed_text = make_embed_fns(model, mesh)
        text_fn = functools.partial(embed_text, params, rest)
        return lambda texts: run_text_tower(pipeline.tokenize_table(tokenizer, list(texts), max_len), text_fn)

    @functools.partial(jax.jit, out_shardings=replicated)
    def pooled(params, rest, input_ids, attention_mask):
        return nnx.merge(model.graphdef, params, rest, copy=True).text_features(input_ids, attention_mask,
                                                                              train=False)

    @functools.partial(jax.jit, out_shardings=replicated)
    def project(params, rest, features):
        return nnx.merge(model.graphdef, params, rest, copy=True).embed_text_features(features)

    pooled_fn = functools.partial(pooled, params, rest)
    return lambda texts: np.asarray(project(params, rest, sentence_features(texts, tokenizer, pooled_fn, max_len)))


def _host_infonce(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    def ce(lg):
        lse = np.logaddexp.reduce(lg, axis=1)
        return float(np.mean(lse - np.diag(lg)))
    return 0.5 * (ce(logits) + ce(logits.T))


# With `data.cache_volumes`, splits of at least this many studies are preprocessed in parallel before
# evaluation (below it, starting the worker processes costs more than it saves).
EVAL_PRELOAD_MIN_STUDIES = 256


def evaluate_split(config, model: Model, params, rest, records, tokenizer, mesh: Mesh, *,
                   workers: int = 0) -> dict:
    """Zero-shot (30 findings), image→report retrieval and InfoNCE loss on `records`."""
    embed_image, _ = make_embed_fns(model, mesh)
    embed_texts = make_text_embedder(model, mesh, params, rest, tokenizer, config.data.max_text_len)
    batch_size = config.eval_batch_size
    texts = text_table(config, tokenizer, records)
    volumes = None
    if config.data.get("cache_volumes", False) and len(records) >= EVAL_PRELOAD_MIN_STUDIES:
        # Small inputs, a large split (the phantom's final evaluation): decode and resample the
        # volumes in one process per core first, instead of one by one in this process.
        volumes = pipeline.preload_volumes(records, ct_config(config), workers=max(1, os.cpu_count() or 1))
    source = pipeline.EvalBatches(records, texts, batch_size, ct_config(config),
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  volumes=volumes)
    imgs, labels = [], []
    for batch in pipeline.make_iterator(source, workers=workers):
        g_valid = np.asarray(multihost_utils.process_allgather(batch["valid"].astype(bool), tiled=True))
        g_labels = np.asarray(multihost_utils.process_allgather(batch["labels"], tiled=True))
        i = embed_image(params, rest, pipeline.to_global({"image": batch["image"]}, mesh)["image"])
        imgs.append(np.asarray(i)[g_valid])
        labels.append(g_labels[g_valid])
    img, lab = np.concatenate(imgs), np.concatenate(labels)
    txt = embed_texts(pipeline.full_report_texts(records))
    scale = float(nnx.merge(model.graphdef, params, rest, copy=True).logit_scale())

    table = zero_shot.prompt_table(zero_shot.prompts_for(config.get("zero_shot_prompts", "merlin")))
    phrase_emb = embed_texts(table.texts)
    scores = zero_shot.zero_shot_scores(img, phrase_emb, table)
    # InfoNCE over consecutive full batches (the same batch size as training would use).
    full = (len(img) // config.batch_size) * config.batch_size
    batch_losses = [_host_infonce(img[s:s + config.batch_size], txt[s:s + config.batch_size], scale)
                    for s in range(0, full, config.batch_size)]
    return {
        "num_studies": int(len(img)),
        "loss": float(np.mean(batch_losses)) if batch_losses else None,
        "zero_shot": zero_shot.zero_shot_metrics(scores, lab, seed=0),
        "retrieval": zero_shot.retrieval_metrics(img, txt),
    }


def _subset(records, max_studies: int):
    return records if not max_studies or len(records) <= max_studies else records[:max_studies]


def geometry_record(config) -> dict:
    """The volume geometry the run trained on: the recipe name (`configs/merlin.py` geometry=), the
    backend `auto` was resolved on, voxel size and shape (None for runs from before the record)."""
    d = config.data
    return {"name": d.get("geometry"), "backend": d.get("geometry_backend"),
            "spacing_mm": [float(x) for x in d.spacing], "shape": [int(x) for x in d.shape]}


def write_results(workdir: pathlib.Path, split: str, step: int, result: dict, config) -> pathlib.Path:
    name = "results.json" if split == "test" else f"results_{split}.json"
    payload = {"split": split, "step": step, **result, "geometry": geometry_record(config),
               "config": _config_json(config),
               "code_version": code_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = workdir / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    tmp.replace(path)
    return path


# ===================================================================================================
# Loop
# ===================================================================================================


def _append_batches(path: pathlib.Path, step: int, unit: str, study_ids: list[str]) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "unit": unit, "studies": study_ids}) + "\n")


def write_run_stats(workdir: pathlib.Path, config: ml_collections.ConfigDict, source: pipeline.TrainBatches) -> dict:
    """WORKDIR/run_stats.json: what the batches of the whole run contain (they are a pure function of
    the seeds and the step, so this holds for every run of this config, resumed or not)."""
    stats = sampling_lib.run_statistics(source.sampler, config.total_steps)
    stats = {"sampling": config.data.sampling, "train_fraction": config.data.train_fraction,
             "seeds": {"model": config.seed, "data_order": config.data_seed, "subset": config.subset_seed},
             **stats}
    (workdir / "run_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _truncate_batches(path: pathlib.Path, from_step: int) -> None:
    """Drops entries of steps >= `from_step` (written after the checkpoint the run resumes from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < from_step]
    path.write_text("".join(line + "\n" for line in kept))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       stop_at_step: int | None = None) -> dict | None:
    """Runs (or resumes) the training job in `workdir`; returns the final results (process 0).

    `stop_at_step` ends the process's work early after saving a checkpoint there, as a preemption
    would (for tests of exact resumption).
    """
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    d = config.data
    sampling_lib.check_options(strategy=d.sampling, balance_ratio=d.balance_ratio, train_fraction=d.train_fraction,
                               sections=d.sections, period=d.section_period, order=d.section_order,
                               seeds={"seed": config.seed, "data_seed": config.data_seed,
                                      "subset_seed": config.subset_seed})
    manifest = resolve_data(config, workdir)
    tokenizer = tokenizer_for(config)

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    if config.batch_size % mesh.size:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {mesh.size} devices")
    if config.eval_batch_size % mesh.size:
        raise ValueError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
                         f"{mesh.size} devices")

    model = abstract_model(model_spec(config, manifest), config.seed)
    tx, schedule = make_optimizer(config)
    mngr = checkpoint_manager(workdir, config)
    latest = mngr.latest_step()
    abstract_state = abstract_train_state(model, tx, config.seed, replicated)
    if latest is not None:
        saved_cfg = mngr.restore(latest, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        check_resumable(saved_cfg, config)
        state = restore_state(mngr, latest, abstract_state)
        logging.info("resuming from %s at step %d", workdir / "checkpoints", latest)
    else:
        params, rest = init_model(model, config.seed, replicated)
        state = jax.device_put(new_train_state(params, rest, tx, config.seed), replicated)

    text_fn = None
    if not config.model.text.trainable:
        if config.model.text.pooling == "sentence_mean":  # pooled features of single sentences
            text_fn = jax.jit(lambda p, r, ids, mask: nnx.merge(model.graphdef, p, r, copy=True).text_features(
                ids, mask, train=False), out_shardings=replicated)
        else:
            text_fn = jax.jit(lambda p, r, ids, mask: nnx.merge(model.graphdef, p, r, copy=True).text_hidden(
                ids, mask, train=False), out_shardings=replicated)
        text_fn = functools.partial(text_fn, state["params"], state["rest"])
    source = train_source(config, manifest, tokenizer, text_fn)
    del text_fn  # it holds the initial state's buffers, which the first step donates
    train_records = source.loader.records
    data_iter = pipeline.make_iterator(source, workers=config.data.workers, prefetch=config.data.prefetch)
    if latest is not None:
        data_iter = mngr.restore(latest, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iter)))["data"]
    start = int(state["step"])
    if is_main:
        (workdir / "config.json").write_text(json.dumps(_config_json(config), indent=2))
        _truncate_batches(workdir / "train_batches.jsonl", start)
        stats = write_run_stats(workdir, config, source)
        logging.info("sampling %s: %d training studies, %d steps (%s), normal fraction per batch "
                     "min/mean/max %.3f/%.3f/%.3f -> %s", config.data.sampling, stats["train_studies"],
                     config.total_steps, ", ".join(f"{k} {v}" for k, v in stats["steps_per_unit"].items()),
                     *stats["normal_fraction_per_batch"]["all"].values(), workdir / "run_stats.json")

    train_step = jax.jit(make_train_step(model, tx, schedule, config, mesh), donate_argnums=0,
                         out_shardings=(jax.tree.map(lambda x: x.sharding, abstract_state), replicated))
    writer = MetricWriter(workdir / "tb", enabled=is_main)
    if start == 0:
        writer.write_hparams(_config_json(config))
    progress = Progress(config.total_steps, start, config.batch_size)
    acc, last_step = None, start
    logging.info("training steps %d..%d, global batch %d on %d devices", start, config.total_steps,
                 config.batch_size, mesh.size)

    def save(step: int, force: bool = False):
        bad = int(state["bad_step"])
        if bad >= 0:
            raise NonFiniteLossError(_nonfinite_message(bad, mngr.latest_step()))
        mngr.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(_config_json(config))))

    try:
        for step in range(start, config.total_steps):
            batch = next(data_iter)
            if int(batch["step"]) != step:
                raise RuntimeError(f"data iterator is at step {int(batch['step'])}, trainer at {step}")
            if is_main:
                _append_batches(workdir / "train_batches.jsonl", step, sampling_lib.UNITS[int(batch["unit"])],
                                [train_records[i].study_id for i in batch["study_index"]])
            g = pipeline.to_global({k: v for k, v in batch.items()
                                    if k not in ("step", "unit", "study_index", "labels")}, mesh)
            state, m = train_step(state, g)
            acc = m if acc is None else acc.merge(m)
            done = step + 1
            if done % config.log_every == 0 or done == config.total_steps:
                values = {k: float(v) for k, v in jax.device_get(acc.compute()).items()
                          if k != "phenotype_loss" or config.model.phenotype_weight > 0}
                acc = None
                bad = int(state["bad_step"])
                if bad >= 0:
                    raise NonFiniteLossError(_nonfinite_message(bad, mngr.latest_step()))
                speed = progress.update(done)
                writer.write_scalars(done, {**values, **speed})
                logging.info(progress.format(done, values, speed))
            if config.eval_every and done % config.eval_every == 0 and done != config.total_steps:
                val = evaluate_split(config, model, state["params"], state["rest"],
                                     _subset(manifest.split("val"), config.eval_max_studies), tokenizer, mesh)
                writer.write_scalars(done, {"val/loss": val["loss"] or float("nan"),
                                            "val/zero_shot_macro_f1": val["zero_shot"]["macro_f1"],
                                            "val/retrieval_r5": val["retrieval"]["r5"]})
                logging.info("step %d val: loss %s zero-shot macro F1 %.4f (all-positive %.4f)", done,
                             val["loss"], val["zero_shot"]["macro_f1"], val["zero_shot"]["baselines"]["all_positive"])
            if done % config.ckpt_every == 0 or done == config.total_steps or done == stop_at_step:
                save(done, force=True)
            last_step = done
            if stop_at_step is not None and done >= stop_at_step:
                mngr.wait_until_finished()
                writer.close()
                return None
        mngr.wait_until_finished()
    except BaseException:
        mngr.wait_until_finished()  # never leave a half-written checkpoint behind
        writer.close()
        raise

    split = config.final_eval_split
    result = evaluate_split(config, model, state["params"], state["rest"], manifest.split(split), tokenizer,
                            mesh, workers=0)
    zs = result["zero_shot"]
    writer.write_scalars(last_step, {f"{split}/zero_shot_macro_f1": zs["macro_f1"],
                                     f"{split}/retrieval_r1": result["retrieval"]["r1"]})
    writer.close()
    mngr.close()
    if is_main:
        path = write_results(workdir, split, last_step, result, config)
        logging.info("%s zero-shot macro F1 %.4f (baselines: all-positive %.4f, random %.4f); R@1/5/10 "
                     "%.3f/%.3f/%.3f -> %s", split, zs["macro_f1"], zs["baselines"]["all_positive"],
                     zs["baselines"]["random"], result["retrieval"]["r1"], result["retrieval"]["r5"],
                     result["retrieval"]["r10"], path)
        report.write_report(zs, split, workdir, step=last_step, log=logging.info)
    return result


def _nonfinite_message(bad_step: int, last_ckpt: int | None) -> str:
    where = f"the last checkpoint (step {last_ckpt})" if last_ckpt is not None else "no checkpoint yet"
    return (f"the loss or its gradient became NaN/inf at step {bad_step}; that update was not applied and "
            f"the run stopped. The workdir holds {where}. Lower config.optim.lr, keep "
            f"config.optim.grad_clip > 0, or check the inputs of that step (train_batches.jsonl).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required, e.g. "
                             "--config=configs/merlin.py:phantom --workdir=/tmp/vljax_run")
    logging.get_absl_handler().addFilter(_DropLibraryChatter())
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, NonFiniteLossError, FileNotFoundError, ModuleNotFoundError) as e:
        logging.error("%s", e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
