"""CXR-CLIP through the trainer (`configs/cxr_clip.py`, `vljax/cxr.py`, `vljax/cxr_task.py`): the step's
loss pairs each study's views and texts as DESIGN.md §2 says (against the loss formula on separately
embedded views and texts, on 1 and 8 devices), the trainable text path and the Swin tower step, and one
shared tiny run: its results, files, exact resume and the ablation switch."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cxr_clip
from vljax import checkpointing, cxr, modeling, train, update
from vljax.data.cxr_manifest import load_cxr_manifest
from vljax.data.cxr_phantom import CXRPhantomConfig, generate_cxr_phantom
from tests.runs import load_state

PHANTOM = CXRPhantomConfig(num_studies=48, seed=3, image_size=64, workers=1)


@pytest.fixture(scope="module")
def cxr_phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr_phantom")
    generate_cxr_phantom(out, PHANTOM, log=lambda *_: None)
    return out


def tiny_cxr_config(data_dir, text_dir, **overrides):
    """`configs/cxr_clip.py:tiny` on the fixture phantom with the small fixture BERT as its locked tower."""
    c = cxr_clip.get_config("tiny")
    c.data.dirs = (str(data_dir),)
    c.data.update(phantom_studies=PHANTOM.num_studies, phantom_seed=PHANTOM.seed, phantom_image_size=PHANTOM.image_size)
    c.model.text.path = str(text_dir)
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


@pytest.fixture(scope="module")
def cxr_run(cxr_phantom_dir, small_hf_bert_dir, tmp_path_factory):
    """An uninterrupted 4-step run, validation after step 2, checkpoints at 2 and 4."""
    workdir = tmp_path_factory.mktemp("cxr_run")
    config = tiny_cxr_config(cxr_phantom_dir, small_hf_bert_dir, eval_every=2)
    result = train.train_and_evaluate(config, workdir)
    return workdir, config, result


# ---------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------


def _unit_batch(config, rng, hidden):
    b, s = config.batch_size, config.data.image_size
    return {"image1": rng.standard_normal((b, s, s)).astype(np.float32),
            "image2": rng.standard_normal((b, s, s)).astype(np.float32),
            "text_pooled1": rng.standard_normal((b, hidden)).astype(np.float32),
            "text_pooled2": rng.standard_normal((b, hidden)).astype(np.float32)}


def test_step_loss_and_gradients_pair_each_studys_views_and_texts(small_hf_bert_dir):
    # GroupNorm and no feature BatchNorm: every image's embedding is independent of the batch, so the
    # reference can embed the views one set at a time and apply DESIGN.md §2's formula, written here, on
    # one device; the step runs on 8 (the global batch through the shard_map loss).
    w_icl, w_tcl = 0.7, 0.3  # not the defaults: each term's weight must reach the loss
    config = tiny_cxr_config("unused", small_hf_bert_dir, **{"model.image.norm": "group", "model.image.num_groups": 2,
                                                              "model.image.feature_norm": False,
                                                              "loss.w_icl": w_icl, "loss.w_tcl": w_tcl})
    mesh = modeling.make_mesh()
    model = modeling.abstract_model(modeling.model_spec(config, None, mesh), 0)
    params, rest = modeling.init_model(model, 0, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    batch = _unit_batch(config, np.random.default_rng(0), model.spec.text_config().hidden_size)
    grad_fn = cxr.make_grad_fn(model, config, mesh)
    loss, grads, _, aux = jax.jit(grad_fn)(params, rest, batch, jax.random.key(0))

    def ell(a, b, scale):  # DESIGN.md §2: mean over rows of -log softmax_j(s a_i . b_j) at j = i
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scale * a @ b.T, axis=1)))

    host_rest = jax.device_put(rest, jax.devices()[0])

    def reference(p):
        m = nnx.merge(model.graphdef, p, host_rest, copy=True)
        i1, i2 = (m.encode_image(batch[k], train=True) for k in ("image1", "image2"))
        t1, t2 = (m.embed_text_features(batch[k]) for k in ("text_pooled1", "text_pooled2"))
        s = m.logit_scale()
        clip = 0.5 * (0.25 * sum(ell(x, y, s) for x in (i1, i2) for y in (t1, t2))
                      + 0.25 * sum(ell(y, x, s) for x in (i1, i2) for y in (t1, t2)))
        icl, tcl = 0.5 * (ell(i1, i2, s) + ell(i2, i1, s)), 0.5 * (ell(t1, t2, s) + ell(t2, t1, s))
        return clip + w_icl * icl + w_tcl * tcl, {"clip_loss": clip, "icl_loss": icl, "tcl_loss": tcl}

    (want_loss, want_parts), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(
        jax.device_put(params, jax.devices()[0]))
    assert len(mesh.devices.flat) == 8
    for name, value in want_parts.items():  # each part (the ablation's L_CLIP among them) on its own
        np.testing.assert_allclose(float(aux[name]), float(value), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        g, w = np.asarray(g), np.asarray(w)
        np.testing.assert_allclose(g, w, atol=2e-5 * max(1.0, np.abs(w).max()), err_msg=jax.tree_util.keystr(path))



def test_trainable_text_tower_and_swin_tower_train_a_step(cxr_phantom_dir, small_hf_bert_dir):
    """The published recipe's text path (token ids through a trainable BERT, "eos" pooling, dropout)
    and the Swin tower: one step from the real source changes both towers' weights, loss finite."""
    config = tiny_cxr_config(cxr_phantom_dir, small_hf_bert_dir, **{"model.text.trainable": True,
                                                                     "model.text.pooling": "eos",
                                                                     "model.image.name": "swin",
                                                                     "model.image.swin": "phantom",
                                                                     "optim.warmup_steps": 0})
    mesh = modeling.make_mesh()
    manifest = load_cxr_manifest(cxr_phantom_dir)
    source = cxr.train_source(config, manifest, cxr.inputs.tokenizer_for(config), cxr.load_bank(config), None)
    batch = source[0]["inputs"]
    assert batch["input_ids1"].shape == (config.batch_size, config.data.max_text_len)
    assert set(batch) == set(cxr.batch_spec(config, hidden_size=32))
    model = modeling.abstract_model(modeling.model_spec(config, None, mesh), 0)
    tx, schedule = update.make_optimizer(config)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = checkpointing.abstract_train_state(model, tx, 0, rep)
    state = checkpointing.init_train_state(model, tx, 0, abstract)
    before = jax.tree.map(np.asarray, state["params"])
    step = update.jit_train_step(model, tx, schedule, config, mesh, jax.tree.map(lambda x: x.sharding, abstract),
                                 grad_fn=cxr.make_grad_fn(model, config, mesh), metrics=cxr.CXRTrainMetrics)
    from vljax.data import pipeline

    state, metrics = step(state, pipeline.to_global(batch, mesh))
    values = metrics.compute()
    assert np.isfinite(float(values["loss"])) and float(values["tcl_loss"]) > 0
    for tower in ("image_tower", "text_tower"):
        assert any(not np.array_equal(a, np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(before[tower]), jax.tree.leaves(state["params"][tower]))), tower


