"""Input pipelines: a training batch is a pure function of (seed, step); evaluation walks a split in
order. Both are Grain `MapDataset`s of whole per-host batches, so Grain's worker processes build
batches in parallel and an iterator's state (the next step) resumes exactly.

Texts are tokenised once, up front, into a `TextTable` (fast tokenizers do a 25k-study split in
seconds); workers only read NIfTI files and preprocess them.

Multi-host: every process asks for the same global step and keeps its contiguous slice
`[process_index * B_local, (process_index + 1) * B_local)` of the global batch's study indices; the
slices are disjoint and their union is the global batch. `to_global` assembles the `jax.Array`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Protocol, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.data import ct as ct_lib
from vljax.data import reports as reports_lib
from vljax.data.manifest import StudyRecord


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextTable:
    """Token ids and masks [N, L] (int32) of one text per study, row i for study i; with a locked
    text tower also its last hidden states `features` [N, L, H], which then replace the token ids."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def full_report_texts(records: Sequence[StudyRecord]) -> list[str]:
    """Merlin-normalised full findings text of each study (errors name the study id only)."""
    texts = []
    for r in records:
        text = reports_lib.normalize_report_text(r.findings)
        if not text.strip():
            raise reports_lib.ReportError("the findings text is empty after normalisation", r.study_id)
        texts.append(text)
    return texts


def tokenize_table(tokenizer, texts: Sequence[str], max_length: int) -> TextTable:
    enc = reports_lib.tokenize(tokenizer, texts, max_length)
    return TextTable(enc["input_ids"], enc["attention_mask"])


# ---------------------------------------------------------------------------------------------------
# Samplers: global batch indices as a pure function of the step
# ---------------------------------------------------------------------------------------------------


class Sampler(Protocol):
    global_batch: int

    def indices(self, step: int) -> np.ndarray:
        """Study indices (into the training records) of the global batch at `step`."""


class RandomSampler:
    """Epoch-wise seeded permutations laid end to end; step s takes positions [sB, (s+1)B).

    A batch may straddle two epochs; no study repeats within an epoch. Pure in (seed, step).
    """

    def __init__(self, num_studies: int, global_batch: int, seed: int):
        if num_studies < 1:
            raise ValueError("the training split is empty")
        if global_batch < 1:
            raise ValueError(f"batch size must be positive, got {global_batch}")
        self.num_studies, self.global_batch, self.seed = num_studies, global_batch, seed

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_studies)

    def indices(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        positions = np.arange(start, start + self.global_batch)
        epochs, offsets = np.divmod(positions, self.num_studies)
        perms = {int(e): self._permutation(int(e)) for e in np.unique(epochs)}
        return np.array([perms[int(e)][o] for e, o in zip(epochs, offsets)], np.int64)

    def __repr__(self) -> str:
        return f"RandomSampler(num_studies={self.num_studies}, global_batch={self.global_batch}, seed={self.seed})"


# ---------------------------------------------------------------------------------------------------
# Grain sources
# ---------------------------------------------------------------------------------------------------


def _fingerprint(records: Sequence[StudyRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.study_id.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous part of every global batch."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


class _StudyLoader:
    """Loads the per-study arrays of a list of indices (shared by train and eval sources)."""

    def __init__(self, records: Sequence[StudyRecord], text: TextTable, ct_config: ct_lib.CTPreprocessConfig,
                 with_phenotypes: bool):
        if len(records) != len(text):
            raise ValueError(f"{len(records)} records but {len(text)} tokenised texts")
        self.records, self.text, self.ct_config = tuple(records), text, ct_config
        self.with_phenotypes = with_phenotypes
        self.labels = np.array([r.labels for r in records], np.int8).reshape(len(records), -1)
        if with_phenotypes:
            missing = [r.study_id for r in records if r.phenotypes is None]
            if missing:
                raise ValueError(f"{len(missing)} studies have no phenotype row (e.g. {missing[:3]}); "
                                 "set config.model.phenotype_weight=0 or complete the phenotype table")
            self.phenotypes = np.array([r.phenotypes for r in records], np.int8)

    def load(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        volumes = np.stack([ct_lib.preprocess_ct(self.records[i].image, self.ct_config) for i in idx])
        batch = {"image": volumes, "labels": self.labels[idx], "study_index": idx.astype(np.int32)}
        if self.text.features is not None:
            batch["text_hidden"] = self.text.features[idx]
        else:
            batch["input_ids"] = self.text.input_ids[idx]
        batch["attention_mask"] = self.text.attention_mask[idx]
        if self.with_phenotypes:
            batch["phenotypes"] = self.phenotypes[idx]
        return batch


class TrainBatches:
    """Random-access Grain source: item `step` is this process's slice of the global batch at `step`."""

    def __init__(self, records: Sequence[StudyRecord], text: TextTable, sampler: Sampler, total_steps: int,
                 ct_config: ct_lib.CTPreprocessConfig, *, with_phenotypes: bool = False,
                 process_index: int = 0, process_count: int = 1):
        self.loader = _StudyLoader(records, text, ct_config, with_phenotypes)
        self.sampler, self.total_steps = sampler, total_steps
        self.slice = host_slice(sampler.global_batch, process_index, process_count)
        self._repr = (f"TrainBatches(records={len(records)}:{_fingerprint(records)}, {sampler!r}, "
                      f"total_steps={total_steps}, ct={ct_config}, process={process_index}/{process_count})")

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.sampler.indices(int(step))[self.slice]
        batch = self.loader.load(idx)
        batch["step"] = np.int64(step)
        return batch

    def __repr__(self) -> str:
        return self._repr


class EvalBatches:
    """Random-access source over one split in order: batch i holds studies [iB, (i+1)B), the last one
    padded by repeating study 0 with `valid` = 0, so every batch has the same shape."""

    def __init__(self, records: Sequence[StudyRecord], text: TextTable, global_batch: int,
                 ct_config: ct_lib.CTPreprocessConfig, *, with_phenotypes: bool = False,
                 process_index: int = 0, process_count: int = 1):
        if not records:
            raise ValueError("the evaluation split is empty")
        self.loader = _StudyLoader(records, text, ct_config, with_phenotypes)
        self.global_batch, self.num_studies = global_batch, len(records)
        self.slice = host_slice(global_batch, process_index, process_count)

    def __len__(self) -> int:
        return -(-self.num_studies // self.global_batch)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        positions = np.arange(i * self.global_batch, (i + 1) * self.global_batch)[self.slice]
        valid = positions < self.num_studies
        batch = self.loader.load(np.where(valid, positions, 0))
        batch["valid"] = valid.astype(np.int8)
        return batch

    def __repr__(self) -> str:
        return f"EvalBatches(n={self.num_studies}, batch={self.global_batch}, slice={self.slice})"


def make_iterator(source, *, workers: int = 0, prefetch: int = 2, start: int = 0) -> grain.DatasetIterator:
    """Grain iterator over `source[start:]`, with `workers` processes each building whole batches."""
    ds = grain.MapDataset.source(source)
    if start:
        ds = ds[start:]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=prefetch))
    return iter(it_ds)


# ---------------------------------------------------------------------------------------------------
# Device arrays
# ---------------------------------------------------------------------------------------------------


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, axis: str = "data") -> dict[str, jax.Array]:
    """Per-host numpy slices → global `jax.Array`s sharded on their leading (batch) axis."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        spec = P(axis) if value.ndim else P()
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out
