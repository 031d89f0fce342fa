"""End-to-end trainer tests on a tiny config: one-step smoke run, exact resumption after a stop,
checkpoint round trip, NaN stop, config parsing and the missing-data error.

The tiny model (ResNet-18 width 4 on 16x16x8 volumes, a 2-layer BERT) compiles in seconds; runs use
the session's 24-study phantom and the 8 fake CPU devices of conftest.py (global batch 8).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import re
import shutil

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_flags

from configs import merlin
from vljax import train

CONFIG_PATH = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "merlin.py")


def tiny_config(data_dir, total_steps: int = 4):
    c = merlin.get_config("phantom")
    c.data.dir = str(data_dir)
    # The fixture's own phantom identity: with the recipe's (6,000 studies, seed 0) the trainer would
    # regenerate the fixture folder at that size.
    phantom = json.loads((pathlib.Path(data_dir) / "phantom_info.json").read_text())["config"]
    c.data.update(phantom_studies=phantom["num_studies"], phantom_seed=phantom["seed"],
                  phantom_signs=phantom["signs"])
    c.data.shape = (16, 16, 8)
    c.data.spacing = (24.0, 24.0, 40.0)
    c.data.workers = 0
    c.data.max_text_len = 64
    c.model.image.update(depth=18, width=4)
    c.model.text.update(init="scratch", size="tiny", trainable=True, pooling="cls")
    c.model.embed_dim = 16
    c.total_steps = total_steps
    c.batch_size = 8
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.eval_every = 0
    c.ckpt_every = 2
    c.eval_batch_size = 8
    return c


def _load_state(workdir, config, step):
    """Restores the checkpointed train state of `workdir` at `step` as numpy."""
    mesh = train.make_mesh()
    from vljax.data.manifest import load_manifest

    model = train.abstract_model(train.model_spec(config, load_manifest(config.data.dir)), config.seed)
    tx, _ = train.make_optimizer(config)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = train.abstract_train_state(model, tx, config.seed, rep)
    mngr = train.checkpoint_manager(pathlib.Path(workdir), config)
    try:
        return jax.tree.map(np.asarray, train.restore_state(mngr, step, abstract))
    finally:
        mngr.close()


@contextlib.contextmanager
def _absl_messages():
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


@pytest.fixture(scope="module")
def full_run(phantom_dir, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4): workdir, config, final results, log."""
    workdir = tmp_path_factory.mktemp("full_run")
    config = tiny_config(phantom_dir)
    with _absl_messages() as messages:
        result = train.train_and_evaluate(config, workdir)
    return workdir, config, result, messages


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
    geometry = {"name": "cpu", "backend": "cpu", "spacing_mm": [24.0, 24.0, 40.0], "shape": [16, 16, 8]}
    assert json.loads((workdir / "results.json").read_text())["geometry"] == geometry
    saved = json.loads((workdir / "config.json").read_text())["data"]
    assert (saved["geometry"], saved["geometry_backend"]) == ("cpu", "cpu")


def _check_run_stats(workdir, config, batches):
    """run_stats.json against a recount of the studies the run logged, with the manifest's labels."""
    from vljax.data import sampling
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
    from vljax import evaluate

    workdir, _, _, _ = full_run
    run = evaluate.load_run(workdir)
    records = run["manifest"].split("test")
    args = (run["config"], run["model"], run["params"], run["rest"], records, run["tokenizer"], run["mesh"])
    want = train.evaluate_split(*args)
    calls = []
    real = train.pipeline.preload_volumes
    monkeypatch.setattr(train.pipeline, "preload_volumes", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k))[1])
    monkeypatch.setattr(train, "EVAL_PRELOAD_MIN_STUDIES", 1)
    got = train.evaluate_split(*args)
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
    assert d["image_probe"]["train_studies"] == len(train.train_records(config, train.resolve_data(config, workdir)))
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
    train.check_resumable(saved, elsewhere)
    grown = tiny_config(phantom_dir)
    grown.data.update(geometry="accelerator", spacing=(6.0, 6.0, 8.0), shape=(72, 72, 48))
    with pytest.raises(ValueError, match=r"fields data\.geometry, data\.shape, data\.spacing\)"):
        train.check_resumable(saved, grown)
    finer = tiny_config(phantom_dir)
    finer.data.spacing = (12.0, 12.0, 20.0)
    with pytest.raises(ValueError, match=r"fields data\.spacing\)"):
        train.check_resumable(saved, finer)


