"""A cache of preprocessed CT volumes: the pipeline's preprocessing (`ct.load_model_input`) run once
per study into ArrayRecord shards that Grain reads, so that epochs stop paying the NIfTI decode and
resample (about 1 s for a 512x512x300 CT). `build_cache` (tools/preprocess.py) writes it, resumably;
`VolumeCache` reads it, bitwise what on-the-fly preprocessing returns, when `config.data.cache` names it.

    index.json                          settings + fingerprint, the shards, each study's place
    shard-00003-of-00024.array_record   per study: a JSON header record (study id, source file size and
                                        mtime_ns, settings, crc32 of the voxels), its voxels in <= 1 MiB records
    shard-00003-of-00024.done.json      a finished shard's entries: the unit of resumption

Opening refuses a cache built with other settings; every read checks the source file's size and
mtime, the header and the crc32. A study unreadable at build time (`on_error="skip"`) keeps its
`CTLoadError`, which a read raises again, as on-the-fly preprocessing would.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from vljax.data import ct as ct_lib

FORMAT, FORMAT_VERSION = "vljax-volume-cache", 1
# Bump when vljax/data/ct.py's output changes for the same settings: every older cache is then refused
# (tests/data/test_volume_cache.py holds a digest of that output and fails until this is bumped).
CHAIN_VERSION = 1
MAGIC, INDEX = b"VLJXVOL1", "index.json"
COMPRESSION = "zstd:1"  # ArrayRecord's per-record compression (lossless; "uncompressed" also works)
PART_BYTES = 1 << 20
_MAX_SHARD_BYTES, _TARGET_SHARDS = 2 << 30, 64  # auto_shard_size


class VolumeCacheError(ValueError):
    """The cache cannot serve this run: missing, unfinished, damaged, stale, or built with other
    settings. Not a `CTLoadError`: a bad cache stops the run, it is never skipped as a bad study."""


def settings(config: ct_lib.CTPreprocessConfig) -> dict:
    """The preprocessing settings that determine the cached voxels."""
    return {"spacing": list(config.spacing), "shape": list(config.shape), "hu_window": list(config.hu_window),
            "dtype": config.dtype}


def _settings_diff(built: dict, config: ct_lib.CTPreprocessConfig) -> str:
    diff = [f"{k} {built.get(k)} in the cache, {v} here" for k, v in settings(config).items() if built.get(k) != v]
    return "; ".join(diff) or "an older cache format or preprocessing chain"


def fingerprint(config: ct_lib.CTPreprocessConfig) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "chain": CHAIN_VERSION, "settings": settings(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rebuild_hint(path: pathlib.Path, data_dir: str = "") -> str:
    return (f"re-run `python tools/preprocess.py --data_dir={data_dir or 'DATA'} --out={path} --config=...` with the "
            "run's config (it keeps the shards that are still good)")


def _source_stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a source file, None when it cannot be read."""
    try:
        return (st := os.stat(path)).st_size, st.st_mtime_ns
    except OSError:
        return None


