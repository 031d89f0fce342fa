"""Train state and checkpoints: the state's structure (parameters, other model state, optimiser
state, step, RNG, first non-finite step), its abstract shapes for restoring, the orbax manager
(state + config + dataset fingerprint, asynchronous), the checks that a workdir's
checkpoints come from a resumable config and the same data, the fallback past unreadable
checkpoints, and bitwise digests of a state.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any

from absl import logging
import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import ml_collections
import orbax.checkpoint as ocp

from vljax import inputs, modeling, update
from vljax import sharding as sharding_lib
from vljax.metric_writer import flatten
from vljax.modeling import Model
from vljax.run_files import config_json

# Fields that may differ between a checkpointed run and its resumption (they change nothing learnt;
# `data.on_error`: a run stopped by an unreadable volume may go on with "skip", whose stand-ins are a
# function of the seed and the step).
# `data.geometry_backend` only says where `geometry=auto` was resolved; a changed `data.geometry` (or
# spacing/shape) is refused.
RESUMABLE_FIELDS = frozenset({
    "log_every", "eval_every", "eval_max_studies", "ckpt_every", "keep_checkpoints", "data.workers",
    "data.prefetch", "final_eval_split", "eval_batch_size", "data.dir", "data.geometry_backend",
    "data.cache_volumes", "data.cache", "zero_shot_prompts", "resume", "data.on_error", "data.max_skip_fraction",
    # CXR-CLIP: the data's location (its content is the dataset fingerprint's) and evaluation-only fields.
    "data.dirs", "eval.classes", "eval.multiclass", "eval.multiclass_per_class", "eval.probe_fractions",
    "eval.probe_max_train",
    # The mesh: a checkpoint restores into any mesh's shardings (orbax reshards on restore).
    "mesh.data", "mesh.fsdp", "mesh.fsdp_min_size"})
# Recipe fields added after checkpoints were first written: a saved config without one ran with this value.
ADDED_FIELDS = {"model.image.bn_stats": "global"}
ITEMS = ("state", "config", "dataset")
UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir could be restored, or resuming it would be wrong."""


def new_train_state(params, rest, tx, seed: int) -> dict:
    return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed), "bad_step": jnp.full((), -1, jnp.int32)}


def init_train_state(model: Model, tx, seed: int, abstract_state: dict) -> dict:
    """A new train state, every array created in its place (`abstract_state`'s shardings) by jitted
    functions: never whole on one device."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    params, rest = modeling.init_model(model, seed, (shardings["params"], shardings["rest"]))
    return jax.jit(lambda p, r: new_train_state(p, r, tx, seed), out_shardings=shardings,
                   donate_argnums=(0, 1))(params, rest)


def abstract_train_state(model: Model, tx, seed: int, sharding: NamedSharding | Mesh,
                         fsdp_min_size: int | None = None) -> dict:
    """Shapes, dtypes and shardings of the train state (restore target; nothing is allocated).
    `sharding`: one sharding for every array, or a mesh (`vljax.sharding.state_shardings`: FSDP)."""
    state = jax.eval_shape(lambda p, r: new_train_state(p, r, tx, seed), model.abstract_params,
                           model.abstract_rest)
    if isinstance(sharding, Mesh):
        shardings = sharding_lib.state_shardings(sharding, state, fsdp_min_size)
    else:
        shardings = jax.tree.map(lambda _: sharding, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _one_writer_per_array() -> None:
    """On one process, orbax writes each replicated array from one replica instead of splitting it
    across all of them. Orbax's default ("replica-parallel") cuts every replicated array into one slice
    per device so that each host writes a part; on a single process the same host writes every part,
    so the split only costs an eager, compiled slice per distinct shape and device (216 compilations,
    15 of the 45 seconds of a 2-step tiny run with a pretrained text tower on 8 CPU devices). The files
    written are the same. Multi-process runs keep orbax's default."""
    if jax.process_count() > 1 or getattr(ocp.type_handlers.get_type_handler(jax.Array), "_vljax_single", False):
        return
    from orbax.checkpoint._src.metadata import array_metadata_store  # orbax's default handler has one

    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                             array_metadata_store=array_metadata_store.Store())
    handler._vljax_single = True
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    _one_writer_per_array()
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=ITEMS)


