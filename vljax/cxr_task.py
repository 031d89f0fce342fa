"""CXR-CLIP's part of the trainer (`vljax/train.py` runs the loop): `CXRTask` supplies the data, the
model spec, the Grain source, the train step and the evaluations; `CXREvaluator` is built once per run
and evaluates a split:

- zero-shot binary classification per class with the prompt pair "{Class}" / "No {class}" (AUROC,
  accuracy, F1 against the all-positive and majority baselines), every labelled class but "no finding";
- multi-class zero-shot over `config.eval.multiclass` (CheXpert 5×200 style: studies positive for
  exactly one of the classes), each class a prompt ensemble of its bank's positive sentences;
- image→text retrieval R@1/5/10 over the studies with a report (text: the longer of findings and
  impression, CXR-CLIP's protocol), against chance;
- a linear probe on the frozen pooled image features at `config.eval.probe_fractions` of the labelled
  training studies (AUROC), against the same probe on random features.
"""

from __future__ import annotations

import functools
import pathlib

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from flax import nnx

from vljax import cxr, inputs, modeling, run_files, update
from vljax import evaluator as evaluator_lib
from vljax.data import cxr_pipeline, pipeline
from vljax.data import reports as reports_lib
from vljax.data.cxr_manifest import CXRStudy
from vljax.evals import cxr_eval
from vljax.evals.linear_probe import linear_probe, random_feature_probe

NO_PROMPT_PAIR = ("no finding",)   # left out of the default zero-shot classes


class _NoSkips:
    """CXR batches never stand in for unreadable images (a bad image stops the run, naming it)."""

    path = None

    def start(self, *_):
        pass

    def record(self, *_):
        return None

    def flush(self):
        pass


class _Units:
    def __init__(self, indices):
        self.indices, self.unit = indices, 0  # unit 0: the whole study (sampling_lib.UNITS[0])


class _BatchLogSampler:
    """`run_files.BatchLog`'s view of the CXR order: step k's study indices, one text unit."""

    def __init__(self, sampler):
        self.sampler = sampler

    def batch(self, step):
        return _Units(self.sampler.indices(step))


class CXRTask:
    """CXR-CLIP (configs/cxr_clip.py) for `vljax.train`."""

    def __init__(self, config, workdir: pathlib.Path, mesh: Mesh):
        cxr.check_config(config, mesh)
        self.config = config
        self.bank = cxr.load_bank(config)
        self.manifest = cxr.resolve_data(config, workdir)
        cxr.check_classes(self.manifest, self.bank)
        self.tokenizer = inputs.tokenizer_for(config)
        self.records = cxr.train_records(self.manifest)
        self.fingerprint = cxr.fingerprint(self.manifest, self.records, cxr.make_sampler(config, self.records))

    def model_spec(self, mesh):
        return modeling.model_spec(self.config, None, mesh)

    def source(self, text_fn):
        return cxr.train_source(self.config, self.manifest, self.tokenizer, self.bank, text_fn)

    def logs(self, workdir, source, is_main):
        log = run_files.BatchLog(workdir / "train_batches.jsonl", _BatchLogSampler(source.sampler),
                                 [r.study_id for r in source.records], enabled=is_main)
        return log, _NoSkips()

    def write_run_stats(self, workdir, source) -> None:
        config, records = self.config, source.records
        n_report = sum(r.has_report for r in records)
        stats = {"task": cxr.TASK, "train_studies": len(records), "image_text_studies": n_report,
                 "image_label_studies": len(records) - n_report,
                 "multi_view_studies": sum(len(r.images) > 1 for r in records),
                 "steps": config.total_steps, "epochs": config.total_steps * config.batch_size / len(records),
                 "seeds": {"model": config.seed, "data_order": config.data_seed}}
        run_files.write_json_atomic(workdir / "run_stats.json", stats)
        logging.info("CXR-CLIP: %d training studies (%d image-text, %d image-label, %d with several views), "
                     "%d steps = %.1f epochs -> %s", len(records), n_report, len(records) - n_report,
                     stats["multi_view_studies"], config.total_steps, stats["epochs"], workdir / "run_stats.json")

    def train_step(self, model, tx, schedule, mesh, state_shardings):
        return update.jit_train_step(model, tx, schedule, self.config, mesh, state_shardings,
                                     grad_fn=cxr.make_grad_fn(model, self.config, mesh),
                                     metrics=cxr.CXRTrainMetrics)

    def evaluator(self, model, mesh):
        return CXREvaluator(self.config, model, mesh, self.tokenizer, self.bank, self.manifest.classes,
                            probe_train=self._probe_train())

    def _probe_train(self) -> tuple[CXRStudy, ...]:
        labelled = [r for r in self.records if r.labels]
        return tuple(labelled[:self.config.eval.probe_max_train]) if self.config.eval.probe_max_train else ()

    def validate(self, evaluator, state, done) -> dict:
        records = self.manifest.split("val")
        if self.config.eval_max_studies:
            records = records[:self.config.eval_max_studies]
        val = evaluator.evaluate(state["params"], state["rest"], records, probe=False)
        zs, ret = val["zero_shot"], val["retrieval"]
        logging.info("step %d val: zero-shot macro AUROC %s, R@5 %s", done, _fmt(zs["macro_auroc"]),
                     _fmt(ret["r5"] if ret else None))
        return {"val/zero_shot_macro_auroc": _nan(zs["macro_auroc"]),
                "val/retrieval_r5": _nan(ret["r5"] if ret else None)}

    def final(self, evaluator, state, workdir, last_step, writer, is_main) -> dict:
        config, split = self.config, self.config.final_eval_split
        result, predictions = evaluator.evaluate(state["params"], state["rest"], self.manifest.split(split),
                                                 with_predictions=True)
        writer.write_scalars(last_step, {f"{split}/zero_shot_macro_auroc": _nan(result["zero_shot"]["macro_auroc"])})
        if is_main:
            path = run_files.write_results(workdir, split, last_step, result, config)
            np.savez(workdir / f"cxr_predictions_{split}.npz", **predictions)  # not the CT predictions format
            for line in summary_lines(result, split):
                logging.info("%s", line)
            logging.info("-> %s", path)
        return result


