r"""Why is zero-shot F1 what it is? Calibration, text side and image side of a trained run.

  python -m vljax.diagnose --workdir=/tmp/vljax_run [--split=test] [--step=N] [--supervised]

Loads the run like `vljax.evaluate` and measures, on the split (`vljax/evals/diagnostics.py`):

1. zero-shot as in results.json (Merlin's fixed rule: positive when the score is > 0);
2. the same scores at each finding's best threshold, chosen on the split itself (an upper bound on
   recalibration, not a result);
3. the protocol with each study's own report text, and its own organ section, in place of the image
   (can the text tower and the phrase lists read the finding at all?);
4. a ridge probe from the image tower's pooled features (`--probe_train` training studies) to each
   finding (has the image tower learned it?);
5. with `--supervised`: the image tower trained from scratch on the 30 labels themselves (masked
   BCE) with the run's own tower, volume geometry, batch, steps and optimiser: what a label-supervised
   model learns with the same compute. Scored with the fixed rule (logit > 0, the analogue of the
   protocol's score > 0), and with per-finding thresholds chosen on the validation split and applied
   to the evaluated split (what calibration with labels adds). Volumes are preprocessed once and held
   in memory (meant for the small phantom volumes).

Runs in one process (any number of local devices). Writes `WORKDIR/diagnostics_<split>.json` and
prints a per-finding table. Only study ids, counts and
metrics are written, never report text.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vljax import cli, inputs, losses, update
from vljax.checkpointing import load_run
from vljax.data import ct as ct_lib
from vljax.data import pipeline, sampling
from vljax.data.findings import FINDING_SECTION, FINDINGS
from vljax.evals import diagnostics, zero_shot
from vljax.evaluator import Evaluator
from vljax.models.resnet3d import ResNet3D

_WORKDIR = cli.workdir()
_SPLIT = cli.split()
_STEP = cli.step()
_DATA_DIR = cli.data_dir()
_PROBE_TRAIN = flags.DEFINE_integer("probe_train", 400, "training studies for the ridge probe (0: all)")
_SUPERVISED = flags.DEFINE_bool("supervised", False, "also train the label-supervised image tower")
_SUPERVISED_STEPS = flags.DEFINE_integer("supervised_steps", 0, "its steps (0: the run's total_steps)")

_MAX_CACHED_BYTES = 8 << 30  # the supervised ceiling holds every volume in memory


def _summary(metrics: dict) -> dict:
    keep = ("f1", "auroc", "n_pos", "n_neg")
    return {"macro_f1": metrics["macro_f1"], "macro_auroc": metrics["macro_auroc"],
            "n_findings": metrics["n_findings"], "excluded": metrics["excluded"], "baselines": metrics["baselines"],
            "per_finding": {k: {m: v[m] for m in keep} for k, v in metrics["per_finding"].items()}}


def _protocol(scores: np.ndarray, labels: np.ndarray) -> dict:
    out = _summary(zero_shot.zero_shot_metrics(scores, labels, seed=0))
    out["best_threshold"] = diagnostics.best_threshold_metrics(scores, labels)
    return out


def text_side(run: dict, records, labels: np.ndarray, phrase_emb: np.ndarray,
              table: zero_shot.PromptTable) -> dict:
    """The protocol with each study's full report, and its own organ section, as the query."""
    embed_texts = run["embed_texts"]
    full = embed_texts(pipeline.full_report_texts(records))
    units = sampling.unit_texts(records)
    section_emb, present = {}, {}
    for sec in sorted(set(FINDING_SECTION.values())):
        has = np.array([bool(u[sec].strip()) for u in units])
        emb = np.zeros((len(records), full.shape[1]), np.float32)
        if has.any():
            emb[has] = embed_texts([u[sec] for u, h in zip(units, has) if h])
        section_emb[sec], present[sec] = emb, has
    sec_scores, sec_labels = diagnostics.section_scores(section_emb, present, phrase_emb, table, labels)
    return {"full_report": _protocol(zero_shot.zero_shot_scores(full, phrase_emb, table), labels),
            "own_section": _protocol(sec_scores, sec_labels)}


def _cached_volumes(records, cfg: ct_lib.CTPreprocessConfig) -> np.ndarray:
    return np.stack([ct_lib.preprocess_ct(r.image, cfg) for r in records]).astype(np.float32)