def check_resumable(saved: dict, config) -> None:
    """Refuse to resume a workdir whose run had a different recipe (names the differing fields)."""
    now, before = flatten(config_json(config)), {**ADDED_FIELDS, **flatten(saved)}
    differ = sorted(k for k in set(now) | set(before)
                    if k not in RESUMABLE_FIELDS and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"the checkpoints in this workdir come from a different config (fields "
                         f"{', '.join(differ)}); resume with the same config or use a new --workdir")


def digest_rows(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def dataset_fingerprint(manifest, train_records, sampler) -> dict:
    """What the run's batches and evaluations are made of, as digests (no text, no paths): every
    study's id and split, its labels, report text, phenotypes, volume file name, size and mtime
    (seconds), the training records in order and the sampler's inputs. Moving the same files to
    another folder keeps the fingerprint; changing, adding or removing any of them changes it."""
    recs = manifest.records
    files = []
    for r in recs:
        try:
            st = os.stat(r.image)
            files.append([r.study_id, os.path.basename(r.image), st.st_size, int(st.st_mtime)])
        except OSError:
            files.append([r.study_id, os.path.basename(r.image), None, None])
    units = sampler.units
    return {
        "studies": {s: sum(r.split == s for r in recs) for s in ("train", "val", "test")},
        "splits": digest_rows([r.study_id, r.split] for r in recs),
        "labels": digest_rows([r.study_id, list(r.labels)] for r in recs),
        "reports": digest_rows([r.study_id, r.findings, r.impression] for r in recs),
        "phenotypes": digest_rows([[list(manifest.phenotype_codes)]]
                              + [[r.study_id, None if r.phenotypes is None else list(r.phenotypes)] for r in recs]),
        "files": digest_rows(files),
        # Per study (name, bytes, mtime): not compared itself, it names the files behind a "files" change.
        "file_stats": {sid: rest for sid, *rest in files},
        "train_records": digest_rows([r.study_id] for r in train_records),
        "sampler": digest_rows([repr(sampler), units.available.astype(np.uint8).tolist(),
                            units.abnormal.astype(np.uint8).tolist()]),
    }


def check_same_dataset(saved: dict | None, now: dict, step: int, force: bool) -> None:
    """Refuses to resume on other data (the fields that differ); `force` only warns."""
    detail = ""
    if saved is None:
        differ = ["(no fingerprint: the checkpoint predates dataset fingerprints)"]
    else:
        differ = sorted(k for k in set(saved) | set(now) if k != "file_stats" and saved.get(k) != now.get(k))
        old_files, new_files = saved.get("file_stats", {}), now.get("file_stats", {})
        changed = sorted(k for k in set(old_files) | set(new_files) if old_files.get(k) != new_files.get(k))
        if "files" in differ and changed:
            same_size = all(k in old_files and k in new_files and old_files[k][:2] == new_files[k][:2]
                            for k in changed)
            detail = (f"; {len(changed)} volume file(s) differ, e.g. {', '.join(changed[:3])}"
                      + (" (same names and sizes, other modification times: a copy that did not keep "
                         "times, e.g. cp -r instead of cp -a or rsync -a?)" if same_size else ""))
    if not differ:
        return
    what = (f"the dataset differs from the one checkpoint step {step} was trained on (fields "
            f"{', '.join(differ)}){detail}")
    if force:
        logging.warning("=" * 80)
        logging.warning("config.resume=force: resuming although %s. The rest of the run trains on "
                        "other data than its first part.", what)
        logging.warning("=" * 80)
        return
    raise CheckpointError(f"{what}; resume with the same data (files may move: --config.data.dir may "
                          "differ), use a new --workdir, or --config.resume=force to resume anyway")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _set_aside(mngr: ocp.CheckpointManager, workdir: pathlib.Path, step: int) -> pathlib.Path:
    """Moves an unreadable step directory out of checkpoints/ (kept for inspection, never deleted)."""
    dest = workdir / UNREADABLE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(workdir / "checkpoints" / str(step)), str(dest))
    mngr.reload()
    return dest


