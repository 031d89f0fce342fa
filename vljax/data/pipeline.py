"""Input pipelines: a training batch is a pure function of (seed, step); evaluation walks a split in
order. Both are Grain `MapDataset`s of whole per-host batches, so Grain's worker processes build
batches in parallel and an iterator's state (the next step) resumes exactly.

Which text unit (full report or one organ section) and which studies make up each global batch is
decided by `sampling.BatchSampler` (random, alternating, balanced). Texts are tokenised once, up
front, into a `TextTable` with one row per (study, unit) used by the run (fast tokenizers do a
25k-study split in seconds); workers only read NIfTI files and preprocess them.

Multi-host: every process asks for the same global step and keeps its contiguous slice
`[process_index * B_local, (process_index + 1) * B_local)` of the global batch's study indices; the
slices are disjoint and their union is the global batch. `to_global` assembles the `jax.Array`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
from typing import Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.data import ct as ct_lib
from vljax.data import reports as reports_lib
from vljax.data import sampling
from vljax.data import workers as workers_lib
from vljax.data.volume_cache import VolumeCache
from vljax.data.manifest import StudyRecord


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextTable:
    """Token ids and masks [R, L] (int32), one text per row. With a locked text tower also its last
    hidden states, stored ragged (`features` [sum of row lengths, H] float16, row r at
    `offsets[r]:offsets[r + 1]`), which then replace the token ids in batches. With a locked tower
    and "sentence_mean" pooling instead the pooled feature of every row (`pooled` [R, H] float32),
    which alone then stands for the text in batches."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    features: np.ndarray | None = None
    offsets: np.ndarray | None = None
    pooled: np.ndarray | None = None

    @classmethod
    def from_pooled(cls, pooled: np.ndarray) -> TextTable:
        """A table of pooled features only (no token ids: batches carry the features)."""
        empty = np.zeros((len(pooled), 0), np.int32)
        return cls(empty, empty, pooled=np.asarray(pooled, np.float32))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(1)

    def hidden(self, rows: np.ndarray) -> np.ndarray:
        """Cached token states of `rows`, zero-padded to [len(rows), L, H]."""
        if self.features is None:
            raise ValueError("this text table has no cached text-tower states")
        out = np.zeros((len(rows), self.input_ids.shape[1], self.features.shape[-1]), self.features.dtype)
        for k, r in enumerate(rows):
            a, b = self.offsets[r], self.offsets[r + 1]
            out[k, :b - a] = self.features[a:b]
        return out


def full_report_texts(records: Sequence[StudyRecord]) -> list[str]:
    """Merlin-normalised full findings text of each study (`reports.full_text`; errors name the
    study id only)."""
    return [reports_lib.full_text(r.findings, r.study_id) for r in records]


def tokenize_table(tokenizer, texts: Sequence[str], max_length: int) -> TextTable:
    enc = reports_lib.tokenize(tokenizer, texts, max_length)
    return TextTable(enc["input_ids"], enc["attention_mask"])