def test_checkpoint_round_trip_is_exact(phantom_dir, tmp_path):
    config = tiny_config(phantom_dir)
    mesh = train.make_mesh()
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    from vljax.data.manifest import load_manifest

    model = train.abstract_model(train.model_spec(config, load_manifest(phantom_dir)), config.seed)
    tx, _ = train.make_optimizer(config)
    params, rest = train.init_model(model, config.seed, rep)
    state = train.new_train_state(params, rest, tx, config.seed)
    # Non-trivial optimiser moments and counters, so that every leaf is checked.
    state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3,
                                      state["opt_state"])
    state["step"] = jnp.asarray(7, jnp.int32)
    mngr = train.checkpoint_manager(tmp_path, config)
    import orbax.checkpoint as ocp

    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         config=ocp.args.JsonSave(train._config_json(config))))
    mngr.wait_until_finished()
    mngr.close()
    restored = _load_state(tmp_path, config, 7)
    flat_a = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(restored)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


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

    subset = {r.study_id for r in train.train_records(config, load_manifest(phantom_100))}
    assert len(subset) == stats["train_studies"] == round(0.8 * len(load_manifest(phantom_100).split("train")))
    assert {sid for b in batches for sid in b["studies"]} <= subset


def test_sampling_settings_are_checked_before_any_work(tmp_path):
    config = merlin.get_config("phantom,sampling=balanced,balance_ratio=1.5")
    with pytest.raises(ValueError, match=r"config\.data\.balance_ratio=1\.5"):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "phantom").exists()


# --------------------------------------------------------------------------------------------------
# Config handling
# --------------------------------------------------------------------------------------------------


def test_config_argument_parsing():
    assert merlin.parse_arg("phantom,seed=3,steps=10") == {"phantom": True, "seed": 3, "steps": 10}
    assert merlin.parse_arg("") == {}
    c = merlin.get_config("phantom,seed=3,batch=16")
    assert c.seed == 3 and c.batch_size == 16 and c.data.phantom
    full = merlin.get_config()
    assert full.model.image.depth == 152 and tuple(full.data.shape) == (224, 224, 160)
    assert tuple(full.data.spacing) == (1.5, 1.5, 3.0) and not full.data.phantom
    with pytest.raises(ValueError, match="unknown argument 'phantm'"):
        merlin.get_config("phantm")
    with pytest.raises(ValueError, match="not a valid int"):
        merlin.get_config("seed=x")
    with pytest.raises(ValueError, match="needs a value"):
        merlin.get_config("seed")
    c = merlin.get_config("phantom,sampling=balanced,balance_ratio=0.25,train_fraction=0.4,subset_seed=2")
    assert (c.data.sampling, c.data.balance_ratio, c.data.train_fraction, c.subset_seed) == ("balanced", 0.25, 0.4, 2)
    with pytest.raises(ValueError, match="sampling='stratified'"):
        merlin.get_config("sampling=stratified")


def test_phantom_geometry_follows_the_backend_unless_given(monkeypatch):
    assert merlin.resolve_geometry("auto", "cpu") == "cpu"
    assert merlin.resolve_geometry("auto", "gpu") == merlin.resolve_geometry("auto", "tpu") == "accelerator"
    assert merlin.resolve_geometry("cpu", "gpu") == "cpu" and merlin.resolve_geometry("accelerator", "cpu") == "accelerator"
    with pytest.raises(ValueError, match="geometry='gpu'"):
        merlin.resolve_geometry("gpu", "gpu")

    cpu = merlin.get_config("phantom")  # the tests' backend is CPU (conftest.py)
    assert (cpu.data.geometry, cpu.data.geometry_backend) == ("cpu", "cpu")
    explicit_cpu = merlin.get_config("phantom,geometry=cpu").to_dict()
    assert explicit_cpu["data"]["geometry_backend"] is None
    cpu_dict = cpu.to_dict()
    cpu_dict["data"]["geometry_backend"] = None
    assert cpu_dict == explicit_cpu  # auto on CPU is exactly the CPU recipe of _phantom

    def accelerator_values(c):
        assert tuple(c.data.spacing) == (6.0, 6.0, 8.0) and tuple(c.data.shape) == (72, 72, 48)
        assert c.total_steps == 12000 and c.model.image.width == 32 and c.eval_batch_size == 32
        assert c.total_steps > cpu.total_steps and c.model.image.width > cpu.model.image.width
        assert c.data.phantom and c.model.image.depth == cpu.model.image.depth and c.batch_size == cpu.batch_size

    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        acc = merlin.get_config("phantom")
        assert (acc.data.geometry, acc.data.geometry_backend) == ("accelerator", backend)
        accelerator_values(acc)
        assert train._config_json(acc)["data"]["geometry"] == "accelerator"  # what config.json holds
        assert merlin.get_config("phantom,geometry=cpu").to_dict() == explicit_cpu
    assert merlin.get_config("phantom,geometry=accelerator,steps=10").total_steps == 10

    def no_backend():
        raise AssertionError("an explicit geometry must not query (and so initialise) the backend")

    monkeypatch.setattr(jax, "default_backend", no_backend)
    explicit = merlin.get_config("phantom,geometry=accelerator")
    assert (explicit.data.geometry, explicit.data.geometry_backend) == ("accelerator", None)
    accelerator_values(explicit)
    full = merlin.get_config()  # the real-data recipe: Merlin's geometry, no backend query
    assert (full.data.geometry, full.data.geometry_backend) == ("merlin", None)
    with pytest.raises(ValueError, match="phantom default only"):
        merlin.get_config("geometry=accelerator")
    with pytest.raises(ValueError, match=r"geometry='gpu'; choose one of \['auto', 'cpu', 'accelerator'\]"):
        merlin.get_config("phantom,geometry=gpu")