def restore_resumable(mngr: ocp.CheckpointManager, workdir: pathlib.Path, abstract_state, config,
                      fingerprint: dict) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

    Each step, newest first, is read whole (config, fingerprint, state). One that
    cannot be read is named with the reason, moved to WORKDIR/checkpoints_unreadable/ and the next
    older one is tried. A readable checkpoint from another config or other data stops the run
    (`check_resumable`, `check_same_dataset`): that is not damage, and no older step would do.
    """
    workdir = pathlib.Path(workdir)
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = workdir / "checkpoints" / str(step)
        try:
            saved_config = restore_config(mngr, step)
            saved_fp = (mngr.restore(step, args=ocp.args.Composite(dataset=ocp.args.JsonRestore()))["dataset"]
                        if (step_dir / "dataset").is_dir() else None)
        except Exception as e:  # noqa: BLE001 - any failure to read means this step is unusable
            _warn_unreadable(step, e, _set_aside(mngr, workdir, step))
            continue
        check_resumable(saved_config, config)
        check_same_dataset(saved_fp, fingerprint, step, force=config.get("resume", "auto") == "force")
        try:
            state = restore_state(mngr, step, abstract_state)
        except Exception as e:  # noqa: BLE001
            _warn_unreadable(step, e, _set_aside(mngr, workdir, step))
            continue
        return step, state
    return None, None


def _warn_unreadable(step: int, e: BaseException, moved_to: pathlib.Path) -> None:
    logging.warning("checkpoint step %d cannot be restored (%s); moved it to %s and falling back to "
                    "the previous checkpoint", step, _one_line(e), moved_to)


def tree_digest(tree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes: equal digests mean bitwise-equal trees."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state) -> Any:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]


def restore_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with checkpoint `step` (as JSON)."""
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def save(mngr: ocp.CheckpointManager, step: int, state, config, fingerprint: dict) -> None:
    """Train state, the config and the dataset fingerprint at `step` (asynchronous). The data
    position is the step itself: batch k is a pure function of the seeds and k."""
    mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json(config)),
        dataset=ocp.args.JsonSave(fingerprint)))


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
    if config.data.get("cache") and not pathlib.Path(config.data.cache).is_dir():  # a speed-up, same volumes
        logging.warning("the run's volume cache %s is gone: preprocessing volumes on the fly", config.data.cache)
        config.data.cache = None
    manifest = inputs.resolve_data(config, workdir)
    tokenizer = inputs.tokenizer_for(config)
    try:
        mesh = modeling.make_mesh(config)
    except ValueError as e:  # trained on another device count: evaluate data-parallel here
        logging.info("%s; evaluating with every device on the data axis", e)
        mesh = modeling.make_mesh()
    model = modeling.abstract_model(modeling.model_spec(config, manifest), config.seed)
    tx, _ = update.make_optimizer(config)
    abstract = abstract_train_state(model, tx, config.seed, mesh, sharding_lib.min_size(config))
    mngr = checkpoint_manager(workdir, config)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {workdir / 'checkpoints'}")
        if step < 0:
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"no checkpoint at step {step}; available: {sorted(steps)}")
        try:
            state = restore_state(mngr, step, abstract)
        except Exception as e:  # noqa: BLE001 - say which step and why, not orbax's traceback
            raise CheckpointError(f"checkpoint step {step} in {workdir / 'checkpoints'} cannot be restored "
                                  f"({_one_line(e)}); pass --step with one of {sorted(steps)}, or resume "
                                  "training there, which falls back past unreadable steps") from None
    finally:
        mngr.close()
    return dict(config=config, manifest=manifest, tokenizer=tokenizer, mesh=mesh, model=model,
                params=state["params"], rest=state["rest"], state=state, step=step)
