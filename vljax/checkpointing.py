"""Train state and checkpoints: the state's structure (parameters, other model state, optimiser
state, step, RNG, first non-finite step), its abstract shapes for restoring, the orbax manager
(state + Grain iterator + config, asynchronous) and the check that a workdir's checkpoints come
from a resumable config.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import orbax.checkpoint as ocp

from vljax import inputs, modeling, update
from vljax.metric_writer import flatten
from vljax.modeling import Model
from vljax.run_files import config_json

# Fields that may differ between a checkpointed run and its resumption (they change nothing learnt).
# `data.geometry_backend` only says where `geometry=auto` was resolved; a changed `data.geometry` (or
# spacing/shape) is refused.
RESUMABLE_FIELDS = frozenset({
    "log_every", "eval_every", "eval_max_studies", "ckpt_every", "keep_checkpoints", "data.workers",
    "data.prefetch", "final_eval_split", "eval_batch_size", "data.dir", "data.geometry_backend",
    "data.cache_volumes", "zero_shot_prompts"})


def new_train_state(params, rest, tx, seed: int) -> dict:
    return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed), "bad_step": jnp.full((), -1, jnp.int32)}


def abstract_train_state(model: Model, tx, seed: int, sharding: NamedSharding) -> dict:
    """Shapes, dtypes and shardings of the train state (restore target; nothing is allocated)."""
    state = jax.eval_shape(lambda p, r: new_train_state(p, r, tx, seed), model.abstract_params,
                           model.abstract_rest)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=("state", "data", "config"))


def check_resumable(saved: dict, config) -> None:
    """Refuse to resume a workdir whose run had a different recipe (names the differing fields)."""
    now, before = flatten(config_json(config)), flatten(saved)
    differ = sorted(k for k in set(now) | set(before)
                    if k not in RESUMABLE_FIELDS and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"the checkpoints in this workdir come from a different config (fields "
                         f"{', '.join(differ)}); resume with the same config or use a new --workdir")


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state) -> Any:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


def restore_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with checkpoint `step` (as JSON)."""
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, config) -> None:
    """Train state, the Grain iterator's position and the config at `step` (asynchronous)."""
    import grain

    mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config_json(config))))


def load_run(workdir: str | pathlib.Path, step: int = -1, data_dir: str | None = None) -> dict:
    """Config, data, model and restored state of checkpoint `step` (-1: the latest) of a run.

    Returns a dict with config, manifest, tokenizer, mesh, model, params, rest and step.
    """
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: --workdir must be a directory written by "
                                "vljax.train")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    if data_dir:
        config.data.dir = data_dir
    manifest = inputs.resolve_data(config, workdir)
    tokenizer = inputs.tokenizer_for(config)
    mesh = modeling.make_mesh()
    replicated = NamedSharding(mesh, P())
    model = modeling.abstract_model(modeling.model_spec(config, manifest), config.seed)
    tx, _ = update.make_optimizer(config)
    abstract = abstract_train_state(model, tx, config.seed, replicated)
    mngr = checkpoint_manager(workdir, config)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {workdir / 'checkpoints'}")
        if step < 0:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step}; available: {sorted(steps)}")
        state = restore_state(mngr, step, abstract)
    finally:
        mngr.close()
    return dict(config=config, manifest=manifest, tokenizer=tokenizer, mesh=mesh, model=model,
                params=state["params"], rest=state["rest"], step=step)