class _Classifier(nnx.Module):
    """The run's image tower and a linear head over its pooled features."""

    def __init__(self, config, num_labels: int, rngs: nnx.Rngs):
        image_cfg = config.model.image
        self.tower = ResNet3D(image_cfg.depth, width=image_cfg.width, norm=image_cfg.norm,
                              num_groups=image_cfg.num_groups, remat=bool(image_cfg.remat),
                              dtype=jnp.dtype(config.model.dtype), rngs=rngs)
        self.head = nnx.Linear(self.tower.num_features, num_labels, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return self.head(self.tower(x, train=train))


def supervised_ceiling(config: ml_collections.ConfigDict, train_records, eval_records, *, steps: int,
                       seed: int = 0, val_records=()) -> dict:
    """Trains the run's image tower + a linear head on the 30 labels (masked BCE, -1 ignored) with the
    run's batch size and optimiser (`update.make_optimizer`, schedule over `steps`); metrics on
    `eval_records` with the fixed rule (logit > 0) and, given `val_records`, with per-finding
    thresholds chosen on them. Batches: seeded epoch permutations of the training studies."""
    if steps < 1:
        raise ValueError(f"supervised steps must be >= 1, got {steps}")
    cfg = inputs.ct_config(config)
    volumes = int(np.prod(cfg.shape)) * 4 * (len(train_records) + len(eval_records) + len(val_records))
    if volumes > _MAX_CACHED_BYTES:
        raise ValueError(f"--supervised holds every volume in memory: {volumes / 2**30:.1f} GiB for "
                         f"{cfg.shape} volumes (limit {_MAX_CACHED_BYTES / 2**30:.0f} GiB); use it on small "
                         "volumes (the phantom recipe)")
    x_train = _cached_volumes(train_records, cfg)
    y_train = np.array([r.labels for r in train_records], np.int8)
    batch = int(config.batch_size)
    if len(train_records) < batch:
        raise ValueError(f"{len(train_records)} training studies, fewer than one batch of {batch}")
    net = _Classifier(config, len(FINDINGS), nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    opt_config = ml_collections.ConfigDict(config.to_dict())
    opt_config.total_steps = steps
    opt_config.optim.warmup_steps = min(int(config.optim.warmup_steps), steps - 1)
    opt_config.model.text.trainable = True  # no text tower here
    tx, _ = update.make_optimizer(opt_config)
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, rest, opt_state, x, y):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            logits = model(x, train=True)
            loss = losses.phenotype_bce(logits, (y == 1).astype(jnp.float32), mask=y != -1)
            return loss, nnx.state(model, nnx.Not(nnx.Param))
        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    @jax.jit
    def predict(params, rest, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x, train=False)

    per_epoch = len(train_records) // batch
    rng_order = np.random.default_rng(seed)
    order, t0, loss = None, time.time(), float("nan")
    for s in range(steps):
        if s % per_epoch == 0:
            order = rng_order.permutation(len(train_records))
        idx = order[(s % per_epoch) * batch:(s % per_epoch + 1) * batch]
        params, rest, opt_state, loss = step_fn(params, rest, opt_state, x_train[idx], y_train[idx])
        if (s + 1) % max(steps // 5, 1) == 0:
            logging.info("supervised ceiling: step %d/%d, BCE %.4f, %.1f steps/s", s + 1, steps, float(loss),
                         (s + 1) / (time.time() - t0))
    def logits_of(records):
        x = _cached_volumes(records, cfg)
        return np.concatenate([np.asarray(predict(params, rest, x[i:i + batch])) for i in range(0, len(x), batch)])

    y_eval = np.array([r.labels for r in eval_records], np.int8)
    logits = logits_of(eval_records)
    out = _protocol(logits, y_eval)
    if len(val_records):
        y_val = np.array([r.labels for r in val_records], np.int8)
        thresholds = diagnostics.best_thresholds(logits_of(val_records), y_val)
        shifted = logits - np.where(np.isnan(thresholds), 0.0, thresholds)[None, :]
        out["val_threshold"] = _summary(zero_shot.zero_shot_metrics(shifted, y_eval, seed=0))
    out.update(steps=steps, batch_size=batch, final_train_bce=float(loss), train_studies=len(train_records))
    return out


def diagnose_run(workdir: str | pathlib.Path, split: str = "test", step: int = -1, data_dir: str | None = None,
                 *, probe_train: int = 400, supervised: bool = False, supervised_steps: int = 0) -> dict:
    run = load_run(workdir, step, data_dir)
    config, manifest = run["config"], run["manifest"]
    evaluator = Evaluator(config, run["model"], run["mesh"], run["tokenizer"])
    params, rest = run["params"], run["rest"]
    run["embed_texts"] = lambda texts: evaluator.embed_texts(params, rest, texts)
    records = manifest.split(split)
    table = evaluator.prompts
    phrase_emb = run["embed_texts"](table.texts)

    image_feat, image_emb, labels = evaluator.embed_images(params, rest, records)
    if evaluator.skipped_positions:  # on_error=skip left unreadable studies out: keep texts aligned
        left_out = set(evaluator.skipped_positions)
        records = [r for i, r in enumerate(records) if i not in left_out]
    train_records = inputs.train_records(config, manifest)
    probe_records = train_records if not probe_train else train_records[:probe_train]
    probe_feat, _, probe_labels = evaluator.embed_images(params, rest, probe_records)
    out = {
        "workdir": str(workdir), "split": split, "step": run["step"], "num_studies": len(records),
        "zero_shot": _protocol(zero_shot.zero_shot_scores(image_emb, phrase_emb, table), labels),
        "text_as_query": text_side(run, records, labels, phrase_emb, table),
        "image_probe": dict(diagnostics.ridge_probe(probe_feat, probe_labels,
                                                    image_feat, labels), train_studies=len(probe_records)),
    }
    if supervised:
        val = manifest.split("val") if split != "val" else ()
        out["supervised_ceiling"] = supervised_ceiling(config, train_records, records,
                                                       steps=supervised_steps or int(config.total_steps),
                                                       seed=int(config.seed), val_records=val)
    return out


def format_report(d: dict) -> str:
    """A per-finding table (F1 / AUROC) and the macro rows."""
    cols = [("zero-shot", d["zero_shot"]), ("text:report", d["text_as_query"]["full_report"]),
            ("text:section", d["text_as_query"]["own_section"])]
    if "supervised_ceiling" in d:
        cols.append(("supervised", d["supervised_ceiling"]))
    head = f"{'finding':30s}" + "".join(f"{name:>16s}" for name, _ in cols) + f"{'probe AUROC':>14s}"
    lines = [f"{d['split']} split, {d['num_studies']} studies, checkpoint {d['step']}: F1 / AUROC", head]

    def cell(m, f):
        v = m["per_finding"][f]
        if v["f1"] is None or v["auroc"] is None:
            return "-".rjust(16)
        return f"{v['f1']:.2f} / {v['auroc']:.2f}".rjust(16)

    for f in FINDINGS:
        p = d["image_probe"]["per_finding"][f]
        lines.append(f"{f:30s}" + "".join(cell(m, f) for _, m in cols) + (f"{p:>14.2f}" if p is not None else f"{'-':>14s}"))
    def num(x, width):
        return (f"{x:.3f}" if x is not None else "-").rjust(width)

    lines.append(f"{'macro (fixed rule > 0)':30s}" + "".join(
        num(m["macro_f1"], 8) + " / " + num(m["macro_auroc"], 5) for _, m in cols)
        + num(d["image_probe"]["macro_auroc"], 14))
    lines.append(f"{'macro F1, best threshold':30s}" + "".join(
        num(m["best_threshold"]["macro_f1"], 16) for _, m in cols) + "  (chosen on this split: upper bound)")
    if "val_threshold" in d.get("supervised_ceiling", {}):
        lines.append(f"supervised, thresholds chosen on val: macro F1 "
                     f"{num(d['supervised_ceiling']['val_threshold']['macro_f1'], 0)}")
    b = d["zero_shot"]["baselines"]
    lines.append(f"baselines: all-positive {b['all_positive']:.3f}, random {b['random']:.3f}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _SUPERVISED_STEPS.value < 0:
        raise app.UsageError("--supervised_steps must be >= 0")
    try:
        d = diagnose_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _DATA_DIR.value, probe_train=_PROBE_TRAIN.value,
                         supervised=_SUPERVISED.value, supervised_steps=_SUPERVISED_STEPS.value)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    path = pathlib.Path(_WORKDIR.value) / f"diagnostics_{_SPLIT.value}.json"
    if jax.process_index() == 0:
        path.write_text(json.dumps(d, indent=1, allow_nan=False))
    print(format_report(d))
    print(f"-> {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