def _parse_flags(*argv):
    fv = flags.FlagValues()
    # config_flags registers the `--config.*` override flags from sys_argv at definition time.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=["prog", *argv])
    fv(["prog", *argv])
    return fv.config


def test_config_flag_overrides_and_unknown_keys():
    c = _parse_flags(f"--config={CONFIG_PATH}:phantom,seed=2", "--config.optim.lr=0.125",
                     "--config.data.dir=/some/where")
    assert c.seed == 2 and c.optim.lr == 0.125 and c.data.dir == "/some/where"
    with pytest.raises(Exception, match="nope"):
        _parse_flags(f"--config={CONFIG_PATH}:phantom", "--config.optim.nope=1")
    with pytest.raises(Exception, match="lr"):
        _parse_flags(f"--config={CONFIG_PATH}", "--config.optim.lr=fast")
    with pytest.raises(Exception, match="phantm"):
        _parse_flags(f"--config={CONFIG_PATH}:phantm")
    assert _parse_flags(f"--config={CONFIG_PATH}:phantom,geometry=accelerator").data.geometry == "accelerator"
    with pytest.raises(Exception, match="geometry='fast'"):
        _parse_flags(f"--config={CONFIG_PATH}:phantom,geometry=fast")
    with pytest.raises(AttributeError):  # configs are locked: no new fields by mistake
        c.optim.new_field = 1


def test_missing_data_dir_stops_at_once_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"config\.data\.dir is not set.*:phantom"):
        train.train_and_evaluate(merlin.get_config(), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# Locked pretrained text tower (the phantom default's text side)
# --------------------------------------------------------------------------------------------------


def test_bucketed_text_tower_equals_full_length_padding():
    from flax import nnx

    from vljax.data.pipeline import TextTable
    from vljax.models import bert as bert_lib
    from vljax.models.two_tower import TwoTower
    from vljax.models.resnet3d import ResNet3D

    rngs = nnx.Rngs(0)
    model = TwoTower(ResNet3D(18, width=4, rngs=rngs), bert_lib.BertModel(bert_lib.BertConfig.tiny(), rngs=rngs),
                     embed_dim=8, pooling="mean", rngs=rngs)
    rng = np.random.default_rng(0)
    n, max_len = 37, 96
    lengths = rng.integers(3, max_len + 1, n)
    mask = (np.arange(max_len)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(1, 1000, (n, max_len)), 0).astype(np.int32)
    fn = jax.jit(lambda i, m: model.text_features(i, m, train=False))
    got = train.run_text_tower(TextTable(ids, mask), fn, batch=8, bucket=16)
    want = np.asarray(fn(ids, mask))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["map", "sentence_mean"])
def test_locked_text_tower_is_not_updated_and_its_cache_matches_the_tower(phantom_dir, tmp_path, pooling):
    config = tiny_config(phantom_dir, total_steps=2)
    config.model.text.update(init="pretrained", pooling=pooling, trainable=False)
    config.ckpt_every = 1
    train.train_and_evaluate(config, tmp_path)
    s1, s2 = _load_state(tmp_path, config, 1), _load_state(tmp_path, config, 2)
    for x, y in zip(jax.tree.leaves(s1["params"]["text_tower"]), jax.tree.leaves(s2["params"]["text_tower"])):
        np.testing.assert_array_equal(x, y)            # AdamW neither updates nor decays it
    trainable = ("text_pool", "text_proj", "image_proj") if pooling == "map" else ("text_proj", "image_proj")
    for name in trainable:  # the trainable parts do learn
        assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(s1["params"][name]),
                                                            jax.tree.leaves(s2["params"][name]))), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["zero_shot"]["macro_f1"] is not None
    if pooling == "sentence_mean":
        return  # its features: test_sentence_features_are_the_mean_of_each_sentence_embedded_alone_...
    # The cached token states equal the pretrained tower's output (float16 storage).
    from vljax.data.manifest import load_manifest
    from vljax.models.bert import load_hf_bert

    bert, _ = load_hf_bert()
    records = load_manifest(phantom_dir).split("train")[:6]
    table = train.text_table(config, train.tokenizer_for(config), records)
    cached = train.cache_text_features(table, jax.jit(lambda i, m: bert(i, m))).hidden(np.arange(len(table)))
    want = np.asarray(bert(table.input_ids, table.attention_mask))
    real = table.attention_mask > 0
    np.testing.assert_allclose(cached[real].astype(np.float32), want[real], rtol=2e-3, atol=2e-3)
    assert not cached[~real].any()


