"""Unreadable volumes through the trainer: found at start-up from their headers (stop, or leave the
study out with `config.data.on_error=skip`), or when first read (skip: a stand-in from the same class
stream; evaluation leaves the study out), all named in run_stats.json, results.json and the batch log."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from vljax import inputs, train, validate
from vljax.data.manifest import load_manifest
from tests.runs import tiny_config


def _corrupt_middle(path: str) -> None:
    """Flips bytes inside the compressed voxel stream: the header and the gzip trailer stay intact,
    so only reading the voxels finds it."""
    raw = bytearray(pathlib.Path(path).read_bytes())
    mid = len(raw) * 3 // 5
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    pathlib.Path(path).write_bytes(bytes(raw))


def _truncate(path: str) -> None:
    raw = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(raw[: len(raw) // 2])


@pytest.fixture()
def damaged(phantom_dir, tmp_path):
    """The session phantom with: a training study of step 0 corrupt inside its voxel data, a test study
    corrupt the same way, and a validation study truncated (its header check fails)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    config = tiny_config(data)
    manifest = load_manifest(data)
    records = inputs.train_records(config, manifest)
    sampler, _ = inputs.make_sampler(config, records)
    ids = {"train": records[int(sampler.indices(0)[0])].study_id, "test": manifest.split("test")[0].study_id,
           "val": manifest.split("val")[0].study_id}
    by_id = manifest.by_id()
    _corrupt_middle(by_id[ids["train"]].image)
    _corrupt_middle(by_id[ids["test"]].image)
    _truncate(by_id[ids["val"]].image)
    return data, ids


def test_a_truncated_volume_stops_the_run_before_the_model_is_built(damaged, tmp_path, monkeypatch):
    data, ids = damaged
    built = []
    monkeypatch.setattr(train.modeling, "abstract_model", lambda *a, **k: built.append(1))
    with pytest.raises(validate.DatasetError, match=rf"(?s)truncated\s+{ids['val']}.*on_error=skip"):
        train.train_and_evaluate(tiny_config(data), tmp_path / "run")
    assert not built and not (tmp_path / "run" / "checkpoints").exists()


def test_skip_trains_past_unreadable_volumes_and_names_them(damaged, tmp_path):
    data, ids = damaged
    config = tiny_config(data)
    config.data.on_error = "skip"
    config.data.max_skip_fraction = 0.5
    config.data.cache_volumes = False  # read each batch's volumes as it is built
    run = tmp_path / "run"
    result = train.train_and_evaluate(config, run)

    stats = json.loads((run / "run_stats.json").read_text())
    assert [(x["study_id"], x["kind"]) for x in stats["left_out_at_start"]] == [(ids["val"], "truncated")]
    skipped = stats["skipped_in_training"]
    assert [x["study_id"] for x in skipped["studies"]] == [ids["train"]]
    assert skipped["studies"][0]["first_step"] == 0 and skipped["stand_ins_used"] >= 1
    step0 = json.loads((run / "train_batches.jsonl").read_text().splitlines()[0])
    (stand_in,) = step0["stand_ins"].values()
    assert list(step0["stand_ins"]) == [ids["train"]] and ids["train"] not in step0["studies"]
    assert stand_in in step0["studies"]

    results = json.loads((run / "results.json").read_text())
    assert results["skipped"] == {"count": 1, "studies": [ids["test"]]} == result["skipped"]
    n_test = len(load_manifest(data).split("test"))
    assert results["num_studies"] == n_test - 1


def test_skip_stops_when_too_many_studies_fail(damaged, tmp_path):
    data, ids = damaged
    config = tiny_config(data)
    config.data.on_error = "skip"
    config.data.max_skip_fraction = 0.01
    with pytest.raises(validate.DatasetError, match=r"1 of \d+ val studies .*max_skip_fraction=0.01"):
        train.train_and_evaluate(config, tmp_path / "run")
