"""End-to-end trainer tests on `configs/merlin.py:tiny`. One 4-step run (`full_run`) serves the
results, logs, progress and chart checks, the evaluator's compile count, the evaluate and diagnose
commands, one-step sanity, exact resumption after a stop and the resume refusals; then the NaN stop
and the errors raised before any work.

The tiny model (ResNet-18 width 4 on 16x16x8 volumes, a 2-layer BERT) compiles in seconds; runs use
the session's 24-study phantom and the 8 fake CPU devices of conftest.py (global batch 8).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import merlin
from vljax import checkpointing, inputs, train
from tests.runs import absl_messages as _absl_messages
from tests.runs import check_run_stats as _check_run_stats
from tests.runs import load_state as _load_state
from tests.runs import tiny_config


CONFIG_PATH = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "merlin.py")


@pytest.fixture(scope="module")
def full_run(phantom_dir, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4, validation after steps 1, 2 and 3):
    workdir, config, final results, log. `EVALUATOR_COMPILES` gets the evaluator's compile counts
    after each of its evaluations."""
    from vljax import evaluator

    workdir = tmp_path_factory.mktemp("full_run")
    config = tiny_config(phantom_dir)
    config.eval_every = 1
    real = evaluator.Evaluator.evaluate_with_predictions  # every evaluation goes through it

    def evaluate(self, *a, **k):
        out = real(self, *a, **k)
        EVALUATOR_COMPILES.append(self.compile_counts())
        return out

    EVALUATOR_COMPILES.clear()
    with pytest.MonkeyPatch.context() as mp, _absl_messages() as messages:
        mp.setattr(evaluator.Evaluator, "evaluate_with_predictions", evaluate)
        result = train.train_and_evaluate(config, workdir)
    return workdir, config, result, messages


EVALUATOR_COMPILES: list[dict] = []