def _nan(x):
    return float("nan") if x is None else float(x)


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def summary_lines(result: dict, split: str) -> list[str]:
    """The end-of-run summary: each headline figure beside its trivial baseline."""
    zs, mc, ret, probes = result["zero_shot"], result["multiclass"], result["retrieval"], result["linear_probe"]
    lines = [f"{split}: {result['num_studies']} studies ({result['report_studies']} with a report)",
             f"zero-shot binary ({zs['n_classes']} classes): macro AUROC {_fmt(zs['macro_auroc'])} (chance 0.5), "
             f"accuracy {_fmt(zs['macro_accuracy'])} (majority {_fmt(zs['baselines']['majority_accuracy'])}), "
             f"F1 {_fmt(zs['macro_f1'])} (all-positive {_fmt(zs['baselines']['all_positive_f1'])})"]
    if mc:
        lines.append(f"zero-shot {len(mc['counts'])}-way ({mc['n']} studies): accuracy {_fmt(mc['accuracy'])} "
                     f"(chance {_fmt(mc['chance'])}, majority {_fmt(mc['majority'])})")
    if ret:
        lines.append(f"image->text retrieval ({ret['n_texts']} texts): R@1/5/10 {_fmt(ret['r1'], '.3f')}/"
                     f"{_fmt(ret['r5'], '.3f')}/{_fmt(ret['r10'], '.3f')} (chance {_fmt(ret['chance']['r1'], '.3f')}/"
                     f"{_fmt(ret['chance']['r5'], '.3f')}/{_fmt(ret['chance']['r10'], '.3f')})")
    for key, p in probes.items():
        lines.append(f"linear probe {key} of labels ({p['train_examples']} studies): macro AUROC "
                     f"{_fmt(p['macro_auroc'])} (random features {_fmt(p['random_features']['macro_auroc'])})")
    return lines


# ---------------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------------


