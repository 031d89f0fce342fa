"""Helpers for the end-to-end tests: the tiny config on a fixture phantom, restoring a run's state,
collecting absl messages, and recounting run_stats.json from train_batches.jsonl."""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib

import jax
import numpy as np
import pytest

from configs import merlin
from vljax import checkpointing, inputs, modeling, update

CONFIG_PATH = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "merlin.py")


def tiny_config(data_dir, total_steps: int = 4):
    """`configs/merlin.py:tiny` on `data_dir` (a fixture phantom), 4 steps logged one by one."""
    c = merlin.get_config("tiny")
    c.data.dir = str(data_dir)
    # The fixture's own phantom identity: with the recipe's the trainer would regenerate the fixture
    # folder at the recipe's size.
    phantom = json.loads((pathlib.Path(data_dir) / "phantom_info.json").read_text())["config"]
    c.data.update(phantom_studies=phantom["num_studies"], phantom_seed=phantom["seed"],
                  phantom_signs=phantom["signs"])
    c.total_steps = total_steps
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.eval_every = 0
    c.ckpt_every = 2
    return c


def load_state(workdir, config, step):
    """Restores the checkpointed train state of `workdir` at `step` as numpy."""
    mesh = modeling.make_mesh()
    from vljax import cxr
    from vljax.data.manifest import load_manifest

    manifest = None if cxr.is_cxr(config) else load_manifest(config.data.dir)
    model = modeling.abstract_model(modeling.model_spec(config, manifest), config.seed)
    tx, _ = update.make_optimizer(config)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = checkpointing.abstract_train_state(model, tx, config.seed, rep)
    mngr = checkpointing.checkpoint_manager(pathlib.Path(workdir), config)
    try:
        return jax.tree.map(np.asarray, checkpointing.restore_state(mngr, step, abstract))
    finally:
        mngr.close()


@contextlib.contextmanager
def absl_messages():
    """The messages absl logs at INFO and above inside the block, as a list."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_run_stats(workdir, config, batches):
    """run_stats.json against a recount of the studies the run logged, with the manifest's labels."""
    from vljax.data.findings import FINDINGS, SECTION_FINDINGS
    from vljax.data.manifest import load_manifest

    stats = json.loads((workdir / "run_stats.json").read_text())
    assert stats["total_steps"] == len(batches) == config.total_steps
    labels = {r.study_id: np.array(r.labels) for r in load_manifest(config.data.dir).split("train")}
    fractions, per_unit = [], {}
    for b in batches:
        per_unit[b["unit"]] = per_unit.get(b["unit"], 0) + 1
        cols = (range(len(FINDINGS)) if b["unit"] == "full" else
                [FINDINGS.index(f) for f in SECTION_FINDINGS[b["unit"]]])
        abnormal = [bool((labels[sid][list(cols)] == 1).any()) for sid in b["studies"]]
        fractions.append(1 - sum(abnormal) / len(abnormal))
    assert {k: v for k, v in stats["steps_per_unit"].items() if v} == per_unit
    assert stats["unique_studies_seen"] == len({sid for b in batches for sid in b["studies"]})
    got = stats["normal_fraction_per_batch"]["all"]
    assert (got["min"], got["max"]) == (min(fractions), max(fractions))
    assert got["mean"] == pytest.approx(np.mean(fractions))
    assert stats["seeds"] == {"model": config.seed, "data_order": config.data_seed, "subset": config.subset_seed}
    assert stats["schedule"]["kind"] == ("full" if config.data.sampling == "random" else "alternating")
    if config.data.sampling != "random":
        assert [b["unit"] for b in batches][::2] == ["full"] * len(batches[::2])
        assert [b["unit"] for b in batches][1::2] == list(stats["schedule"]["sections"])[:len(batches[1::2])]
    return stats, fractions


def random_batches(config, num_phenotypes: int, hidden: int, steps: int) -> list[dict[str, np.ndarray]]:
    """`steps` random host batches of `inputs.batch_spec(config)` (seeded): images in [0, 1), token ids,
    attention masks of random lengths, phenotypes in {-1, 0, 1}."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        batch = {}
        for key, (shape, dtype) in inputs.batch_spec(config, num_phenotypes=num_phenotypes,
                                                     hidden_size=hidden).items():
            if key == "image":
                batch[key] = rng.random(shape, np.float32).astype(dtype)
            elif key == "input_ids":
                batch[key] = rng.integers(1000, 2000, shape).astype(dtype)
            elif key == "attention_mask":
                batch[key] = (np.arange(shape[1]) < rng.integers(4, shape[1], (shape[0], 1))).astype(dtype)
            else:  # phenotypes: -1 unknown, 0, 1
                batch[key] = rng.integers(-1, 2, shape).astype(dtype)
        out.append(batch)
    return out