# ---------------------------------------------------------------------------------------------------
# One tiny run through `vljax.train`
# ---------------------------------------------------------------------------------------------------


def test_run_reports_every_evaluation_beside_its_baseline(cxr_run):
    workdir, config, result = cxr_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["zero_shot"] == result["zero_shot"] and saved["step"] == config.total_steps
    zs = saved["zero_shot"]
    assert zs["n_classes"] >= 1 and zs["baselines"]["auroc"] == 0.5 and "majority_accuracy" in zs["baselines"]
    ret = saved["retrieval"]
    assert {"r1", "r5", "r10", "chance", "text_to_image"} <= set(ret)
    assert set(saved["linear_probe"]) == {"10%", "100%"}
    for probe in saved["linear_probe"].values():
        assert probe["random_features"]["train_examples"] == probe["train_examples"]
    assert saved["linear_probe"]["10%"]["train_examples"] < saved["linear_probe"]["100%"]["train_examples"]
    # Every zero-shot number is recomputed from the saved predictions alone.
    pred = np.load(workdir / "cxr_predictions_test.npz")
    labels, probs = pred["labels"], pred["probabilities"]
    for j, name in enumerate(pred["classes"]):
        known = (labels[:, j] == 0) | (labels[:, j] == 1)
        if zs["per_class"][str(name)]["auroc"] is not None:
            from vljax.evals.zero_shot import auroc

            assert abs(auroc(labels[known, j] == 1, probs[known, j]) - zs["per_class"][str(name)]["auroc"]) < 1e-9
    manifest = load_cxr_manifest(config.data.dirs[0])
    assert list(pred["study_ids"]) == [r.study_id for r in manifest.split("test")]
    # The validation after step 2 reached the metrics; the run's config and stats are on disk.
    lines = [json.loads(x) for x in (workdir / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val/zero_shot_macro_auroc" in x] == [2]
    assert [x["step"] for x in lines if "clip_loss" in x] == [2, 4]
    stats = json.loads((workdir / "run_stats.json").read_text())
    train_recs = manifest.split("train")
    assert stats["train_studies"] == len(train_recs)
    assert stats["image_text_studies"] == sum(r.has_report for r in train_recs)


def test_train_batches_name_each_steps_studies(cxr_run):
    workdir, config, _ = cxr_run
    records = load_cxr_manifest(config.data.dirs[0]).split("train")
    sampler = cxr.make_sampler(config, records)
    lines = [json.loads(x) for x in (workdir / "train_batches.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(config.total_steps))
    for x in lines:
        assert x["studies"] == [records[i].study_id for i in sampler.indices(x["step"])]


def test_stop_and_resume_equals_the_uninterrupted_run(cxr_run, tmp_path):
    workdir, config, _ = cxr_run
    assert train.train_and_evaluate(config, tmp_path, stop_at_step=2) is None
    assert not (tmp_path / "results.json").exists()
    train.train_and_evaluate(config, tmp_path)
    want, got = load_state(workdir, config, 4), load_state(tmp_path, config, 4)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert (tmp_path / "train_batches.jsonl").read_text() == (workdir / "train_batches.jsonl").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["zero_shot"] == \
        json.loads((workdir / "results.json").read_text())["zero_shot"]


def test_resume_on_changed_data_is_refused(cxr_run, tmp_path):
    import shutil

    workdir, config, _ = cxr_run
    copy = tmp_path / "data"
    shutil.copytree(config.data.dirs[0], copy, copy_function=shutil.copy2)
    line = (copy / "manifest.jsonl").read_text().splitlines()
    first = json.loads(line[0])
    first["impression"] = (first["impression"] or "") + " Stable."
    (copy / "manifest.jsonl").write_text("\n".join([json.dumps(first)] + line[1:]) + "\n")
    run = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints", run / "checkpoints")
    changed = tiny_cxr_config(copy, config.model.text.path)
    with pytest.raises(checkpointing.CheckpointError, match="reports"):
        train.train_and_evaluate(changed, run)


def test_bad_options_are_refused_before_any_work(cxr_phantom_dir, small_hf_bert_dir, tmp_path):
    for key, value, match in (("data.second_text", "other", "second_text"), ("loss.w_icl", -1.0, "w_icl"),
                              ("accum_steps", 2, "accum_steps"), ("model.image.name", "resnet3d", "CT tower")):
        config = tiny_cxr_config(cxr_phantom_dir, small_hf_bert_dir, **{key: value})
        with pytest.raises(ValueError, match=match):
            train.train_and_evaluate(config, tmp_path / key)
    with pytest.raises(ValueError, match="image="):
        cxr_clip.get_config("tiny,image=vit")
    with pytest.raises(ValueError, match="unknown argument"):
        cxr_clip.get_config("tiny,w_icll=0")
    assert cxr_clip.get_config("phantom,w_icl=0,w_tcl=0").loss.to_dict() == {"w_icl": 0.0, "w_tcl": 0.0}


def test_the_icl_tcl_ablation_is_a_sweep_of_two_loss_settings(cxr_run, tmp_path):
    from vljax.sweep import results as sweep_results
    from vljax.sweep import spec

    sweep = spec.load_sweep("configs/sweeps/cxr_ablation.py:smoke")
    runs = sweep.runs()
    assert [(r.setting, r.seed_index) for r in runs] == [("clip_only", 0), ("clip_only", 1), ("icl_tcl", 0),
                                                         ("icl_tcl", 1)]
    for r in runs:
        config = spec.build_config(spec.trainer_flags(sweep, r))
        assert config.task == "cxr_clip" and config.total_steps == cxr_clip.get_config("tiny").total_steps
        assert (config.loss.w_icl, config.loss.w_tcl) == ((0.0, 0.0) if r.setting == "clip_only" else (1.0, 0.5))
        assert (config.seed, config.data_seed) == (r.seed_index, r.seed_index)
    # A local `run` points every run at one shared phantom (DIR/phantom), generated once.
    from vljax.sweep import runner

    plan = runner.plan(sweep, tmp_path)
    assert {tuple(c.data.dirs) for c in plan.configs} == {(str(tmp_path.resolve() / "phantom"),)}
    assert all(f"--config.data.dirs=('{tmp_path.resolve() / 'phantom'}',)" in flags for flags in plan.flags)
    # The sweep report reads a CXR-CLIP run's results: headline metrics, per-class F1, the probes.
    workdir, _, result = cxr_run
    metrics = sweep_results.run_metrics(json.loads((workdir / "results.json").read_text()))
    assert metrics["macro_auroc"] == result["zero_shot"]["macro_auroc"]
    assert metrics["r5"] == result["retrieval"]["r5"]
    assert metrics["probe10%"] == result["linear_probe"]["10%"]["macro_auroc"]
    assert {f"f1/{c}" for c in result["classes"]} <= set(metrics)
