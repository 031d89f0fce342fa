"""CXR-CLIP in the trainer (`configs/cxr_clip.py`, DESIGN.md §2): the dataset (phantom or manifests),
the text path, the Grain source of two views and two texts per study, and the loss.

The trainer (`vljax/train.py`) runs the same loop, checkpoints, sharding and metric files as for the
CT model; this module supplies what differs. Texts reach the model in one of two forms:
- a trainable (or locked, token-level) BERT: token ids and masks (`TokenEncoder`), pooled by
  `config.model.text.pooling` ("eos" as CXR-CLIP, "cls", "mean");
- "sentence_mean" with a locked tower (the phantom default): each text is the mean of its sentences'
  pooled features, every distinct sentence (of the prompt bank and the training reports) embedded once
  (`SentenceFeatures`), so a step's two random texts per study cost a table lookup.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh

from vljax import inputs, losses
from vljax.data import cxr_pipeline, cxr_prompts
from vljax.data import reports as reports_lib
from vljax.data.cxr_manifest import CXRManifest, CXRStudy
from vljax.modeling import Model

TASK = "cxr_clip"
SECTIONS = ("findings", "impression")

CXRTrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    clip_loss=clu_metrics.Average.from_output("clip_loss"),
    icl_loss=clu_metrics.Average.from_output("icl_loss"),
    tcl_loss=clu_metrics.Average.from_output("tcl_loss"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    logit_scale=clu_metrics.LastValue.from_output("logit_scale"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
)


def is_cxr(config) -> bool:
    return config.get("task", "ct") == TASK


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def resolve_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> CXRManifest:
    """The manifests `config.data.dirs` names, concatenated, or the chest X-ray phantom (generated once
    under the workdir, or `config.data.dirs[0]` when given)."""
    from vljax.data.cxr_manifest import load_cxr_manifest, load_cxr_manifests

    d = config.data
    if d.phantom:
        from vljax.data.cxr_phantom import CXRPhantomConfig, generate_cxr_phantom

        out = pathlib.Path(d.dirs[0]) if d.dirs else workdir / "cxr_phantom"
        if jax.process_index() == 0:
            generate_cxr_phantom(out, CXRPhantomConfig(
                num_studies=d.phantom_studies, seed=d.phantom_seed, image_size=d.phantom_image_size,
                label_only_fraction=d.phantom_label_only_fraction, workers=max(1, min(4, os.cpu_count() or 1))),
                log=logging.info)
        return load_cxr_manifest(out)
    if not d.dirs:
        raise ValueError("config.data.dirs is not set: pass --config.data.dirs='(\"/data/mimic-cxr-jpg\", "
                         "\"/data/CheXpert-v1.0\")' (MIMIC-CXR-JPG, CheXpert, ChestX-ray14 folders or vljax "
                         "CXR .jsonl manifests), or use the embedded phantom: --config=configs/cxr_clip.py:phantom")
    return load_cxr_manifests([str(p) for p in d.dirs])


def check_config(config, mesh: Mesh) -> None:
    d = config.data
    if config.get("accum_steps", 1) != 1:
        raise ValueError("config.accum_steps > 1 (GradCache) is not implemented for CXR-CLIP; use accum_steps=1")
    if d.second_text not in cxr_pipeline.SECOND_TEXT_MODES:
        raise ValueError(f"config.data.second_text={d.second_text!r}: choose one of "
                         f"{list(cxr_pipeline.SECOND_TEXT_MODES)}")
    if d.unc_fallback not in cxr_prompts.UNC_FALLBACKS:
        raise ValueError(f"config.data.unc_fallback={d.unc_fallback!r}: choose one of {list(cxr_prompts.UNC_FALLBACKS)}")
    for name in ("w_icl", "w_tcl"):
        if config.loss[name] < 0:
            raise ValueError(f"config.loss.{name}={config.loss[name]} must be >= 0")
    if not (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1):
        raise ValueError(f"config.data.crop_scale={tuple(d.crop_scale)}: expected 0 < low <= high <= 1")
    if d.std <= 0:
        raise ValueError(f"config.data.std={d.std} must be > 0")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % mesh.size:
            raise ValueError(f"config.{name}={config[name]} is not divisible by the {mesh.size} devices")
    if config.model.image.name == "resnet3d":
        raise ValueError("config.model.image.name='resnet3d' is the CT tower; CXR-CLIP uses 'resnet2d' or 'swin'")
    init = config.model.image.init
    path = init.partition(":")[2] if init != "scratch" else None
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"config.model.image.init: {path} does not exist")


def load_bank(config) -> cxr_prompts.PromptBank:
    return cxr_prompts.load_bank(config.data.prompt_bank, unc_fallback=config.data.unc_fallback)


def check_classes(manifest: CXRManifest, bank: cxr_prompts.PromptBank) -> None:
    unknown = sorted(set(manifest.classes) - set(bank))
    if unknown:
        raise ValueError(f"label classes {unknown} are not in the prompt bank (classes: {list(bank)}); add "
                         "them to a bank of your own (--config.data.prompt_bank=bank.json)")


def train_records(manifest: CXRManifest) -> tuple[CXRStudy, ...]:
    records = manifest.split("train")
    if not records:
        raise ValueError(f"{manifest.root}: the training split is empty")
    return records


def augment_config(config) -> cxr_pipeline.CXRAugment:
    return cxr_pipeline.CXRAugment(scale=tuple(config.data.crop_scale), contrast=float(config.data.contrast))


def fingerprint(manifest: CXRManifest, records: Sequence[CXRStudy], sampler) -> dict:
    """What the run's batches and evaluations are made of, as digests (no text, no paths), in the
    fields `checkpointing.check_same_dataset` compares: every study's id and split, labels, report
    sections, image file names, views, sizes and mtimes, the training records and the source's inputs."""
    from vljax.checkpointing import digest_rows

    files = []
    for r in manifest.records:
        for image in r.images:
            try:
                st = os.stat(image.path)
                files.append([r.study_id, os.path.basename(image.path), image.view, st.st_size, int(st.st_mtime)])
            except OSError:
                files.append([r.study_id, os.path.basename(image.path), image.view, None, None])
    return {
        "studies": {s: sum(r.split == s for r in manifest.records) for s in ("train", "val", "test")},
        "splits": digest_rows([r.study_id, r.split] for r in manifest.records),
        "labels": digest_rows([r.study_id, r.labels] for r in manifest.records),
        "reports": digest_rows([r.study_id, r.findings, r.impression] for r in manifest.records),
        "files": digest_rows(files),
        "file_stats": {f"{sid}/{name}": rest for sid, name, *rest in files},
        "train_records": digest_rows([r.study_id] for r in records),
        "sampler": digest_rows([repr(sampler)]),
    }


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


