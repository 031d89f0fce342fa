"""Evaluation of a two-tower model on a split: zero-shot classification of the 30 findings,
image->report retrieval and the InfoNCE loss, with the jitted embedding functions built once per run.

`Evaluator` is made once (by the trainer, `vljax.evaluate` and `vljax.diagnose`) and called with the
current parameters. Every array it passes to a jitted function has a shape fixed by the config (eval
batches of `config.eval_batch_size`, text batches of fixed rows per length bucket, projections in
fixed chunks), so a run's periodic evaluations compile each function once (`compile_counts`).

`evaluate_with_predictions` also returns the per-study outputs the metrics are computed from
(`Predictions`: zero-shot scores, labels, image and report embeddings); the final evaluation saves
them next to results.json (`run_files.write_predictions`) for test-set bootstraps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from flax import nnx

from vljax import inputs, losses
from vljax.data import ct as ct_lib
from vljax.data import pipeline
from vljax.evals import prompts, zero_shot
from vljax.modeling import Model

# With `data.cache_volumes`, splits of at least this many studies are preprocessed in parallel before
# evaluation (below it, starting the worker processes costs more than it saves).
PRELOAD_MIN_STUDIES = 256

# Rows per call of the text projection ("sentence_mean" pooling): one compiled shape for any count.
_PROJECT_ROWS = 256


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: no elementwise ==
class Predictions:
    """Per-study outputs of one evaluation, rows in the order of the evaluated (readable) studies; the
    results dict is `zero_shot.zero_shot_metrics(scores, labels, seed=0)` and
    `zero_shot.retrieval_metrics(image_emb, text_emb)` of these arrays."""

    study_ids: tuple[str, ...]
    scores: np.ndarray     # [N, 30] float64 zero-shot scores (predicted positive when > 0)
    labels: np.ndarray     # [N, 30] int8: 1, 0, -1 (not mentioned)
    image_emb: np.ndarray  # [N, E] float32 image embeddings (before L2 normalisation)
    text_emb: np.ndarray   # [N, E] float32 full-report embeddings (before L2 normalisation)


class TextEmbedder:
    """`embedder(params, rest, texts)` → [N, E] embeddings of normalised texts by a model's own text
    path, its jitted functions built once: token ids through the tower in length buckets, or with
    "sentence_mean" pooling each text's mean sentence feature (the locked tower's pooled features of
    each distinct sentence) through the projection, in chunks of fixed rows."""

    def __init__(self, model: Model, mesh: Mesh, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len
        merge = lambda p, r: nnx.merge(model.graphdef, p, r, copy=True)  # noqa: E731
        jit = functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
        self.sentence_mean = model.spec.pooling == "sentence_mean"
        if self.sentence_mean:
            self.fns = {"pooled": jit(lambda p, r, ids, mask: merge(p, r).text_features(ids, mask, train=False)),
                        "project": jit(lambda p, r, f: merge(p, r).embed_text_features(f))}
        else:
            self.fns = {"text": jit(lambda p, r, ids, mask: merge(p, r).encode_text(ids, mask, train=False))}

    def __call__(self, params, rest, texts: Sequence[str]) -> np.ndarray:
        if not self.sentence_mean:
            table = pipeline.tokenize_table(self.tokenizer, list(texts), self.max_len)
            return inputs.run_text_tower(table, functools.partial(self.fns["text"], params, rest))
        feats = inputs.sentence_features(texts, self.tokenizer, functools.partial(self.fns["pooled"], params, rest),
                                         self.max_len)
        out = []
        for s in range(0, len(feats), _PROJECT_ROWS):
            chunk = feats[s:s + _PROJECT_ROWS]
            padded = np.zeros((_PROJECT_ROWS, feats.shape[1]), np.float32)
            padded[:len(chunk)] = chunk
            out.append(np.asarray(self.fns["project"](params, rest, padded))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def compile_counts(self) -> dict[str, int]:
        return {k: f._cache_size() for k, f in self.fns.items()}


class Evaluator:
    """`evaluate(params, rest, records)` -> zero-shot, retrieval and loss; `embed_texts`,
    `embed_images` for the diagnostics. Built once per run from its config, model and mesh."""

    def __init__(self, config, model: Model, mesh: Mesh, tokenizer):
        self.config, self.model, self.mesh, self.tokenizer = config, model, mesh, tokenizer
        self.max_len = config.data.max_text_len
        replicated = NamedSharding(mesh, P())
        merge = lambda p, r: nnx.merge(model.graphdef, p, r, copy=True)  # noqa: E731
        jit = functools.partial(jax.jit, out_shardings=replicated)
        def image(p, r, x):  # pooled features and embeddings from one pass through the tower
            m = merge(p, r)
            feats = m.image_features(x, train=False)
            return feats, m.embed_image_features(feats, train=False)

        self._image = jit(image)
        self._scale = jit(lambda p, r: merge(p, r).logit_scale())
        self.text = TextEmbedder(model, mesh, tokenizer, self.max_len)
        self.prompts = zero_shot.prompt_table(prompts.prompts_for(config.get("zero_shot_prompts", "merlin")))
        self._sources: dict[tuple, pipeline.EvalBatches] = {}
        self._disk_cache = inputs.volume_cache(config)

    def compile_counts(self) -> dict[str, int]:
        """How many times each jitted function has been compiled (its cache size)."""
        fns = {"image": self._image, "logit_scale": self._scale}
        return {**{k: f._cache_size() for k, f in fns.items()}, **self.text.compile_counts()}

    # ----------------------------------------------------------------------------------------------
    def embed_texts(self, params, rest, texts: Sequence[str]) -> np.ndarray:
        """[N, E] text embeddings of normalised texts, by the model's own text path: token ids through
        the tower, or with "sentence_mean" pooling the mean of the texts' sentence features through
        the projection."""
        return self.text(params, rest, texts)

    def _source(self, records) -> pipeline.EvalBatches:
        """The split's batches (volumes preprocessed in parallel once, for a large split with
        `data.cache_volumes`), kept for the run's later evaluations of the same records."""
        key = tuple(r.study_id for r in records)
        if key not in self._sources:
            config = self.config
            volumes = None
            if self._disk_cache is not None:
                self._disk_cache.check(records)
            if config.data.get("cache_volumes", False) and len(records) >= PRELOAD_MIN_STUDIES:
                volumes = pipeline.preload_volumes(records, inputs.ct_config(config),
                                                   workers=max(1, os.cpu_count() or 1),
                                                   on_error=config.data.get("on_error", "raise"),
                                                   disk_cache=self._disk_cache)
            on_error = config.data.get("on_error", "raise")
            bad = ()
            if volumes is not None:
                volumes, bad = volumes
            self._sources[key] = pipeline.EvalBatches(
                records, inputs.text_table(config, self.tokenizer, records), config.eval_batch_size,
                inputs.ct_config(config), process_index=jax.process_index(),
                process_count=jax.process_count(), volumes=volumes, on_error=on_error, bad=bad,
                disk_cache=self._disk_cache)
        return self._sources[key]

    def embed_images(self, params, rest, records, *, workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pooled image features, image embeddings, labels) of `records`, in order, every process's;
        with `config.data.on_error=skip` only of the studies whose volume could be read
        (`skipped_positions` after the call names the others)."""
        feats, embs, labels, kept = [], [], [], []
        with pipeline.closing_iterator(pipeline.make_iterator(self._source(records), workers=workers)) as it:
            for batch in it:
                valid = np.asarray(multihost_utils.process_allgather(batch["valid"].astype(bool), tiled=True))
                lab = np.asarray(multihost_utils.process_allgather(batch["labels"], tiled=True))
                pos = np.asarray(multihost_utils.process_allgather(batch["position"], tiled=True))
                f, e = self._image(params, rest, pipeline.to_global({"image": batch["image"]}, self.mesh)["image"])
                feats.append(np.asarray(f)[valid])
                embs.append(np.asarray(e)[valid])
                labels.append(lab[valid])
                kept.append(pos[valid])
        kept = np.concatenate(kept)
        self.skipped_positions = sorted(set(range(len(records))) - set(kept.tolist()))
        return np.concatenate(feats), np.concatenate(embs), np.concatenate(labels)

    def evaluate(self, params, rest, records, *, workers: int = 0) -> dict:
        """Zero-shot (30 findings), image->report retrieval and InfoNCE loss on `records`."""
        return self.evaluate_with_predictions(params, rest, records, workers=workers)[0]

    def evaluate_with_predictions(self, params, rest, records, *, workers: int = 0) -> tuple[dict, Predictions]:
        """`evaluate`'s results and the per-study outputs they are computed from."""
        _, img, lab = self.embed_images(params, rest, records, workers=workers)
        skipped = [records[i].study_id for i in self.skipped_positions]
        if len(skipped) > self.config.data.get("max_skip_fraction", 0.0) * len(records):
            raise ct_lib.CTLoadError(
                f"{len(skipped)} of {len(records)} evaluation studies cannot be read (e.g. {skipped[:5]}), more "
                f"than config.data.max_skip_fraction={self.config.data.max_skip_fraction}; run "
                "`python -m vljax.validate --data_dir=... --deep` and fix or remove them")
        if skipped:
            records = [r for i, r in enumerate(records) if i not in set(self.skipped_positions)]
        txt = self.embed_texts(params, rest, pipeline.full_report_texts(records))
        scale = float(self._scale(params, rest))
        phrase_emb = self.embed_texts(params, rest, self.prompts.texts)
        scores = zero_shot.zero_shot_scores(img, phrase_emb, self.prompts)
        # InfoNCE over consecutive full batches (the batch size training uses), on the host.
        b = self.config.batch_size
        batch_losses = [float(losses.infonce(jnp.asarray(img[s:s + b]), jnp.asarray(txt[s:s + b]), scale))
                        for s in range(0, (len(img) // b) * b, b)]
        result = {
            "num_studies": int(len(img)),
            "skipped": {"count": len(skipped), "studies": skipped},
            "loss": float(np.mean(batch_losses)) if batch_losses else None,
            "zero_shot": zero_shot.zero_shot_metrics(scores, lab, seed=0),
            "retrieval": zero_shot.retrieval_metrics(img, txt),
        }
        predictions = Predictions(tuple(r.study_id for r in records), scores, np.asarray(lab, np.int8),
                                  np.asarray(img), np.asarray(txt))
        return result, predictions