def test_periodic_evaluations_compile_the_evaluator_once(full_run):
    workdir, _, _, messages = full_run
    assert len(EVALUATOR_COMPILES) == 4  # val after steps 1, 2, 3; test at the end
    first = EVALUATOR_COMPILES[0]
    assert first["image"] == 1 and first["logit_scale"] == 1 and first["text"] >= 1
    assert EVALUATOR_COMPILES[1] == first and EVALUATOR_COMPILES[2] == first  # nothing compiled again
    assert EVALUATOR_COMPILES[3]["image"] == 1  # the test split reuses the image function too
    assert sum("step 2 val:" in m for m in messages) == 1
    lines = [json.loads(x) for x in (workdir / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val/loss" in x] == [1, 2, 3]


def test_run_writes_results_checkpoints_and_logs(full_run):
    workdir, config, result, _ = full_run
    results = json.loads((workdir / "results.json").read_text())
    zs = results["zero_shot"]
    assert results["split"] == "test" and results["step"] == 4
    assert 0.0 <= zs["macro_f1"] <= 1.0
    assert set(zs["baselines"]) == {"all_positive", "random"}
    assert set(results["retrieval"]) >= {"r1", "r5", "r10"}
    for stats in zs["per_finding"].values():
        assert set(stats) >= {"f1", "auroc", "n_pos", "n_neg"}
    assert results["config"]["model"]["image"]["width"] == 4
    assert "vljax" in results["code_version"]
    # The run reused the 24-study fixture (8 test studies), it did not generate a phantom of its own.
    assert zs["per_finding"]["hepatic steatosis"]["n_pos"] + zs["per_finding"]["hepatic steatosis"]["n_neg"] <= 24
    assert json.loads((pathlib.Path(config.data.dir) / "phantom_info.json").read_text())["num_studies"] == 24
    assert result["zero_shot"]["macro_f1"] == zs["macro_f1"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    lines = [json.loads(x) for x in (workdir / "tb" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) for x in train_lines)
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    batches = [json.loads(x) for x in (workdir / "train_batches.jsonl").read_text().splitlines()]
    assert [b["step"] for b in batches] == [0, 1, 2, 3]
    assert all(len(b["studies"]) == config.batch_size for b in batches)
    _check_run_stats(workdir, config, batches)


def test_run_logs_progress_and_a_zero_shot_summary_and_draws_the_chart(full_run):
    workdir, config, result, messages = full_run
    # A progress line every log_every (= 1) steps: step/total, steps/s and an m:ss or h:mm:ss ETA.
    progress = [m for m in messages if re.match(r"step \d+/4 ", m)]
    assert [int(re.match(r"step (\d+)/", m).group(1)) for m in progress] == [1, 2, 3, 4]
    assert all(re.search(r"\| [\d.]+ steps/s [\d.]+ ex/s \| ETA (\d+:)?\d+:\d\d$", m) for m in progress)
    # The summary: macro F1/AUROC beside the baselines, best and worst findings; metrics only.
    from vljax.evals import report

    zs = result["zero_shot"]
    assert report.format_summary(zs, "test") in messages
    summary = report.format_summary(zs, "test")
    assert f"macro F1    {zs['macro_f1']:6.3f}" in summary and "macro AUROC" in summary
    assert f"all-positive {zs['baselines']['all_positive']:.3f}" in summary and "chance 0.500" in summary
    best, worst = report.best_and_worst(zs)
    assert best and f"best {len(best)} by F1" in summary and f"worst {len(worst)} by F1" in summary
    from vljax.data.manifest import load_manifest

    ids = [r.study_id for r in load_manifest(config.data.dir).records]
    assert not any(i in m for i in ids for m in messages if "zero-shot" in m)
    chart = workdir / "zero_shot_test.png"
    data = chart.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert f"zero-shot chart -> {chart}" in messages
    # The geometry recipe, as config.json and results.json record it.
    geometry = {"name": "tiny", "backend": None, "spacing_mm": [24.0, 24.0, 40.0], "shape": [16, 16, 8]}
    assert json.loads((workdir / "results.json").read_text())["geometry"] == geometry
    saved = json.loads((workdir / "config.json").read_text())["data"]
    assert (saved["geometry"], saved["geometry_backend"]) == ("tiny", None)


def test_evaluate_cli_reproduces_the_final_results(full_run):
    from vljax import evaluate

    workdir, _, _, _ = full_run
    saved = json.loads((workdir / "results.json").read_text())
    result, path = evaluate.evaluate_run(workdir, "test", -1)
    assert path == workdir / "results.json"
    assert result["zero_shot"] == saved["zero_shot"] and result["retrieval"] == saved["retrieval"]
    _, path_val = evaluate.evaluate_run(workdir, "val", 2)
    assert path_val.name == "results_val.json" and json.loads(path_val.read_text())["step"] == 2
    assert (workdir / "zero_shot_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        evaluate.evaluate_run(workdir, "test", 3)


def test_evaluation_with_volumes_preprocessed_in_parallel_is_identical(full_run, monkeypatch):
    from vljax import evaluator as evaluator_lib
    from vljax.checkpointing import load_run
    from vljax.data import pipeline

    workdir, _, _, _ = full_run
    run = load_run(workdir)
    records = run["manifest"].split("test")

    def evaluate():
        ev = evaluator_lib.Evaluator(run["config"], run["model"], run["mesh"], run["tokenizer"])
        return ev.evaluate(run["params"], run["rest"], records)

    want = evaluate()
    calls = []
    real = pipeline.preload_volumes
    monkeypatch.setattr(pipeline, "preload_volumes", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k))[1])
    monkeypatch.setattr(evaluator_lib, "PRELOAD_MIN_STUDIES", 1)
    got = evaluate()
    assert calls == [len(records)]
    assert got == want


def test_diagnose_reproduces_zero_shot_and_measures_each_side(full_run):
    from vljax import diagnose

    workdir, config, _, _ = full_run
    saved = json.loads((workdir / "results.json").read_text())["zero_shot"]
    d = diagnose.diagnose_run(workdir, "test", probe_train=0, supervised=True, supervised_steps=3)
    json.dumps(d, allow_nan=False)
    zs = d["zero_shot"]
    assert zs["macro_f1"] == saved["macro_f1"] and zs["baselines"] == saved["baselines"]
    assert {f: v["f1"] for f, v in zs["per_finding"].items()} == {
        f: v["f1"] for f, v in saved["per_finding"].items()}
    for part in (zs, d["text_as_query"]["full_report"], d["text_as_query"]["own_section"], d["supervised_ceiling"]):
        used = [f for f, v in part["best_threshold"]["per_finding"].items() if v is not None]
        assert used and all(part["best_threshold"]["per_finding"][f] >= part["per_finding"][f]["f1"] - 1e-12
                            for f in used)
    sup = d["supervised_ceiling"]
    assert sup["val_threshold"]["baselines"] == saved["baselines"]  # same test studies and findings
    assert sup["steps"] == 3 and sup["batch_size"] == config.batch_size and math.isfinite(sup["final_train_bce"])
    assert d["image_probe"]["train_studies"] == len(inputs.train_records(config, inputs.resolve_data(config, workdir)))
    assert "probe AUROC" in diagnose.format_report(d)


def test_one_step_changes_parameters_and_keeps_batch_stats_finite(full_run):
    workdir, config, _, _ = full_run
    s2, s4 = _load_state(workdir, config, 2), _load_state(workdir, config, 4)
    assert int(s2["step"]) == 2 and int(s4["step"]) == 4 and int(s4["bad_step"]) == -1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s2["params"]),
                                                         jax.tree.leaves(s4["params"]))]
    assert sum(changed) > 0.9 * len(changed)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(s4["rest"]))
    counts = jax.tree.leaves(s4["opt_state"])
    assert any(np.asarray(c).shape == () and int(c) == 4 for c in counts)  # AdamW saw 4 updates