def auto_shard_size(num_studies: int, config: ct_lib.CTPreprocessConfig) -> int:
    """Studies per shard: about 64 shards (build parallelism, resume granularity), at most 2 GiB each."""
    volume_bytes = math.prod(config.shape) * ct_lib.output_dtype(config).itemsize
    return max(1, min(math.ceil(num_studies / _TARGET_SHARDS), _MAX_SHARD_BYTES // volume_bytes))


def encode_study(study_id: str, volume: np.ndarray, source: tuple[int, int], config: ct_lib.CTPreprocessConfig
                 ) -> tuple[list, int]:
    """(records, crc32 of the voxel bytes) of one study: a header record, then the voxel bytes in
    records of at most PART_BYTES (Riegeli reads records of tens of MB ten times slower)."""
    data = memoryview(np.ascontiguousarray(volume).reshape(-1).view(np.uint8))
    crc, parts = zlib.crc32(data), [data[k:k + PART_BYTES] for k in range(0, len(data), PART_BYTES)]
    header = json.dumps({"study_id": study_id, "source_size": source[0], "source_mtime_ns": source[1],
                         "settings": settings(config), "fingerprint": fingerprint(config), "shape": list(volume.shape),
                         "dtype": config.dtype, "parts": len(parts), "crc32": crc}).encode()
    return [MAGIC + struct.pack("<I", len(header)) + header, *parts], crc


def decode_study(raws: Sequence[bytes], study_id: str, fp: str, source: tuple[int, int], dtype: np.dtype
                 ) -> np.ndarray:
    """The volume in a study's records (`encode_study`), after checking its header and crc32; raises
    ValueError."""
    head = raws[0]
    if head[:len(MAGIC)] != MAGIC:
        raise ValueError("not a vljax volume record")
    (n,) = struct.unpack_from("<I", head, len(MAGIC))
    header = json.loads(head[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    out = np.empty(header["shape"], dtype)
    flat, crc, at = out.reshape(-1).view(np.uint8), 0, 0
    for part in raws[1:]:  # copy and checksum each part while it is in the CPU cache
        flat[at:at + len(part)] = np.frombuffer(part, np.uint8)
        crc, at = zlib.crc32(part, crc), at + len(part)
    for bad, what in ((header["study_id"] != study_id, f"it holds study {header['study_id']}"),
                      (header["fingerprint"] != fp, "it was made with other preprocessing settings"),
                      ((header["source_size"], header["source_mtime_ns"]) != tuple(source), "it names another source"),
                      (len(raws) != 1 + header["parts"] or at != flat.size, "its size is wrong"),
                      (crc != header["crc32"], "its voxels fail their crc32")):
        if bad:
            raise ValueError(what)
    return out


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    name: str  # shard-00003-of-00024
    studies: tuple[tuple[str, str], ...]  # (study id, source path)


@dataclasses.dataclass(frozen=True)
class BuildSummary:
    """What `build_cache` did; `unreadable`: the study ids recorded as such (`on_error="skip"`)."""

    studies: int
    shards: int
    kept_shards: int
    written_shards: int
    unreadable: tuple[str, ...]
    seconds: float
    bytes: int


def _write_json(path: pathlib.Path, obj) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut short by a crash
        return None


def _write_shard(job: tuple[_Shard, str, ct_lib.CTPreprocessConfig, str, str]) -> dict:
    """Preprocesses one shard's studies into its file, then writes its marker; returns the marker."""
    shard, out, config, on_error, compression = job
    final = pathlib.Path(out) / f"{shard.name}.array_record"
    tmp = final.with_name(final.name + ".tmp")
    entries, n = [], 0
    writer = ArrayRecordWriter(str(tmp), f"group_size:1,{compression}")
    try:
        for study_id, path in shard.studies:
            size, mtime = _source_stat(path) or (-1, -1)  # a missing file: load_model_input names it
            entry = {"study_id": study_id, "source_size": size, "source_mtime_ns": mtime}
            try:
                volume = ct_lib.load_model_input(path, config)
            except ct_lib.CTLoadError as e:
                if on_error == "skip":
                    entries.append({**entry, "error": {"kind": e.kind, "message": str(e)}})
                    continue
                err = ct_lib.CTLoadError(f"study {study_id}: {e} Fix or drop it (`python -m vljax.validate "
                                         "--data_dir=... --deep` lists all such files), or record it as unreadable "
                                         "with --config.data.on_error=skip; a rerun keeps the finished shards.")
                err.kind = e.kind
                raise err from None
            records, crc = encode_study(study_id, volume, (size, mtime), config)
            for record in records:
                writer.write(bytes(record))
            entries.append({**entry, "position": n, "records": len(records), "crc32": crc})
            n += len(records)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if writer.is_open():
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    marker = {"fingerprint": fingerprint(config), "shard": shard.name, "num_records": n,
              "file_size": final.stat().st_size, "studies": entries}
    _write_json(final.with_name(f"{shard.name}.done.json"), marker)
    return marker


def _kept_marker(out: pathlib.Path, shard: _Shard, config: ct_lib.CTPreprocessConfig, verify: bool
                 ) -> tuple[dict | None, str]:
    """(marker, "") when an earlier run finished `shard` and it is still good, else (None, why not)."""
    marker, file = _read_json(out / f"{shard.name}.done.json"), out / f"{shard.name}.array_record"
    if marker is None or marker.get("fingerprint") != fingerprint(config):
        return None, "unfinished"
    if [e["study_id"] for e in marker["studies"]] != [sid for sid, _ in shard.studies]:
        return None, "planned differently"
    if not file.is_file() or file.stat().st_size != marker["file_size"]:
        return None, "shard file missing or resized"
    if any(_source_stat(path) != (e["source_size"], e["source_mtime_ns"])
           for e, (_, path) in zip(marker["studies"], shard.studies)):
        return None, "source files changed"
    if verify:
        try:
            reader = ArrayRecordReader(str(file), "readahead_buffer_size:0")
            for e in (e for e in marker["studies"] if "error" not in e):
                decode_study(reader.read(list(range(e["position"], e["position"] + e["records"]))), e["study_id"],
                             fingerprint(config), (e["source_size"], e["source_mtime_ns"]), ct_lib.output_dtype(config))
            reader.close()
        except Exception:  # noqa: BLE001 - any damage: redo the shard
            return None, "damaged (--verify)"
    return marker, ""


def build_cache(records: Sequence, out: str | os.PathLike, config: ct_lib.CTPreprocessConfig, *, workers: int = 0,
                shard_size: int = 0, on_error: str = "raise", verify: bool = False, compression: str = COMPRESSION,
                data_dir: str = "", log: Callable[..., None] = logging.info) -> BuildSummary:
    """Preprocesses every record's CT (`.study_id`, `.image`) into the cache folder `out`, in `workers`
    processes (0: one per core; 1: in this process), keeping the shards an interrupted or earlier run
    finished. `on_error="skip"` records unreadable studies instead of stopping at the first."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    t0, out = time.perf_counter(), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            raise VolumeCacheError(f"{out}: another tools/preprocess.py is writing this cache") from None
        index = _read_json(out / INDEX)
        if any(m is not None and m.get("fingerprint") != fingerprint(config)
               for m in [index, *(_read_json(p) for p in out.glob("shard-*.done.json"))]):
            built = _settings_diff(index["settings"], config) if index and "settings" in index else "unfinished"
            raise VolumeCacheError(f"{out} holds a volume cache built with other preprocessing settings ({built}); "
                                   "give another --out, or delete that folder to rebuild it for this config")
        (out / INDEX).unlink(missing_ok=True)  # the cache is incomplete until the new index is written
        studies = sorted((r.study_id, str(r.image)) for r in records)
        size = shard_size or auto_shard_size(len(studies), config)
        count = max(1, math.ceil(len(studies) / size))
        shards = [_Shard(f"shard-{k:05d}-of-{count:05d}", tuple(studies[k * size:(k + 1) * size]))
                  for k in range(count)]
        markers, todo, why = {}, [], collections.Counter()
        for shard in shards:
            marker, reason = _kept_marker(out, shard, config, verify)
            if marker is not None:
                markers[shard.name] = marker
            else:
                todo.append(shard)
                why[reason] += 1
        planned = {f"{s.name}{ext}" for s in shards for ext in (".array_record", ".done.json")}
        for stale in {*out.glob("shard-*"), *out.glob("*.tmp")}:
            if stale.name not in planned:
                stale.unlink()
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        log(f"{out}: {len(studies)} studies in {count} shards of {size}; kept {len(markers)} shard(s) finished "
            f"by an earlier run ({sum(len(m['studies']) for m in markers.values())} studies); preprocessing "
            + (f"{len(todo)} ({', '.join(f'{n} {r}' for r, n in sorted(why.items()))}) in {workers} process(es)"
               if todo else "none"))
        jobs = [(s, str(out), config, on_error, compression) for s in todo]
        for done, marker in enumerate(_run(_write_shard, jobs, workers), start=1):
            markers[marker["shard"]] = marker
            elapsed = time.perf_counter() - t0
            log(f"{marker['shard']} written ({len(marker['studies'])} studies); {done}/{len(todo)} in "
                f"{elapsed:.0f} s, about {elapsed / done * (len(todo) - done):.0f} s left")
        entries = {e["study_id"]: {"shard": k, **e} for k, s in enumerate(shards) for e in markers[s.name]["studies"]}
        files = [{"file": f"{s.name}.array_record", "num_records": markers[s.name]["num_records"]} for s in shards]
        _write_json(out / INDEX, {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint(config),
                                  "settings": settings(config), "chain_version": CHAIN_VERSION,
                                  "compression": compression, "shard_size": size, "data_dir": data_dir,
                                  "shards": files, "studies": entries})
    return BuildSummary(len(studies), count, count - len(todo), len(todo),
                        tuple(sid for sid, e in entries.items() if "error" in e), time.perf_counter() - t0,
                        sum((out / f["file"]).stat().st_size for f in files))


def _run(fn: Callable, jobs: list, workers: int) -> Iterator:
    """fn(job) for every job, results as they finish: in this process, or in `workers` processes."""
    if workers == 1:
        yield from map(fn, jobs)
        return
    # spawn: callers may have imported JAX, which must not be forked
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        try:
            yield from (future.result() for future in concurrent.futures.as_completed(futures))
        except BaseException:  # the first error: let the running shards finish (they are kept), start no more
            pool.shutdown(cancel_futures=True)
            raise


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class VolumeCache:
    """Random access to a built cache for one run's preprocessing settings: `read(study_id, path)`.
    Picklable: each Grain worker gets a copy, which opens its own shard readers when first read."""

    def __init__(self, path: str | os.PathLike, config: ct_lib.CTPreprocessConfig):
        self.path = pathlib.Path(path)
        where = f"volume cache {self.path}"
        if not self.path.is_dir():
            raise VolumeCacheError(f"{where} does not exist; build it with `python tools/preprocess.py "
                                   f"--data_dir=DATA --out={self.path} --config=...` (the run's config)")
        index = _read_json(self.path / INDEX)
        if index is None:
            raise VolumeCacheError(f"{where} has no readable {INDEX}: its build did not finish; "
                                   f"{_rebuild_hint(self.path)}")
        self.fingerprint, self.dtype = fingerprint(config), ct_lib.output_dtype(config)
        if index.get("fingerprint") != self.fingerprint:  # it covers FORMAT_VERSION and CHAIN_VERSION too
            diff = _settings_diff(index.get("settings", {}), config)
            raise VolumeCacheError(f"{where} was built with other preprocessing settings ({diff}): its volumes are "
                                   "not this run's. Build one for this config into a new folder: python tools/"
                                   "preprocess.py --data_dir=DATA --out=NEW --config=... (with the run's "
                                   "--config.data.* flags)")
        self.data_dir = index.get("data_dir", "")
        self._studies: dict[str, dict] = index["studies"]
        self._offsets = np.cumsum([0] + [s["num_records"] for s in index["shards"]]).tolist()
        self._files = [(str(self.path / s["file"]), s["num_records"]) for s in index["shards"]]
        self._source = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def _entry(self, study_id: str, path: str) -> dict:
        entry = self._studies.get(study_id)
        if entry is None:
            raise VolumeCacheError(f"study {study_id} is not in the volume cache {self.path} ({len(self._studies)} "
                                   f"studies); {_rebuild_hint(self.path, self.data_dir)} to add it")
        now = _source_stat(path)
        if now != (entry["source_size"], entry["source_mtime_ns"]):
            found = "is missing" if now is None else f"has size {now[0]} and mtime_ns {now[1]}"
            raise VolumeCacheError(f"study {study_id}: its CT file {path!r} {found}, but the volume cache {self.path} "
                                   f"was built from one of size {entry['source_size']} and mtime_ns "
                                   f"{entry['source_mtime_ns']}: the cached volume may be stale; "
                                   f"{_rebuild_hint(self.path, self.data_dir)}")
        return entry

    def check(self, records: Sequence) -> None:
        """Every record (`.study_id`, `.image`) is in the cache and its source file unchanged, else one
        VolumeCacheError naming the first ones (before training starts rather than mid-run)."""
        problems = []
        for r in records:
            try:
                self._entry(r.study_id, str(r.image))
            except VolumeCacheError as e:
                problems.append(str(e))
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise VolumeCacheError(f"volume cache {self.path}: {len(problems)} of {len(records)} studies cannot be "
                                   "read from it:\n  " + "\n  ".join(problems[:10]) + more)

    def read(self, study_id: str, path: str) -> np.ndarray:
        """Study `study_id`'s preprocessed volume, bitwise what `ct.load_model_input(path)` returns.
        Raises the recorded CTLoadError for a study unreadable at build time."""
        entry = self._entry(study_id, str(path))
        if "error" in entry:
            err = ct_lib.CTLoadError(f"{entry['error']['message']} (recorded in the volume cache {self.path})")
            err.kind = entry["error"]["kind"]
            raise err
        key = self._offsets[entry["shard"]] + entry["position"]
        try:
            source = self._records()  # one record at a time: Grain's __getitems__ threads cost more than they gain
            raws = [source[k] for k in range(key, key + entry["records"])]
            return decode_study(raws, study_id, self.fingerprint, (entry["source_size"], entry["source_mtime_ns"]),
                                self.dtype)
        except Exception as e:  # noqa: BLE001 - Riegeli's RuntimeError, a bad header, a checksum
            what = str(e).splitlines()[0][:200] if str(e) else ""
            raise VolumeCacheError(f"study {study_id}: its record in {self._files[entry['shard']][0]} is damaged "
                                   f"({type(e).__name__}: {what}); "
                                   f"{_rebuild_hint(self.path, self.data_dir)} and --verify") from None

    def _records(self):
        if self._source is None:
            import grain  # here: the build's worker processes never need it

            # "path[0:n]": the record counts are known, so no shard is opened to count them
            self._source = grain.sources.ArrayRecordDataSource([f"{f}[0:{n}]" for f, n in self._files if n])
        return self._source