class CXREvaluator:
    """`evaluate(params, rest, records)` → zero-shot, multi-class, retrieval and linear-probe results.
    Built once per run: its jitted functions see fixed shapes (eval batches of
    `config.eval_batch_size`, text rows in length buckets, projections in fixed chunks)."""

    def __init__(self, config, model: modeling.Model, mesh: Mesh, tokenizer, bank, classes,
                 probe_train: tuple[CXRStudy, ...] = ()):
        self.config, self.model, self.mesh, self.tokenizer, self.bank = config, model, mesh, tokenizer, bank
        # "no finding" has no prompt pair: "No no finding" is not a sentence, and its pair would score
        # the absence of every finding as if it were one (config.eval.classes can still name it).
        self.classes = tuple(config.eval.classes or (c for c in classes if c not in NO_PROMPT_PAIR))
        self.probe_train = probe_train
        merge = lambda p, r: nnx.merge(model.graphdef, p, r, copy=True)  # noqa: E731
        jit = functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))

        def image(p, r, x):
            m = merge(p, r)
            feats = m.image_features(x, train=False)
            return feats, m.embed_image_features(feats, train=False)

        self._image = jit(image)
        self._scale = jit(lambda p, r: merge(p, r).logit_scale())
        self.text = evaluator_lib.TextEmbedder(model, mesh, tokenizer, config.data.max_text_len)
        self._probe_cache: dict | None = None

    def embed_texts(self, params, rest, texts) -> np.ndarray:
        """[N, E] embeddings of raw texts (normalised here, as the training texts are)."""
        return self.text(params, rest, [reports_lib.normalize_report_text(t) for t in texts])

    def embed_images(self, params, rest, records) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, embeddings) of each study's evaluation image (`cxr_pipeline.eval_image`)."""
        d = self.config.data
        source = cxr_pipeline.CXREvalImages(records, batch_size=self.config.eval_batch_size, image_size=d.image_size,
                                            mean=d.mean, std=d.std, process_index=jax.process_index(),
                                            process_count=jax.process_count())
        feats, embs = [], []
        with pipeline.closing_iterator(pipeline.make_iterator(source, workers=0)) as it:
            for batch in it:
                valid = np.asarray(multihost_utils.process_allgather(batch["valid"].astype(bool), tiled=True))
                f, e = self._image(params, rest, pipeline.to_global({"image": batch["image"]}, self.mesh)["image"])
                feats.append(np.asarray(f)[valid])
                embs.append(np.asarray(e)[valid])
        return np.concatenate(feats), np.concatenate(embs)

    def evaluate(self, params, rest, records, *, probe: bool = True, with_predictions: bool = False):
        records = tuple(records)
        feats, img = self.embed_images(params, rest, records)
        scale = float(self._scale(params, rest))
        classes = [c for c in self.classes if any(c in r.label_dict() for r in records)]
        labels = cxr_eval.label_matrix([r.label_dict() for r in records], classes)
        prompts = cxr_eval.binary_prompt_texts(classes)
        emb = self.embed_texts(params, rest, prompts)
        zs = cxr_eval.binary_zero_shot(img, emb[:len(classes)], emb[len(classes):], labels, scale, classes=classes)
        result = {"num_studies": len(records), "report_studies": sum(r.has_report for r in records),
                  "classes": classes, "zero_shot": zs, "multiclass": self._multiclass(params, rest, img, labels, classes)}
        reported = [i for i, r in enumerate(records) if r.has_report]
        texts = [records[i].retrieval_text() for i in reported]
        txt = self.embed_texts(params, rest, texts) if texts else np.zeros((0, img.shape[1]), np.float32)
        result["retrieval"] = (cxr_eval.image_text_retrieval(img[reported], txt, texts=texts) if len(reported) > 1
                               else None)
        result["linear_probe"] = self._probes(params, rest, feats, labels, classes) if probe else {}
        if not with_predictions:
            return result
        predictions = {"study_ids": np.asarray([r.study_id for r in records]), "classes": np.asarray(classes),
                       "labels": labels, "image_emb": img, "image_features": feats,
                       "probabilities": cxr_eval.binary_probabilities(img, emb[:len(classes)], emb[len(classes):], scale),
                       "report_rows": np.asarray(reported, np.int64), "text_emb": txt}
        return result, predictions

    def _multiclass(self, params, rest, img, labels, classes) -> dict | None:
        wanted = [c for c in self.config.eval.multiclass if c in classes and c in self.bank]
        if len(wanted) < 2:
            return None
        rows, targets = cxr_eval.single_positive_subset(labels, [classes.index(c) for c in wanted],
                                                        self.config.eval.multiclass_per_class, seed=0)
        if len(rows) == 0:
            return None
        texts, index = cxr_eval.flatten_prompts([self.bank[c].pos for c in wanted])
        emb = self.embed_texts(params, rest, texts)
        ensembles = [emb[i] for i in index]
        return cxr_eval.multiclass_zero_shot(img[rows], ensembles, targets, classes=wanted)

    def _probes(self, params, rest, test_x, test_y, classes) -> dict:
        if not self.probe_train:
            return {}
        train_x, _ = self.embed_images(params, rest, self.probe_train)
        train_y = cxr_eval.label_matrix([r.label_dict() for r in self.probe_train], classes)
        out = {}
        for fraction in self.config.eval.probe_fractions:
            key = f"{fraction:.0%}"
            res = linear_probe(train_x, train_y, test_x, test_y, fraction=fraction, seed=0, classes=classes)
            res["random_features"] = random_feature_probe(train_y, test_y, dim=train_x.shape[1],
                                                          fraction=fraction, seed=0, classes=classes)
            out[key] = res
        return out
