"""The published balanced 25:75 setting on the alternating schedule, end to end through the trainer."""

from __future__ import annotations

import json

import pytest

from vljax import inputs, train
from tests.runs import check_run_stats as _check_run_stats
from tests.runs import tiny_config


@pytest.fixture(scope="module")
def phantom_100(tmp_path_factory):
    from vljax.data.phantom import PhantomConfig, generate_phantom

    out = tmp_path_factory.mktemp("phantom_100")
    generate_phantom(out, PhantomConfig(num_studies=100, seed=3, workers=2), log=lambda *_: None)
    return out


def test_balanced_alternating_run_end_to_end(phantom_100, tmp_path):
    """The published setting (balanced 25:75 on the alternating schedule) through the trainer: every
    logged batch holds exactly 2 normal studies of 8, on the documented schedule."""
    config = tiny_config(phantom_100, total_steps=4)
    config.data.sampling = "balanced"
    config.data.balance_ratio = 0.25
    config.data.sections = ("lower_thorax", "liver", "kidneys", "circulatory")
    config.data.train_fraction = 0.8
    train.train_and_evaluate(config, tmp_path)
    batches = [json.loads(x) for x in (tmp_path / "train_batches.jsonl").read_text().splitlines()]
    assert [b["unit"] for b in batches] == ["full", "lower_thorax", "full", "liver"]
    stats, fractions = _check_run_stats(tmp_path, config, batches)
    assert fractions == [0.25] * 4
    from vljax.data.manifest import load_manifest

    subset = {r.study_id for r in inputs.train_records(config, load_manifest(phantom_100))}
    assert len(subset) == stats["train_studies"] == round(0.8 * len(load_manifest(phantom_100).split("train")))
    assert {sid for b in batches for sid in b["studies"]} <= subset