def test_stop_and_resume_equals_uninterrupted_run(full_run, phantom_dir, tmp_path):
    workdir, config, _, _ = full_run
    resumed = tmp_path / "resumed"
    assert train.train_and_evaluate(tiny_config(phantom_dir), resumed, stop_at_step=2) is None
    assert not (resumed / "results.json").exists()
    # The second process starts from the step-2 checkpoint: steps 2 and 3 are not repeated/skipped.
    train.train_and_evaluate(tiny_config(phantom_dir), resumed)
    assert (resumed / "train_batches.jsonl").read_text() == (workdir / "train_batches.jsonl").read_text()
    a, b = _load_state(workdir, config, 4), _load_state(resumed, config, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    ra = json.loads((workdir / "results.json").read_text())
    rb = json.loads((resumed / "results.json").read_text())
    assert ra["zero_shot"] == rb["zero_shot"] and ra["retrieval"] == rb["retrieval"]
    # One event file and each step's metrics once, as in the uninterrupted run.
    assert len(list((resumed / "tb").glob("*tfevents*"))) == 1
    steps = [json.loads(x)["step"] for x in (resumed / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # training steps 1..4, then the final test metrics


def test_final_evaluation_saves_predictions_that_reproduce_results(full_run, phantom_dir, tmp_path):
    """The run's predictions_test.npz (trainer) and predictions_val.npz (`vljax.evaluate`) give back
    results.json / results_val.json exactly, and the sweep report over that run finds them reproducible."""
    from tests.sweep.test_report import read_csv
    from vljax import evaluate, run_files
    from vljax.data.findings import FINDINGS
    from vljax.data.manifest import load_manifest
    from vljax.evals import zero_shot
    from vljax.sweep import report

    workdir = tmp_path / "sweep" / "alternating" / "seed_0"
    shutil.copytree(full_run[0], workdir)
    evaluate.evaluate_run(workdir, "val")
    manifest = load_manifest(phantom_dir)
    for split, name in (("test", "results.json"), ("val", "results_val.json")):
        saved = json.loads((workdir / name).read_text())
        p = run_files.read_predictions(workdir / f"predictions_{split}.npz")
        assert (p["split"], p["step"], p["format"]) == (split, 4, run_files.PREDICTIONS_FORMAT)
        assert p["study_ids"] == [r.study_id for r in manifest.split(split)] and p["findings"] == list(FINDINGS)
        n = len(p["study_ids"])
        assert p["scores"].shape == (n, 30) and p["scores"].dtype == np.float64
        assert p["labels"].dtype == np.int8 and set(np.unique(p["labels"])) <= {-1, 0, 1}
        assert p["image_emb"].dtype == p["text_emb"].dtype == np.float32 and p["image_emb"].shape[0] == n
        assert np.array_equal(p["labels"], np.array([r.labels for r in manifest.split(split)]))
        assert zero_shot.zero_shot_metrics(p["scores"], p["labels"], seed=0) == saved["zero_shot"]
        assert zero_shot.retrieval_metrics(p["image_emb"], p["text_emb"]) == saved["retrieval"]
    report.write_report(tmp_path / "sweep", resamples=20)
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "1 of 1 finished runs have a predictions file; metrics recomputed from it equal results.json" in md
    rows, _ = read_csv(tmp_path / "sweep" / "report.csv")
    assert float(rows[("bootstrap", "alternating", "", "macro_f1")]["mean"]) == json.loads(
        (workdir / "results.json").read_text())["zero_shot"]["macro_f1"]


def _copy_run(full_run, dest):
    workdir, config, _, _ = full_run
    shutil.copytree(workdir, dest)
    return dest


def _restore(workdir, config):
    """`restore_resumable` on `workdir` with the trainer's abstract state and fingerprint."""
    from vljax import modeling, update
    from vljax.data.manifest import load_manifest

    manifest = load_manifest(config.data.dir)
    records = inputs.train_records(config, manifest)
    fp = checkpointing.dataset_fingerprint(manifest, records, inputs.make_sampler(config, records)[0])
    model = modeling.abstract_model(modeling.model_spec(config, manifest), config.seed)
    tx, _ = update.make_optimizer(config)
    rep = jax.sharding.NamedSharding(modeling.make_mesh(), jax.sharding.PartitionSpec())
    mngr = checkpointing.checkpoint_manager(pathlib.Path(workdir), config)
    try:
        return checkpointing.restore_resumable(mngr, pathlib.Path(workdir),
                                               checkpointing.abstract_train_state(model, tx, config.seed, rep),
                                               config, fp)
    finally:
        mngr.close()


def _halve_data_files(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["data_files_cut_in_half", "checkpoint_metadata_emptied", "empty_step_dir"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(full_run, tmp_path, damage):
    _, config, _, _ = full_run
    run = _copy_run(full_run, tmp_path / "run")
    step4 = run / "checkpoints" / "4"
    if damage == "data_files_cut_in_half":
        _halve_data_files(step4)
    elif damage == "checkpoint_metadata_emptied":
        (step4 / "_CHECKPOINT_METADATA").write_text("")
    else:
        shutil.rmtree(step4)
        step4.mkdir()
    with _absl_messages() as messages:
        step, state = _restore(run, config)
    if damage == "checkpoint_metadata_emptied":  # orbax reads the state without it: no fallback needed
        from vljax.evaluate import state_digests

        assert step == 4 and checkpointing.tree_digest(state["params"]) == state_digests(full_run[0], 4)["params"]
        return
    assert step == 2 and int(state["step"]) == 2
    warning = next(m for m in messages if "checkpoint step 4 cannot be restored" in m)
    assert "checkpoints_unreadable/4-" in warning and "falling back" in warning
    (moved,) = (run / "checkpoints_unreadable").iterdir()  # kept for inspection, not deleted
    assert moved.name.startswith("4-") and not step4.exists()


def test_resume_past_a_corrupt_checkpoint_ends_bitwise_equal(full_run, phantom_dir, tmp_path):
    workdir, config, _, _ = full_run
    run = _copy_run(full_run, tmp_path / "run")
    _halve_data_files(run / "checkpoints" / "4")
    (run / "results.json").unlink()
    train.train_and_evaluate(tiny_config(phantom_dir), run)  # falls back to step 2, trains 2..4
    from vljax.evaluate import state_digests

    assert state_digests(run, 4) == state_digests(workdir, 4)
    assert (run / "train_batches.jsonl").read_text() == (workdir / "train_batches.jsonl").read_text()
    assert json.loads((run / "results.json").read_text())["zero_shot"] == \
        json.loads((workdir / "results.json").read_text())["zero_shot"]


def test_resume_on_another_mesh_with_fsdp_continues_the_run(full_run, phantom_dir, tmp_path):
    """Checkpoint 2 of the data-parallel run (8x1, replicated state), resumed on a 4x2 mesh with the
    state sharded over fsdp: steps 3 and 4 run sharded and end where the uninterrupted run ends, to
    float32 rounding (the reductions are split differently)."""
    workdir, config, _, _ = full_run
    run = _copy_run(full_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "4")
    (run / "results.json").unlink()
    moved = tiny_config(phantom_dir)
    moved.mesh.update(data=4, fsdp=2, fsdp_min_size=256)
    with _absl_messages() as messages:
        train.train_and_evaluate(moved, run)
    line = next(m for m in messages if m.startswith("mesh data=4 x fsdp=2 over 8 devices"))
    assert re.search(r"state [\d.]+ MiB, [1-9]\d* % of it sharded over fsdp", line), line
    assert any("resuming from" in m and "at step 2" in m for m in messages)
    assert (run / "train_batches.jsonl").read_text() == (workdir / "train_batches.jsonl").read_text()
    a, b = _load_state(run, config, 4), _load_state(workdir, config, 4)
    assert int(a["step"]) == 4
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_digest_tells_equal_and_different_states_apart(full_run):
    from vljax.evaluate import state_digests

    workdir, _, _, _ = full_run
    d4, d2 = state_digests(workdir), state_digests(workdir, 2)
    assert d4["step"] == 4 and d2["step"] == 2
    assert all(len(d4[k]) == 64 and d4[k] != d2[k] for k in ("params", "model_state", "opt_state"))
    assert state_digests(workdir, 4) == d4
    tree = {"a": np.arange(3, dtype=np.float32)}
    flipped = {"a": np.array([0, 1, np.nextafter(np.float32(2), np.float32(3))], np.float32)}
    assert checkpointing.tree_digest(tree) != checkpointing.tree_digest(flipped)


def _dataset_copy(phantom_dir, dest):
    shutil.copytree(phantom_dir, dest)  # copy2: sizes and mtimes kept, as a move would
    return dest


@pytest.mark.parametrize("change, fields", [
    ("report", "reports"), ("label", "labels"), ("volume", r"files\); 1 volume file\(s\) differ, e\.g\. PH\d+ \(same names and sizes"),
    ("split", "sampler, splits, studies, train_records")])
def test_resume_on_changed_data_is_refused_naming_what_differs(full_run, phantom_dir, tmp_path, change, fields):
    run = _copy_run(full_run, tmp_path / "run")
    data = _dataset_copy(phantom_dir, tmp_path / "data")
    if change in ("report", "split"):
        with open(data / "reports.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["study_id", "findings", "impression", "split"]
        k = next(i for i, r in enumerate(rows) if r[3] == "train")
        if change == "report":
            rows[k][1] += " Otherwise unremarkable."
        else:
            rows[k][3] = "test"
        with open(data / "reports.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
    elif change == "label":
        rows = (data / "zero_shot_findings_disease_cls.csv").read_text().splitlines()
        cells = rows[1].split(",")
        cells[1] = "0" if cells[1] == "1" else "1"
        rows[1] = ",".join(cells)
        (data / "zero_shot_findings_disease_cls.csv").write_text("\n".join(rows) + "\n")
    else:
        vol = sorted((data / "merlin_data").iterdir())[0]
        vol.write_bytes(vol.read_bytes())  # same bytes, new mtime: rewritten since training
        os.utime(vol, (vol.stat().st_atime, vol.stat().st_mtime + 5))
    config = tiny_config(data)
    with pytest.raises(checkpointing.CheckpointError, match=rf"dataset differs .* \(fields {fields}.*resume=force"):
        train.train_and_evaluate(config, run)
    assert not (run / "checkpoints_unreadable").exists()  # a refusal damages nothing


def test_resume_on_moved_data_is_allowed_and_force_overrides_a_change(full_run, phantom_dir, tmp_path):
    _, config, _, _ = full_run
    run = _copy_run(full_run, tmp_path / "run")
    moved = _dataset_copy(phantom_dir, tmp_path / "moved")
    step, _ = _restore(run, tiny_config(moved))
    assert step == 4
    vol = sorted((moved / "merlin_data").iterdir())[0]
    os.utime(vol, (vol.stat().st_atime, vol.stat().st_mtime + 5))
    forced = tiny_config(moved)
    forced.resume = "force"
    with _absl_messages() as messages:
        step, _ = _restore(run, forced)
    assert step == 4 and any("config.resume=force: resuming although the dataset differs" in m for m in messages)


def test_resume_with_a_different_recipe_is_refused(full_run, phantom_dir, tmp_path):
    workdir, _, _, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    changed = tiny_config(phantom_dir)
    changed.optim.lr = 1e-2
    with pytest.raises(ValueError, match=r"different config \(fields optim.lr\)"):
        train.train_and_evaluate(changed, copy)


def test_resume_with_a_different_geometry_is_refused(full_run, phantom_dir):
    workdir, _, _, _ = full_run
    saved = json.loads((workdir / "config.json").read_text())
    elsewhere = tiny_config(phantom_dir)
    elsewhere.data.geometry_backend = None  # same recipe, given as geometry=cpu or resolved elsewhere
    checkpointing.check_resumable(saved, elsewhere)
    grown = tiny_config(phantom_dir)
    grown.data.update(geometry="accelerator", spacing=(6.0, 6.0, 8.0), shape=(72, 72, 48))
    with pytest.raises(ValueError, match=r"fields data\.geometry, data\.shape, data\.spacing\)"):
        checkpointing.check_resumable(saved, grown)
    finer = tiny_config(phantom_dir)
    finer.data.spacing = (12.0, 12.0, 20.0)
    with pytest.raises(ValueError, match=r"fields data\.spacing\)"):
        checkpointing.check_resumable(saved, finer)


def test_nan_loss_stops_the_run_and_names_the_step(phantom_dir, tmp_path):
    config = tiny_config(phantom_dir, total_steps=4)
    config.optim.lr = 1e30          # the first update blows the parameters up
    config.optim.grad_clip = 0.0
    with pytest.raises(train.NonFiniteLossError, match=r"NaN/inf at step \d+") as err:
        train.train_and_evaluate(config, tmp_path)
    bad = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert 1 <= bad < 4 and "config.optim.lr" in str(err.value)
    # Checkpoints hold only states from before the bad step, never a NaN state.
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) <= bad
    saved = _load_state(tmp_path, config, max(steps))
    assert int(saved["bad_step"]) == -1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
    assert not (tmp_path / "results.json").exists()


def test_sampling_settings_are_checked_before_any_work(tmp_path):
    config = merlin.get_config("phantom,sampling=balanced,balance_ratio=1.5")
    with pytest.raises(ValueError, match=r"config\.data\.balance_ratio=1\.5"):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "phantom").exists()


def test_missing_data_dir_stops_at_once_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"config\.data\.dir is not set.*:phantom"):
        train.train_and_evaluate(merlin.get_config(), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# Locked pretrained text tower (the phantom default's text side)
# --------------------------------------------------------------------------------------------------



# --------------------------------------------------------------------------------------------------
# Kill and preemption: the real command in a child process
# --------------------------------------------------------------------------------------------------
def _train_command(phantom_dir, workdir):
    c = tiny_config(phantom_dir)
    return [sys.executable, str(pathlib.Path(__file__).parent / "kill_driver.py"),
            f"--config={CONFIG_PATH}:tiny", f"--workdir={workdir}", f"--config.data.dir={phantom_dir}",
            f"--config.data.phantom_studies={c.data.phantom_studies}",
            f"--config.data.phantom_seed={c.data.phantom_seed}", f"--config.data.phantom_signs={c.data.phantom_signs}",
            f"--config.total_steps={c.total_steps}", f"--config.optim.warmup_steps={c.optim.warmup_steps}",
            "--config.log_every=1", "--config.eval_every=0", "--config.ckpt_every=1",
            "--config.data.workers=1", "--config.data.cache_volumes=False"]


def _child_env(**extra):
    """The session's compilation cache and XLA_FLAGS come with the environment (conftest puts them there)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra)


def _live_group_members(pgid: int) -> list[str]:
    """Processes of group `pgid` that are still running (zombies excluded), as "pid cmdline"."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(f"{stat.parent.name} {cmd}")
    return out


def _assert_group_gone(pgid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _live_group_members(pgid), f"orphans left: {_live_group_members(pgid)}"


def _run_until(cmd, env, marker: str, sig: int, timeout: float = 240.0) -> tuple[int, str]:
    """Starts `cmd` in its own process group, sends `sig` to the child alone when `marker` appears in
    its output, and returns (exit status, output) after checking that no process of the group is left."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=pathlib.Path(__file__).parents[1], start_new_session=True)
    lines, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "".join(lines[-30:])
        lines += proc.stdout.readlines()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _assert_group_gone(proc.pid)
    return rc, "".join(lines)


@pytest.mark.slow
def test_sigkill_during_a_save_then_sigterm_then_resume_equals_the_uninterrupted_run(full_run, phantom_dir,
                                                                                        tmp_path):
    workdir, _, _, _ = full_run
    run = tmp_path / "run"
    cmd = _train_command(phantom_dir, run)
    # 1. SIGKILL while the checkpoint of step 2 is being written (step 1 is committed).
    rc, out = _run_until(cmd, _child_env(VLJAX_TEST_HOLD_SAVE="2"), "HOLDING SAVE 2", signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert any(p.name.startswith("2.") for p in (run / "checkpoints").iterdir())  # the unfinished save
    # 2. Restarted: resumes from step 1; SIGTERM (a preemption) after step 2 saves and exits 0.
    rc, out = _run_until(cmd, _child_env(), "step 2/4", signal.SIGTERM)
    assert rc == 0, out[-3000:]
    assert "resuming from" in out and "at step 1" in out
    saved = int(re.search(r"SIGTERM: saved a checkpoint at step (\d)", out).group(1))
    assert saved in (2, 3) and not (run / "results.json").exists()
    # 3. Restarted again: runs to the end.
    train.train_and_evaluate(tiny_config(phantom_dir), run)
    from vljax.evaluate import state_digests

    want = state_digests(workdir, 4)
    assert state_digests(run, 4) == want
    digest = subprocess.run([sys.executable, "-m", "vljax.evaluate", f"--workdir={run}", "--digest"],
                            capture_output=True, text=True, env=_child_env(), timeout=300,
                            cwd=pathlib.Path(__file__).parents[1])
    assert digest.returncode == 0, digest.stderr[-2000:]
    assert digest.stdout.split() == ["step", "4", "params", want["params"], "model_state", want["model_state"],
                                     "opt_state", want["opt_state"]]
    assert (run / "train_batches.jsonl").read_text() == (workdir / "train_batches.jsonl").read_text()
    assert len(list((run / "tb").glob("*tfevents*"))) == 1
    lines = [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert json.loads((run / "results.json").read_text())["zero_shot"] == \
        json.loads((workdir / "results.json").read_text())["zero_shot"]