@dataclasses.dataclass(frozen=True)
class UnitTexts:
    """The text rows of the training studies: `rows[i, u]` is the `table` row of study i's text unit
    u (`sampling.UNITS`: 0 = full report, 1..13 = sections), -1 where the study lacks that unit or
    the run does not use it."""

    table: TextTable
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def unit_strings(texts: Sequence[dict[str, str]], units: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """The non-empty texts of the units in `units`, one per (study, unit), and `rows` [N, len(UNITS)]
    (their index in that list, -1 where absent or unused): the row order of `tokenize_units`."""
    rows = np.full((len(texts), len(sampling.UNITS)), -1, np.int64)
    flat: list[str] = []
    for u in units:
        name = sampling.UNITS[u]
        for i, t in enumerate(texts):
            if t[name].strip():
                rows[i, u] = len(flat)
                flat.append(t[name])
    return flat, rows


def tokenize_units(tokenizer, texts: Sequence[dict[str, str]], units: Sequence[int], max_length: int) -> UnitTexts:
    """One table row per (study, unit) with non-empty text, for the units in `units`."""
    flat, rows = unit_strings(texts, units)
    return UnitTexts(tokenize_table(tokenizer, flat, max_length), rows)


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


def _read_volume(study_id: str, path: str, config: ct_lib.CTPreprocessConfig,
                 disk_cache: VolumeCache | None = None) -> np.ndarray:
    """One study's model input: from the preprocessed-volume cache when there is one (bitwise the
    same), else decoded and preprocessed now (`ct.load_model_input`)."""
    if disk_cache is not None:
        return disk_cache.read(study_id, path)
    return ct_lib.load_model_input(path, config)


def _preprocess_one(args: tuple[str, str, ct_lib.CTPreprocessConfig, bool, VolumeCache | None]) -> np.ndarray | None:
    study_id, path, config, skip, disk_cache = args
    try:
        return _read_volume(study_id, path, config, disk_cache)
    except ct_lib.CTLoadError:
        if skip:
            return None
        raise


def preload_volumes(records: Sequence[StudyRecord], ct_config: ct_lib.CTPreprocessConfig, *,
                    workers: int = 0, max_bytes: int = 8 << 30, on_error: str = "raise",
                    disk_cache: VolumeCache | None = None) -> tuple[np.ndarray, list[int]]:
    """Every record's preprocessed volume, in record order, as one array [N, D, H, W], and the
    indices of the records whose volume could not be read (zeros in the array; only with
    `on_error="skip"`, else the first one raises `CTLoadError`).

    For small model inputs (the phantom default: 24x24x16 voxels, 37 KB a study) this takes the
    NIfTI decoding and resampling out of the training loop: they are done once, in `workers`
    processes, instead of for every batch (with `disk_cache`: read from it, in this process).
    Refuses when the cache would exceed `max_bytes`."""
    shape = tuple(ct_config.shape)
    itemsize = 2 if ct_config.dtype == "bfloat16" else 4
    need = len(records) * int(np.prod(shape)) * itemsize
    if need > max_bytes:
        raise ValueError(f"caching {len(records)} preprocessed volumes of {shape} needs {need / 2**30:.1f} GiB "
                         f"(limit {max_bytes / 2**30:.0f} GiB): set config.data.cache_volumes=False to load "
                         "volumes batch by batch")
    jobs = [(r.study_id, str(r.image), ct_config, on_error == "skip", disk_cache) for r in records]
    workers = 1 if disk_cache is not None else min(workers or os.cpu_count() or 1, max(1, len(jobs) // 16))
    try:
        if workers <= 1:
            out = [_preprocess_one(j) for j in jobs]
        else:  # spawn: the caller has imported JAX, which must not be forked
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                out = list(pool.map(_preprocess_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    except ct_lib.CTLoadError as e:
        path = str(e).split("'")[1] if "'" in str(e) else ""
        sid = next((r.study_id for r in records if str(r.image) == path), None)
        raise ct_lib.CTLoadError((f"study {sid}: " if sid else "") + f"{e} Find every such file with "
                                 "`python -m vljax.validate --data_dir=... --deep`, or train on without "
                                 "it with --config.data.on_error=skip.") from None
    bad = [i for i, v in enumerate(out) if v is None]
    x, y, z = shape
    zeros = np.zeros((z, x, y), ct_lib.output_dtype(ct_config))
    return np.stack([zeros if v is None else v for v in out]), bad


class _StudyLoader:
    """Loads the per-study arrays of a list of indices (shared by train and eval sources); with
    `volumes` (from `preload_volumes`, in record order) the images come from memory, with `disk_cache`
    from the preprocessed-volume cache (`volume_cache`), else from the NIfTI files.

    `on_error` says what a volume that cannot be read does: "raise" a `CTLoadError` naming the study,
    or "skip": `volume` returns None (the caller stands another study in, or leaves it out). Indices
    in `bad` (found unreadable before, e.g. by `preload_volumes`) are not read again."""

    def __init__(self, records: Sequence[StudyRecord], text: TextTable, ct_config: ct_lib.CTPreprocessConfig,
                 with_phenotypes: bool, volumes: np.ndarray | None = None, *, on_error: str = "raise",
                 bad: Sequence[int] = (), disk_cache: VolumeCache | None = None):
        self.records, self.text, self.ct_config, self.disk_cache = tuple(records), text, ct_config, disk_cache
        if volumes is not None and len(volumes) != len(self.records):
            raise ValueError(f"{len(volumes)} cached volumes for {len(self.records)} records")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.volumes, self.on_error, self.bad = volumes, on_error, set(int(i) for i in bad)
        self.with_phenotypes = with_phenotypes
        self.labels = np.array([r.labels for r in records], np.int8).reshape(len(records), -1)
        if with_phenotypes:
            missing = [r.study_id for r in records if r.phenotypes is None]
            if missing:
                raise ValueError(f"{len(missing)} studies have no phenotype row (e.g. {missing[:3]}); "
                                 "set config.model.phenotype_weight=0 or complete the phenotype table")
            self.phenotypes = np.array([r.phenotypes for r in records], np.int8)

    def volume(self, i: int) -> np.ndarray | None:
        """Study `i`'s preprocessed volume; None when it cannot be read and `on_error` is "skip"."""
        i = int(i)
        if i in self.bad:
            return None
        if self.volumes is not None:
            return self.volumes[i]
        try:
            record = self.records[i]
            return _read_volume(record.study_id, record.image, self.ct_config, self.disk_cache)
        except ct_lib.CTLoadError as e:
            if self.on_error == "skip":
                self.bad.add(i)
                return None
            raise ct_lib.CTLoadError(
                f"study {self.records[i].study_id}: {e} Find every such file before training with "
                "`python -m vljax.validate --data_dir=... --deep`, or train on without it with "
                "--config.data.on_error=skip.") from None

    def load(self, idx: np.ndarray, rows: np.ndarray, volumes: Sequence[np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
        """Studies `idx` with the texts in table rows `rows` (and their `volumes` when already read)."""
        if volumes is None:
            volumes = [self.volume(i) for i in idx]
        batch = {"image": np.stack(volumes)}
        if self.text.pooled is not None:
            batch["text_pooled"] = self.text.pooled[rows]
        else:
            if self.text.features is not None:
                batch["text_hidden"] = self.text.hidden(rows)
            else:
                batch["input_ids"] = self.text.input_ids[rows]
            batch["attention_mask"] = self.text.attention_mask[rows]
        if self.with_phenotypes:
            batch["phenotypes"] = self.phenotypes[idx]
        return batch


# Stand-ins tried for one unreadable study before the step gives up (each from the same class stream).
MAX_STAND_INS = 16


class TrainBatches:
    """Random-access Grain source: item `step` is this process's slice of the global batch at `step`
    (`sampler.batch(step)`: a text unit and the studies), with the texts of that unit.

    An item is {"inputs": what the train step consumes (`vljax.inputs.batch_spec`), "meta": {"step",
    "unit" (index into `sampling.UNITS`), "study_index" (this process's rows of `records`)}}: the
    bookkeeping travels beside the step's inputs, not among them."""

    def __init__(self, records: Sequence[StudyRecord], texts: UnitTexts, sampler: sampling.BatchSampler,
                 total_steps: int, ct_config: ct_lib.CTPreprocessConfig, *, with_phenotypes: bool = False,
                 process_index: int = 0, process_count: int = 1, volumes: np.ndarray | None = None,
                 on_error: str = "raise", bad: Sequence[int] = (), disk_cache: VolumeCache | None = None):
        if len(records) != len(texts):
            raise ValueError(f"{len(records)} records but text rows for {len(texts)} studies")
        self.loader = _StudyLoader(records, texts.table, ct_config, with_phenotypes, volumes,
                                   on_error=on_error, bad=bad, disk_cache=disk_cache)
        self.rows = texts.rows
        for u in (sampling.FULL,) + sampler.schedule.sections:
            missing = sampler.units.available[:, u] & (self.rows[:, u] < 0)
            if missing.any():
                raise ValueError(f"{int(missing.sum())} studies have a {sampling.UNITS[u]!r} text but no "
                                 f"tokenised row for it")
        self.sampler, self.total_steps = sampler, total_steps
        self.slice = host_slice(sampler.global_batch, process_index, process_count)
        self._repr = (f"TrainBatches(records={len(records)}:{_fingerprint(records)}, {sampler!r}, "
                      f"total_steps={total_steps}, ct={ct_config}, process={process_index}/{process_count})")

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        b = self.sampler.batch(int(step))
        idx = b.indices[self.slice].copy()
        volumes, skipped = [], []
        for k, i in enumerate(idx):
            v = self.loader.volume(i)
            attempt = 0
            while v is None:  # on_error="skip": a stand-in from the same class stream
                skipped.append(int(idx[k]) if attempt == 0 else int(i))
                if attempt == MAX_STAND_INS:
                    raise ct_lib.CTLoadError(
                        f"step {step}: study {self.loader.records[idx[k]].study_id} and {MAX_STAND_INS} stand-ins "
                        "for it cannot be read; run `python -m vljax.validate --data_dir=... --deep`")
                i = self.sampler.replacement(int(step), self.slice.start + k, int(idx[k]), attempt)
                attempt += 1
                v = self.loader.volume(i)
            idx[k] = i
            volumes.append(v)
        return {"inputs": self.loader.load(idx, self.rows[idx, b.unit], volumes),
                "meta": {"step": np.int64(step), "unit": np.int32(b.unit), "study_index": idx.astype(np.int32),
                         "skipped": np.asarray(sorted(set(skipped)), np.int32)}}

    def __repr__(self) -> str:
        return self._repr


class EvalBatches:
    """Random-access source over one split in order: batch i holds studies [iB, (i+1)B), the last one
    padded by repeating study 0 with `valid` = 0, so every batch has the same shape. Row i of `text`
    is study i's text."""

    def __init__(self, records: Sequence[StudyRecord], text: TextTable, global_batch: int,
                 ct_config: ct_lib.CTPreprocessConfig, *, with_phenotypes: bool = False,
                 process_index: int = 0, process_count: int = 1, volumes: np.ndarray | None = None,
                 on_error: str = "raise", bad: Sequence[int] = (), disk_cache: VolumeCache | None = None):
        if not records:
            raise ValueError("the evaluation split is empty")
        if len(records) != len(text):
            raise ValueError(f"{len(records)} records but {len(text)} tokenised texts")
        self.loader = _StudyLoader(records, text, ct_config, with_phenotypes, volumes, on_error=on_error, bad=bad,
                                   disk_cache=disk_cache)
        self.global_batch, self.num_studies = global_batch, len(records)
        self.slice = host_slice(global_batch, process_index, process_count)

    def __len__(self) -> int:
        return -(-self.num_studies // self.global_batch)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        positions = np.arange(i * self.global_batch, (i + 1) * self.global_batch)[self.slice]
        valid = positions < self.num_studies
        idx = np.where(valid, positions, 0)
        volumes = [self.loader.volume(i) for i in idx]
        loaded = np.array([v is not None for v in volumes])
        if not loaded.all():  # on_error="skip": left out of the evaluation (valid = 0), zeros in its place
            x, y, z = self.loader.ct_config.shape
            zeros = np.zeros((z, x, y), ct_lib.output_dtype(self.loader.ct_config))
            volumes = [v if v is not None else zeros for v in volumes]
        batch = self.loader.load(idx, idx, volumes)
        batch["labels"] = self.loader.labels[idx]
        batch["valid"] = (valid & loaded).astype(np.int8)
        batch["position"] = positions.astype(np.int32)
        return batch

    def __repr__(self) -> str:
        return f"EvalBatches(n={self.num_studies}, batch={self.global_batch}, slice={self.slice})"


def make_iterator(source, *, workers: int = 0, prefetch: int = 2, start: int = 0) -> grain.DatasetIterator:
    """Grain iterator over `source[start:]`, with `workers` processes each building whole batches.

    The workers end with this process, also when it is killed (`workers.exit_with_parent`). Close the
    iterator with `close_iterator` (or use `closing_iterator`) when done with it, on every exit path:
    that stops the workers and unlinks the shared-memory batches they had prefetched."""
    ds = grain.MapDataset.source(source)
    if start:
        ds = ds[start:]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker start-up reads its absl flags; outside an absl app (a library call, a
            # notebook, a benchmark) they are not parsed yet and grain would raise. Use the defaults.
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        it_ds = it_ds.mp_prefetch(options, worker_init_fn=workers_lib.exit_with_parent)
        workers_lib.release_shared_memory_at_exit()
    return iter(it_ds)


def close_iterator(it: grain.DatasetIterator) -> None:
    """Stops `it`'s worker processes and unlinks every shared-memory batch they made, except the ones
    the caller still holds (those go with their arrays). Idempotent; call it on every exit path.

    Without it an iterator still alive at exit is closed while the interpreter tears down, when Grain
    can no longer unlink the batches it buffered: the resource tracker warns of "leaked shared_memory
    objects" (`workers.py` has the details)."""
    it.close()
    workers_lib.release_shared_memory()


@contextlib.contextmanager
def closing_iterator(it: grain.DatasetIterator) -> Iterator[grain.DatasetIterator]:
    """`with closing_iterator(make_iterator(...)) as it:` closes `it` (`close_iterator`) on leaving."""
    try:
        yield it
    finally:
        close_iterator(it)


# ---------------------------------------------------------------------------------------------------
# Device arrays
# ---------------------------------------------------------------------------------------------------


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, axis: str | tuple[str, ...] = ("data", "fsdp")
              ) -> dict[str, jax.Array]:
    """Per-host numpy slices → global `jax.Array`s with their leading (batch) axis split over `axis`
    (default: every device of the (data, fsdp) mesh, `vljax.sharding.BATCH`)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        spec = P(axis) if value.ndim else P()
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out