class SentenceFeatures:
    """`encoder(texts) -> {"text_pooled": f32 [n, H]}`: each normalised text's mean over its sentences
    (`reports.split_sentences`) of the locked tower's pooled sentence features, looked up in a table
    computed once. Picklable (Grain workers)."""

    def __init__(self, sentences: Sequence[str], features: np.ndarray):
        self.index = {s: k for k, s in enumerate(sentences)}
        self.features = np.asarray(features, np.float32)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        out = np.empty((len(texts), self.features.shape[1]), np.float32)
        for k, text in enumerate(texts):
            rows = [self.index.get(s) for s in reports_lib.split_sentences(text)]
            if not rows or None in rows:
                raise ValueError(f"text {k} of the batch has a sentence outside the precomputed table "
                                 f"({len(self.index)} sentences); this is a bug in the text sampling")
            out[k] = self.features[rows].mean(axis=0)
        return {"text_pooled": out}

    def __repr__(self) -> str:  # part of the source's repr: what the batches are a function of
        return f"SentenceFeatures({len(self.index)} sentences, {self.features.shape[1]}-d)"


def training_sentences(records: Sequence[CXRStudy], bank: cxr_prompts.PromptBank) -> list[str]:
    """Every normalised sentence a training text can hold: the bank's and the reports' sections'."""
    seen: dict[str, None] = {}
    texts = [s for prompts in bank.values() for kind in prompts for s in kind]
    texts += [s for r in records for s in r.sections()]
    for text in texts:
        for sentence in reports_lib.split_sentences(reports_lib.normalize_report_text(text)):
            seen.setdefault(sentence)
    return list(seen)


