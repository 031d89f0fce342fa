"""Checkpoints (`vljax/checkpointing.py`): a train state saved and restored is bitwise the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vljax import checkpointing, modeling, run_files, update
from tests.runs import load_state as _load_state
from tests.runs import tiny_config


def test_checkpoint_round_trip_is_exact(phantom_dir, tmp_path):
    config = tiny_config(phantom_dir)
    mesh = modeling.make_mesh()
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    from vljax.data.manifest import load_manifest

    model = modeling.abstract_model(modeling.model_spec(config, load_manifest(phantom_dir)), config.seed)
    tx, _ = update.make_optimizer(config)
    params, rest = modeling.init_model(model, config.seed, rep)
    state = checkpointing.new_train_state(params, rest, tx, config.seed)
    # Non-trivial optimiser moments and counters, so that every leaf is checked.
    state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3,
                                      state["opt_state"])
    state["step"] = jnp.asarray(7, jnp.int32)
    mngr = checkpointing.checkpoint_manager(tmp_path, config)
    import orbax.checkpoint as ocp

    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         config=ocp.args.JsonSave(run_files.config_json(config))))
    mngr.wait_until_finished()
    mngr.close()
    restored = _load_state(tmp_path, config, 7)
    flat_a = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(restored)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))
