"""The trainer's input: dataset -> Grain source of training batches, the locked text tower's
features computed once, and the declared batch spec that the pipeline yields, the train step
consumes and the benchmarks fabricate (`batch_spec`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vljax.data import ct as ct_lib
from vljax.data import pipeline
from vljax.data import reports as reports_lib
from vljax.data import sampling as sampling_lib
from vljax.data import volume_cache as volume_cache_lib
from vljax.data.manifest import Manifest, load_manifest


def resolve_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Manifest:
    """Loads the manifest named by `config.data.dir`, generating the phantom first when asked."""
    data_dir = config.data.dir
    if config.data.phantom:
        from vljax.data.phantom import PhantomConfig, generate_phantom

        data_dir = data_dir or str(workdir / "phantom")
        if jax.process_index() == 0:
            generate_phantom(data_dir, PhantomConfig(num_studies=config.data.phantom_studies,
                                                     seed=config.data.phantom_seed,
                                                     signs=config.data.get("phantom_signs", "designed"),
                                                     workers=max(1, min(4, os.cpu_count() or 1))),
                             log=logging.info)
    if not data_dir:
        raise ValueError(
            "config.data.dir is not set: pass --config.data.dir=/path/to/merlin_data (a folder in the "
            "Merlin release layout, or a .jsonl manifest), or use the embedded synthetic dataset with "
            "--config=configs/merlin.py:phantom")
    return load_manifest(data_dir)


def check_volume_headers(config: ml_collections.ConfigDict, manifest: Manifest) -> tuple[Manifest, list]:
    """Every study's NIfTI header (`vljax.validate.check_headers`: no voxel decoded), before the
    model is built. Blocking problems stop the run listing them (`on_error="raise"`), or
    (`"skip"`) their studies leave the dataset, unless more than `max_skip_fraction` of a split
    would; warnings are logged. Returns the manifest to use and the studies left out (`Problem`s)."""
    from vljax import validate

    t0 = time.perf_counter()
    problems = validate.check_headers(manifest.records, spacing=tuple(config.data.spacing))
    logging.info("checked %d volume headers in %.1f s: %d problem(s)", len(manifest.records),
                 time.perf_counter() - t0, len(problems))
    for p in problems:
        if not validate.is_blocking(p):
            logging.warning("%s", validate.problem_line(p))
    blocking = [p for p in problems if validate.is_blocking(p)]
    if not blocking:
        return manifest, []
    if config.data.get("on_error", "raise") != "skip":
        try:
            validate.raise_if_blocking(blocking, str(config.data.dir or manifest.root))
        except validate.DatasetError as e:
            raise validate.DatasetError(f"{e}\nOr train without them: --config.data.on_error=skip.") from None
    bad = {p.study_id for p in blocking}
    for split in ("train", "val", "test"):
        recs = manifest.split(split)
        n_bad = sum(r.study_id in bad for r in recs)
        if recs and n_bad > config.data.max_skip_fraction * len(recs):
            raise validate.DatasetError(
                f"{n_bad} of {len(recs)} {split} studies have unreadable volumes, more than "
                f"config.data.max_skip_fraction={config.data.max_skip_fraction} (e.g. "
                f"{sorted(bad)[:5]}); run `python -m vljax.validate --data_dir=... --deep` and fix or remove them")
    for p in blocking:
        logging.warning("config.data.on_error=skip: left out %s", validate.problem_line(p))
    kept = tuple(r for r in manifest.records if r.study_id not in bad)
    return dataclasses.replace(manifest, records=kept), blocking


def ct_config(config: ml_collections.ConfigDict) -> ct_lib.CTPreprocessConfig:
    d = config.data
    return ct_lib.CTPreprocessConfig(spacing=tuple(d.spacing), shape=tuple(d.shape),
                                     hu_window=tuple(d.hu_window), dtype=d.dtype)


def volume_cache(config: ml_collections.ConfigDict) -> volume_cache_lib.VolumeCache | None:
    """The preprocessed-volume cache `config.data.cache` names (tools/preprocess.py), opened for this
    run's preprocessing settings (a cache built with others is refused); None when unset."""
    path = config.data.get("cache")
    return volume_cache_lib.VolumeCache(path, ct_config(config)) if path else None


def tokenizer_for(config: ml_collections.ConfigDict):
    path = config.data.tokenizer or (config.model.text.path if config.model.text.init == "pretrained" else None)
    return reports_lib.load_tokenizer(path)