def text_encoder(config, records, bank, tokenizer, text_fn: Callable | None):
    """The encoder `CXRTrainBatches` calls: token ids, or (with "sentence_mean" and the locked tower's
    `text_fn`) the sentence-feature table of every training sentence."""
    if config.model.text.pooling != "sentence_mean":
        return cxr_pipeline.TokenEncoder(tokenizer, config.data.max_text_len)
    t0 = time.perf_counter()
    sentences = training_sentences(records, bank)
    feats = inputs.sentence_features(sentences, tokenizer, text_fn, config.data.max_text_len)
    logging.info("pooled features of %d distinct training sentences in %.1f s", len(sentences),
                 time.perf_counter() - t0)
    return SentenceFeatures(sentences, feats)


def make_sampler(config, records) -> cxr_pipeline.EpochSampler:
    """The order of training studies: a seeded permutation per epoch (`config.data_seed`)."""
    return cxr_pipeline.EpochSampler(len(records), config.batch_size, config.data_seed)


def train_source(config, manifest: CXRManifest, tokenizer, bank, text_fn: Callable | None
                 ) -> cxr_pipeline.CXRTrainBatches:
    records = train_records(manifest)
    d = config.data
    sampler = make_sampler(config, records)
    return cxr_pipeline.CXRTrainBatches(
        records, sampler, bank, text_encoder(config, records, bank, tokenizer, text_fn),
        total_steps=config.total_steps, batch_size=config.batch_size, seed=config.seed, image_size=d.image_size,
        mean=d.mean, std=d.std, aug=augment_config(config), second_text=d.second_text,
        report_prompt_prob=d.report_prompt_prob, process_index=jax.process_index(),
        process_count=jax.process_count())


def batch_spec(config, *, hidden_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (global shape, dtype)} of one CXR-CLIP training step's inputs."""
    b, s, L = config.batch_size, config.data.image_size, config.data.max_text_len
    spec = {"image1": ((b, s, s), np.dtype(np.float32)), "image2": ((b, s, s), np.dtype(np.float32))}
    for k in ("1", "2"):
        if config.model.text.pooling == "sentence_mean":
            spec["text_pooled" + k] = ((b, hidden_size), np.dtype(np.float32))
        else:
            spec["input_ids" + k] = ((b, L), np.dtype(np.int32))
            spec["attention_mask" + k] = ((b, L), np.dtype(np.int32))
    return spec


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, ...] x 2 → [2B, ...] as (a0, b0, a1, b1, ...): each device's rows stay on that device, so
    one tower call covers both views (or texts) without moving data."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def deinterleave(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return x[:, 0], x[:, 1]


def make_grad_fn(model: Model, config, mesh: Mesh) -> Callable:
    """`grad_fn(params, rest, batch, rng) -> (loss, grads, new_rest, aux)` of CXR-CLIP's loss
    (`losses.cxr_clip_loss`: L_CLIP over the four image-text pairs + w_icl·ICL + w_tcl·TCL on the
    global batch). Both views go through the image tower in one call (training BatchNorm sees 2B
    images), both texts through the text path in one call."""
    loss_fn_global = losses.cxr_loss_fn(mesh, icl_weight=float(config.loss.w_icl),
                                        tcl_weight=float(config.loss.w_tcl))

    def text_features(m, batch, rng):
        if "text_pooled1" in batch:
            return interleave(batch["text_pooled1"], batch["text_pooled2"])
        ids = interleave(batch["input_ids1"], batch["input_ids2"])
        mask = interleave(batch["attention_mask1"], batch["attention_mask2"])
        return m.text_features(ids, mask, train=True, rngs=nnx.Rngs(dropout=rng))

    def grad_fn(params, rest, batch, rng):
        image_rng, text_rng = jax.random.split(rng)

        def loss_fn(p):
            m = nnx.merge(model.graphdef, p, rest, copy=True)
            feats = m.image_features(interleave(batch["image1"], batch["image2"]), train=True,
                                     rngs=nnx.Rngs(dropout=image_rng))
            i1, i2 = deinterleave(m.embed_image_features(feats, train=True))
            t1, t2 = deinterleave(m.embed_text_features(text_features(m, batch, text_rng)))
            scale = m.logit_scale()
            loss, parts = loss_fn_global(i1, i2, t1, t2, scale)
            return loss, (nnx.state(m, nnx.Not(nnx.Param)), {**parts, "logit_scale": scale})

        (loss, (new_rest, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_rest, aux

    return grad_fn