def test_sentence_features_are_the_mean_of_each_sentence_embedded_alone_by_transformers(monkeypatch):
    """`sentence_features` (our Flax MiniLM, mean-pooled, one tower call per distinct sentence)
    against the PyTorch `transformers` MiniLM run on every sentence by itself."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vljax.data import reports
    from vljax.models.bert import default_bert_dir, load_hf_bert
    from vljax.models.resnet3d import ResNet3D
    from vljax.models.two_tower import TwoTower
    from flax import nnx

    texts = [reports.normalize_report_text(t) for t in (
        "Liver: The liver measures 17.5 cm. No steatosis.",
        "Spleen: Normal. No splenomegaly.",
        "Liver: The liver measures 17.5 cm. Hepatic steatosis.",
        "No splenomegaly.")]
    bert, _ = load_hf_bert()
    model = TwoTower(ResNet3D(18, width=4, rngs=nnx.Rngs(0)), bert, embed_dim=8, pooling="sentence_mean",
                     rngs=nnx.Rngs(0))
    pooled_fn = jax.jit(lambda i, m: model.text_features(i, m, train=False))
    tok = train.reports_lib.load_tokenizer(None)
    calls = []
    real = train.run_text_tower
    monkeypatch.setattr(train, "run_text_tower", lambda t, *a, **k: (calls.append(len(t)), real(t, *a, **k))[1])
    got = train.sentence_features(texts, tok, pooled_fn, max_len=64)
    assert calls == [7]  # 11 sentences, 7 distinct: each through the tower once

    ref = transformers.BertModel.from_pretrained(str(default_bert_dir()), local_files_only=True,
                                                 attn_implementation="eager").eval()
    want = []
    for text in texts:
        rows = []
        for sentence in reports.split_sentences(text):
            enc = tok(sentence, return_tensors="pt")
            with torch.no_grad():
                h = ref(**enc).last_hidden_state[0].numpy()
            rows.append(h.mean(axis=0))  # every token is real: one sentence, no padding
        want.append(np.mean(rows, axis=0))
    np.testing.assert_allclose(got, np.array(want), atol=2e-4, rtol=1e-3)
    np.testing.assert_array_equal(got[1][None], train.sentence_features(texts[1:2], tok, pooled_fn, 64))
    with pytest.raises(ValueError, match="text 1 has no sentence"):
        train.sentence_features(["ok .", "  "], tok, pooled_fn, 64)


def test_sentence_pooling_needs_a_locked_text_tower():
    from vljax.models import two_tower

    config = merlin.get_config("phantom")
    config.model.text.update(pooling="sentence_mean", trainable=True)
    with pytest.raises(ValueError, match="locked text tower"):
        two_tower.ModelSpec.from_config(config.model)


def test_text_cache_runs_the_tower_once_per_distinct_text_and_matches_a_full_run(monkeypatch):
    from vljax.data import pipeline

    rng = np.random.default_rng(0)
    distinct = rng.integers(1, 50, size=(5, 12)).astype(np.int32)
    lengths = np.array([12, 3, 7, 1, 9])
    rows = np.array([2, 0, 2, 4, 1, 0, 3, 2, 4])  # copies of the same text, out of order
    mask = (np.arange(12)[None] < lengths[rows][:, None]).astype(np.int32)
    table = pipeline.TextTable(distinct[rows] * mask, mask)
    emb = rng.standard_normal((50, 6)).astype(np.float32)

    def text_fn(i, m):  # token states that depend on the whole row (a prefix sum over positions)
        return jnp.cumsum(jnp.asarray(emb)[i] * m[..., None], axis=1)

    full, offsets = train.run_text_tower(table, text_fn, out_dtype=np.float16, ragged=True)
    sizes = []
    real = train.run_text_tower
    monkeypatch.setattr(train, "run_text_tower", lambda t, *a, **k: (sizes.append(len(t)), real(t, *a, **k))[1])
    cached = train.cache_text_features(table, text_fn)
    assert sizes == [5]  # the tower ran on the 5 distinct texts only
    np.testing.assert_array_equal(cached.offsets, offsets)
    np.testing.assert_array_equal(cached.features, full)  # and every row got its own text's states
    np.testing.assert_array_equal(cached.hidden(np.array([1]))[0], cached.hidden(np.array([5]))[0])