def text_table(config, tokenizer, records) -> pipeline.TextTable:
    return pipeline.tokenize_table(tokenizer, pipeline.full_report_texts(records), config.data.max_text_len)


def run_text_tower(table: pipeline.TextTable, text_fn: Callable, batch: int = 32, bucket: int = 32,
                   out_dtype=np.float32, ragged: bool = False):
    """`text_fn(ids, mask)` over every row of `table`, in the table's order.

    Rows are sorted by length and grouped by their length rounded up to `bucket` tokens; a group of
    width w runs in batches of `batch * (max_len // w)` rows (few compiled shapes, about the same
    number of tokens per call, far fewer tokens than padding everything to max_len). Attention
    masking makes the result independent of the padding length.

    Pooled outputs come back as [n, H]. Token states come back as [n, max_len, H] (zero beyond each
    batch's width), or with `ragged=True` as (flat [sum of row lengths, H], offsets [n + 1]).
    """
    n, max_len = table.input_ids.shape
    lengths = table.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    order = np.argsort(-lengths, kind="stable")
    width_of = lambda length: min(max_len, int(-(-max(int(length), 1) // bucket) * bucket))  # noqa: E731
    out = None
    s = 0
    while s < n:
        # Short rows (e.g. report sections) go in larger batches: about batch x max_len tokens each.
        width = width_of(lengths[order[s]])
        rows = batch * max(1, max_len // width)
        idx = order[s:s + rows]
        idx = idx[[width_of(lengths[i]) == width for i in idx]]  # one width per batch
        s += len(idx)
        ids, mask = table.input_ids[idx, :width], table.attention_mask[idx, :width]
        pad = rows - len(idx)
        if pad:  # keep the batch dimension fixed (one shape per width)
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        feats = np.asarray(text_fn(ids, mask))[:len(idx)]
        if out is None:
            if feats.ndim == 2:
                shape = (n, feats.shape[-1])
            else:
                shape = (int(offsets[-1]), feats.shape[-1]) if ragged else (n, max_len, feats.shape[-1])
            out = np.zeros(shape, out_dtype)
        if feats.ndim == 2:
            out[idx] = feats
        elif ragged:
            for k, r in enumerate(idx):
                out[offsets[r]:offsets[r + 1]] = feats[k, :lengths[r]]
        else:
            out[idx, :width] = feats
    return (out, offsets) if ragged else out


def cache_text_features(table: pipeline.TextTable, text_fn: Callable) -> pipeline.TextTable:
    """Adds the locked text tower's last hidden states to `table`, ragged (only each row's own tokens;
    computed once; stored as float16 to halve host memory, ~2e-4 relative rounding; the trainable
    pooling sees them as float32). The tower runs once per distinct text: report sections repeat
    (63 % of the phantom's 8,516 training text rows are copies of another row)."""
    _, first, inverse = np.unique(table.input_ids, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first)  # distinct rows in order of first appearance (deterministic batching)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    distinct = first[order]
    sub = pipeline.TextTable(table.input_ids[distinct], table.attention_mask[distinct])
    feats, sub_offsets = run_text_tower(sub, text_fn, out_dtype=np.float16, ragged=True)
    lengths = table.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    features = np.empty((int(offsets[-1]), feats.shape[-1]), np.float16)
    for r, u in enumerate(rank[inverse]):
        features[offsets[r]:offsets[r + 1]] = feats[sub_offsets[u]:sub_offsets[u + 1]]
    return dataclasses.replace(table, features=features, offsets=offsets)


def sentence_features(texts: Sequence[str], tokenizer, pooled_fn: Callable, max_len: int) -> np.ndarray:
    """[len(texts), H] float32: each text's mean over its sentences (`reports.split_sentences` of the
    normalised text) of `pooled_fn(ids, mask)`, the locked tower's mean-pooled features of one
    sentence. Every distinct sentence goes through the tower once: the 47,000 training texts of the
    6,000-study phantom hold 470 distinct sentences, so this takes seconds where the token-level
    cache (`cache_text_features`) takes minutes."""
    where: dict[str, int] = {}
    members: list[list[int]] = []
    for k, text in enumerate(texts):
        sentences = reports_lib.split_sentences(text)
        if not sentences:
            raise ValueError(f"text {k} has no sentence after normalisation (empty text)")
        members.append([where.setdefault(x, len(where)) for x in sentences])
    enc = reports_lib.tokenize(tokenizer, list(where), max_len)
    feats = run_text_tower(pipeline.TextTable(enc["input_ids"], enc["attention_mask"]), pooled_fn)
    out = np.empty((len(texts), feats.shape[-1]), np.float32)
    for k, idx in enumerate(members):
        out[k] = feats[idx].mean(axis=0)
    return out


def train_records(config, manifest: Manifest) -> list:
    """The training split, or its seeded `config.data.train_fraction` subset (nested across fractions)."""
    records = manifest.split("train")
    keep = sampling_lib.subset_indices(len(records), config.data.train_fraction, config.subset_seed)
    return [records[i] for i in keep]


def make_sampler(config, records) -> tuple[sampling_lib.BatchSampler, list[dict[str, str]]]:
    d = config.data
    texts = sampling_lib.unit_texts(records)
    units = sampling_lib.study_units(records, texts)
    sampler = sampling_lib.make_sampler(
        units, config.batch_size, config.data_seed, strategy=d.sampling, balance_ratio=d.balance_ratio,
        alternate=d.alternate, sections=None if d.sections is None else tuple(d.sections),
        period=d.section_period, order=d.section_order)
    return sampler, texts


def train_source(config, manifest: Manifest, tokenizer, text_fn: Callable | None = None) -> pipeline.TrainBatches:
    """The Grain source of the run's training batches (`batch_spec`), with the locked text tower's
    features computed once when `text_fn` is given (`locked_text_fn`)."""
    records = train_records(config, manifest)
    sampler, texts = make_sampler(config, records)
    units = (sampling_lib.FULL,) + sampler.schedule.sections
    if text_fn is not None and config.model.text.pooling == "sentence_mean":
        t0 = time.perf_counter()
        flat, rows = pipeline.unit_strings(texts, units)
        pooled = sentence_features(flat, tokenizer, text_fn, config.data.max_text_len)
        unit_texts = pipeline.UnitTexts(pipeline.TextTable.from_pooled(pooled), rows)
        logging.info("text features of %d training texts from their sentences in %.1f s", len(flat),
                     time.perf_counter() - t0)
    else:
        unit_texts = pipeline.tokenize_units(tokenizer, texts, units, config.data.max_text_len)
        if text_fn is not None:
            unit_texts = dataclasses.replace(unit_texts, table=cache_text_features(unit_texts.table, text_fn))
    volumes, bad = None, []
    on_error = config.data.get("on_error", "raise")
    disk_cache = volume_cache(config)
    if disk_cache is not None:  # every training study there, its file unchanged: fail now, not mid-run
        disk_cache.check(records)
    if config.data.get("cache_volumes", False):  # small inputs: decode and resample every training volume once
        t0 = time.perf_counter()
        volumes, bad = pipeline.preload_volumes(records, ct_config(config), workers=max(1, os.cpu_count() or 1),
                                                on_error=on_error, disk_cache=disk_cache)
        logging.info("cached %d preprocessed training volumes (%.1f MiB) in %.1f s", len(volumes),
                     volumes.nbytes / 2**20, time.perf_counter() - t0)
    return pipeline.TrainBatches(records, unit_texts, sampler,
                                 config.total_steps, ct_config(config),
                                 with_phenotypes=config.model.phenotype_weight > 0,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 volumes=volumes, on_error=on_error, bad=bad, disk_cache=disk_cache)


def batch_spec(config, *, num_phenotypes: int, hidden_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (global shape, dtype)} of what one training step consumes, and nothing else: the
    volumes, the texts in the form the text path takes (token ids, a locked tower's cached token
    states, or its pooled sentence features), and the phenotype targets when the head is on.
    `pipeline.TrainBatches` yields exactly these (per-process rows) under "inputs"."""
    b, L = config.batch_size, config.data.max_text_len
    x, y, z = config.data.shape
    spec = {"image": ((b, z, x, y), jnp.dtype(config.data.dtype))}
    text = config.model.text
    if text.trainable:
        spec["input_ids"] = ((b, L), np.dtype(np.int32))
    elif text.pooling == "sentence_mean":
        spec["text_pooled"] = ((b, hidden_size), np.dtype(np.float32))
    else:
        spec["text_hidden"] = ((b, L, hidden_size), np.dtype(np.float16))
    if "text_pooled" not in spec:
        spec["attention_mask"] = ((b, L), np.dtype(np.int32))
    if num_phenotypes:
        spec["phenotypes"] = ((b, num_phenotypes), np.dtype(np.int8))
    return spec
