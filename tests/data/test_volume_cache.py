"""The preprocessed-volume cache (vljax/data/volume_cache.py, tools/preprocess.py): reads are bitwise the
on-the-fly volumes and batches; damage, stale sources and other settings are refused with the study
and the fix; an interrupted build resumes, keeping its finished shards untouched.

All on the small session phantom (tests/conftest.py) at 16x16x8 voxels; tests that change files work on
copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from vljax.data import ct as ct_lib
from vljax.data import pipeline, sampling
from vljax.data import volume_cache as vc
from vljax.data.manifest import load_manifest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# configs/merlin.py:tiny's preprocessing
CFG = ct_lib.CTPreprocessConfig(spacing=(24.0, 24.0, 40.0), shape=(16, 16, 8), hu_window=(-200.0, 300.0))
SHARD = 5  # 24 studies -> 5 shards (the last of 4)


def _records(data_dir) -> tuple:
    return load_manifest(data_dir).records


def _copy(phantom_dir, tmp_path) -> pathlib.Path:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    return data


def _build(records, out, config=CFG, **kw) -> vc.BuildSummary:
    return vc.build_cache(records, out, config, workers=kw.pop("workers", 1), shard_size=SHARD,
                          log=kw.pop("log", lambda *_: None), **kw)


def _header(raw: bytes) -> dict:
    (n,) = np.frombuffer(raw[len(vc.MAGIC):len(vc.MAGIC) + 4], "<u4")
    return json.loads(raw[len(vc.MAGIC) + 4:len(vc.MAGIC) + 4 + int(n)])


@pytest.fixture(scope="module")
def cache_dir(phantom_dir, tmp_path_factory):
    """A float32 cache of the whole session phantom (never modified by the tests)."""
    out = tmp_path_factory.mktemp("volume_cache") / "cache"
    _build(_records(phantom_dir), out)
    return out


# ------------------------------------------------------------------------------------------------
# Bitwise the same as preprocessing on the fly
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_volumes_are_bitwise_the_preprocessed_ones(phantom_dir, tmp_path, monkeypatch, dtype):
    config = dataclasses.replace(CFG, dtype=dtype)
    records = _records(phantom_dir)
    monkeypatch.setattr(vc, "PART_BYTES", 3000)  # volumes of 4096 or 8192 bytes: 2 or 3 voxel records
    summary = _build(records, tmp_path / "cache", config)
    assert (summary.studies, summary.shards, summary.written_shards, summary.unreadable) == (24, 5, 5, ())
    cache = vc.VolumeCache(tmp_path / "cache", config)
    for r in records:
        got, want = cache.read(r.study_id, r.image), ct_lib.load_model_input(r.image, config)
        assert got.dtype == want.dtype == ct_lib.output_dtype(config) and got.shape == want.shape == (8, 16, 16)
        assert got.tobytes() == want.tobytes(), r.study_id
    # Each record carries its study id, the source file's size and mtime, the settings and a checksum.
    index = json.loads((tmp_path / "cache" / vc.INDEX).read_text())
    assert index["fingerprint"] == vc.fingerprint(config) and index["settings"]["dtype"] == dtype
    assert {e["records"] for e in index["studies"].values()} == {1 + -(-8 * 16 * 16 * np.dtype(ct_lib.output_dtype(
        config)).itemsize // 3000)}
    raw = ArrayRecordReader(str(tmp_path / "cache" / index["shards"][0]["file"])).read([0])[0]  # a header record
    header, first = _header(raw), sorted(r.study_id for r in records)[0]
    st = os.stat(next(r.image for r in records if r.study_id == first))
    assert (header["study_id"], header["source_size"], header["source_mtime_ns"]) == (first, st.st_size, st.st_mtime_ns)
    assert header["settings"] == vc.settings(config) and header["crc32"] == index["studies"][first]["crc32"]


def _train_source(records, disk_cache=None, on_error="raise", cache_volumes=False):
    texts = sampling.unit_texts(records)
    sampler = sampling.make_sampler(sampling.study_units(records, texts), 4, 0, strategy="alternating")
    flat, rows = pipeline.unit_strings(texts, (0,) + sampler.schedule.sections)
    ids = np.arange(len(flat) * 4, dtype=np.int32).reshape(-1, 4)  # stand-in token ids: volumes are under test
    unit_texts = pipeline.UnitTexts(pipeline.TextTable(ids, np.ones_like(ids)), rows)
    volumes, bad = (pipeline.preload_volumes(records, CFG, workers=1, on_error=on_error, disk_cache=disk_cache)
                    if cache_volumes else (None, ()))
    return pipeline.TrainBatches(records, unit_texts, sampler, 12, CFG, volumes=volumes, on_error=on_error, bad=bad,
                                 disk_cache=disk_cache)


def _assert_same_items(a: dict, b: dict) -> None:
    flat_a, flat_b = {**a["inputs"], **a["meta"]}, {**b["inputs"], **b["meta"]}
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype and flat_a[key].tobytes() == flat_b[key].tobytes(), key


def test_training_and_evaluation_batches_are_bitwise_the_same_with_the_cache(phantom_dir, cache_dir, monkeypatch):
    records = load_manifest(phantom_dir).split("train")
    table = pipeline.TextTable(np.zeros((len(records), 4), np.int32), np.ones((len(records), 4), np.int32))
    on_the_fly = _train_source(records)
    want = [on_the_fly[step] for step in range(6)]
    ev = pipeline.EvalBatches(records, table, 4, CFG)
    want_eval = [ev[i] for i in range(len(ev))]

    def no_nifti(*args, **kwargs):
        raise AssertionError("a NIfTI file was read although the volumes are cached")

    monkeypatch.setattr(ct_lib, "load_model_input", no_nifti)
    cache = vc.VolumeCache(cache_dir, CFG)
    cached = _train_source(records, cache)
    preloaded = _train_source(records, cache, cache_volumes=True)  # config.data.cache_volumes with a cache
    again = pickle.loads(pickle.dumps(cached))  # as Grain workers get it: without its open readers
    for step in range(6):
        for source in (cached, preloaded, again):
            _assert_same_items(want[step], source[step])
    ev_cached = pipeline.EvalBatches(records, table, 4, CFG, disk_cache=cache)
    for i, a in enumerate(want_eval):
        b = ev_cached[i]
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_the_trainer_opens_the_cache_named_by_the_config(cache_dir):
    from configs import merlin
    from vljax import inputs

    config = merlin.get_config("tiny")
    assert config.data.cache is None and inputs.volume_cache(config) is None
    config.data.cache = str(cache_dir)
    assert isinstance(inputs.volume_cache(config), vc.VolumeCache)
    config.data.dtype = "bfloat16"
    with pytest.raises(vc.VolumeCacheError, match=r"other preprocessing settings \(dtype float32 in the cache, "
                                                  r"bfloat16 here\).*tools/preprocess.py"):
        inputs.volume_cache(config)


# sha256 (first 16 hex digits) of `ct.preprocess_volume` on a fixed volume, float32 and bfloat16, per
# volume_cache.CHAIN_VERSION. A new digest means the preprocessing output changed and caches built before
# no longer equal on-the-fly preprocessing: bump CHAIN_VERSION (they are then refused) and add its digests.
CHAIN_DIGESTS = {1: ("8ab54dc714745d42", "ef861e988b1db599")}


def test_the_chain_version_changes_with_the_preprocessing_output():
    data = np.random.default_rng(0).integers(-1200, 1500, size=(40, 36, 20)).astype(np.int16)
    affine = np.diag([-0.9, -0.95, 2.0, 1.0])  # stored L, P, S: flipped to RAS, resampled, padded, cropped
    affine[:3, 3] = (10.0, -20.0, 30.0)
    digests = tuple(hashlib.sha256(ct_lib.preprocess_volume(data, affine, ct_lib.CTPreprocessConfig(
        spacing=(1.5, 1.7, 3.0), shape=(24, 18, 16), dtype=dtype)).tobytes()).hexdigest()[:16]
        for dtype in ("float32", "bfloat16"))
    assert digests == CHAIN_DIGESTS[vc.CHAIN_VERSION], (
        "vljax/data/ct.py's output changed: bump volume_cache.CHAIN_VERSION and add these digests", digests)


# ------------------------------------------------------------------------------------------------
# Refusals: other settings, damage, stale sources, unfinished builds
# ------------------------------------------------------------------------------------------------


def test_a_cache_built_with_other_settings_is_refused(phantom_dir, cache_dir, tmp_path):
    other = dataclasses.replace(CFG, spacing=(20.0, 24.0, 40.0))
    with pytest.raises(vc.VolumeCacheError, match=r"other preprocessing settings \(spacing \[24.0, 24.0, 40.0\] in "
                                                  r"the cache, \[20.0, 24.0, 40.0\] here\)"):
        vc.VolumeCache(cache_dir, other)
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    with pytest.raises(vc.VolumeCacheError, match="built with other preprocessing settings.*another --out"):
        _build(_records(phantom_dir), out, dataclasses.replace(CFG, hu_window=(-1000.0, 1000.0)))
    assert (out / vc.INDEX).exists()  # refused before touching anything


def test_a_missing_or_unfinished_cache_is_refused(cache_dir, tmp_path):
    with pytest.raises(vc.VolumeCacheError, match=r"does not exist; build it with `python tools/preprocess.py"):
        vc.VolumeCache(tmp_path / "nowhere", CFG)
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    (out / vc.INDEX).unlink()
    with pytest.raises(vc.VolumeCacheError, match=r"no readable index.json: its build did not finish; re-run"):
        vc.VolumeCache(out, CFG)


def _first_in_shard(cache_dir, shard: int) -> str:
    studies = json.loads((cache_dir / vc.INDEX).read_text())["studies"]
    return next(sid for sid, e in studies.items() if e["shard"] == shard and e["position"] == 0)


def test_a_flipped_byte_in_a_shard_is_a_clear_error_and_verify_rewrites_the_shard(phantom_dir, tmp_path):
    records = _records(phantom_dir)
    out = tmp_path / "cache"
    _build(records, out, compression="uncompressed")  # the voxel bytes lie in the file as they are
    sid = _first_in_shard(out, 1)
    shard = out / "shard-00001-of-00005.array_record"
    raw = bytearray(shard.read_bytes())
    at = raw.index(f'"study_id": "{sid}"'.encode()) + 2000  # past the header record, inside the voxels
    raw[at] ^= 0x40
    shard.write_bytes(bytes(raw))
    image = next(r.image for r in records if r.study_id == sid)
    with pytest.raises(vc.VolumeCacheError, match=rf"study {sid}: its record in .*shard-00001-of-00005.array_record "
                                                  r"is damaged .*tools/preprocess.py .*--verify"):
        vc.VolumeCache(out, CFG).read(sid, image)
    assert _build(records, out, compression="uncompressed").kept_shards == 5  # size unchanged: only --verify sees it
    summary = _build(records, out, compression="uncompressed", verify=True)
    assert (summary.kept_shards, summary.written_shards) == (4, 1)
    assert vc.VolumeCache(out, CFG).read(sid, image).tobytes() == ct_lib.load_model_input(image, CFG).tobytes()


def test_a_record_failing_its_checksum_is_a_clear_error(phantom_dir, cache_dir, tmp_path):
    """Damage that Riegeli's own hashes cannot see (the record was bad when written): the crc32 does."""
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    shard = out / "shard-00002-of-00005.array_record"
    reader = ArrayRecordReader(str(shard))
    raws = reader.read_all()
    reader.close()
    studies = json.loads((out / vc.INDEX).read_text())["studies"]
    sid, entry = next((s, e) for s, e in studies.items() if e["shard"] == 2 and e["position"] > 0)
    bad = bytearray(raws[entry["position"] + 1])  # its first voxel record
    bad[-7] ^= 0x01  # one voxel bit
    raws[entry["position"] + 1] = bytes(bad)
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for r in raws:
        writer.write(r)
    writer.close()
    image = next(r.image for r in _records(phantom_dir) if r.study_id == sid)
    with pytest.raises(vc.VolumeCacheError, match=rf"study {sid}: .*damaged \(ValueError: its voxels fail their "
                                                  r"crc32\)"):
        vc.VolumeCache(out, CFG).read(sid, image)
    other = next(s for s, e in studies.items() if e["shard"] == 2 and e["position"] == 0)
    vc.VolumeCache(out, CFG).read(other, next(r.image for r in _records(phantom_dir) if r.study_id == other))


def test_a_changed_source_file_is_a_clear_error_and_only_its_shard_is_redone(phantom_dir, tmp_path, monkeypatch):
    data = _copy(phantom_dir, tmp_path)
    records = _records(data)
    out = tmp_path / "cache"
    _build(records, out)
    touched, resized = _first_in_shard(out, 0), _first_in_shard(out, 3)
    by_id = {r.study_id: r for r in records}
    st = os.stat(by_id[touched].image)
    os.utime(by_id[touched].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache = vc.VolumeCache(out, CFG)
    with pytest.raises(vc.VolumeCacheError, match=rf"study {touched}: its CT file .* has size {st.st_size} and "
                                                  r"mtime_ns .*may be stale; re-run `python tools/preprocess.py"):
        cache.read(touched, by_id[touched].image)
    with pytest.raises(vc.VolumeCacheError, match=rf"1 of {len(records)} studies cannot be read from it"):
        cache.check(records)
    path = pathlib.Path(by_id[resized].image)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns))  # the access time is not checked
    cache.read(resized, by_id[resized].image)
    content = path.read_bytes()
    path.write_bytes(content + b"\0")  # a longer file
    with pytest.raises(vc.VolumeCacheError, match=rf"study {resized}: its CT file .* has size {len(content) + 1} "):
        cache.read(resized, by_id[resized].image)
    path.write_bytes(content)  # the same bytes again, a newer mtime

    def crash(job):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a rebuild that dies leaves no index claiming a finished cache
        m.setattr(vc, "_write_shard", crash)
        with pytest.raises(KeyboardInterrupt):
            _build(records, out)
    with pytest.raises(vc.VolumeCacheError, match="did not finish"):
        vc.VolumeCache(out, CFG)
    summary = _build(records, out)
    assert (summary.kept_shards, summary.written_shards) == (3, 2)  # shards 0 and 3
    vc.VolumeCache(out, CFG).check(records)


# ------------------------------------------------------------------------------------------------
# Unreadable CTs: as the rest of the data layer
# ------------------------------------------------------------------------------------------------


def _damage(data: pathlib.Path, study_id: str) -> None:
    image = next(r.image for r in _records(data) if r.study_id == study_id)
    raw = pathlib.Path(image).read_bytes()
    pathlib.Path(image).write_bytes(raw[: len(raw) // 2])


def test_a_corrupt_nifti_stops_the_build_naming_the_study_or_is_recorded_with_skip(phantom_dir, tmp_path):
    data = _copy(phantom_dir, tmp_path)
    records = _records(data)
    ids = sorted(r.study_id for r in records)
    train = [r for r in records if r.split == "train"]
    bad = next(sid for sid in ids[SHARD:] if sid in {r.study_id for r in train})  # in shard 1 or later
    _damage(data, bad)
    out = tmp_path / "cache"
    with pytest.raises(ct_lib.CTLoadError, match=rf"^study {bad}: CT file .* corrupt.*on_error=skip") as e:
        _build(records, out)
    assert e.value.kind == ct_lib.CORRUPT_VOXELS
    assert not any(r.findings[:40] in str(e.value) for r in records)  # never report text
    finished = ids.index(bad) // SHARD  # the shards before the bad study's are finished and marked
    assert sorted(p.name for p in out.glob("*.done.json")) == [f"shard-{k:05d}-of-00005.done.json"
                                                              for k in range(finished)]
    summary = _build(records, out, on_error="skip")
    assert (summary.kept_shards, summary.unreadable) == (finished, (bad,))
    cache = vc.VolumeCache(out, CFG)
    with pytest.raises(ct_lib.CTLoadError, match="corrupt") as e:
        cache.read(bad, next(r.image for r in records if r.study_id == bad))
    assert e.value.kind == ct_lib.CORRUPT_VOXELS
    # The pipeline's on_error=skip: the same stand-ins, bitwise the same batches, with or without the cache.
    on_the_fly, cached = _train_source(train, on_error="skip"), _train_source(train, cache, on_error="skip")
    bad_index = [r.study_id for r in train].index(bad)
    assert any(bad_index in on_the_fly.sampler.indices(step) for step in range(12))
    for step in range(12):
        _assert_same_items(on_the_fly[step], cached[step])


# ------------------------------------------------------------------------------------------------
# Resumption
# ------------------------------------------------------------------------------------------------


def test_an_interrupted_build_resumes_keeping_its_finished_shards(phantom_dir, cache_dir, tmp_path, monkeypatch):
    records = _records(phantom_dir)
    out = tmp_path / "cache"
    real, calls = vc._write_shard, []

    def crash_in_third_shard(job):
        calls.append(job[0].name)
        if len(calls) == 3:  # dies half-way through writing it, as a killed process would
            (out / f"{job[0].name}.array_record.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(vc, "_write_shard", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(records, out)
    monkeypatch.setattr(vc, "_write_shard", real)
    with pytest.raises(vc.VolumeCacheError, match="did not finish"):
        vc.VolumeCache(out, CFG)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
                for p in sorted(out.glob("shard-0000[01]-*"))}
    assert len(finished) == 4  # two shards and their markers
    lines = []
    summary = _build(records, out, log=lines.append)
    assert (summary.kept_shards, summary.written_shards) == (2, 3)
    assert "kept 2 shard(s) finished by an earlier run (10 studies); preprocessing 3 (3 unfinished)" in lines[0]
    for name, (ino, mtime, content) in finished.items():  # not rewritten
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) == (ino, mtime, content), name
    assert not list(out.glob("*.tmp"))
    # The same cache as an uninterrupted build, byte for byte.
    names = sorted(p.name for p in cache_dir.glob("shard-*.array_record"))
    assert names == sorted(p.name for p in out.glob("shard-*.array_record"))
    for name in names:
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name
    index, reference = (json.loads((d / vc.INDEX).read_text()) for d in (out, cache_dir))
    assert index == reference


def test_two_builds_of_one_cache_at_once_are_refused(phantom_dir, tmp_path):
    import fcntl

    out = tmp_path / "cache"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # as a tools/preprocess.py running on this folder holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(vc.VolumeCacheError, match="another tools/preprocess.py is writing this cache"):
            _build(_records(phantom_dir), out)
    assert not list(out.glob("shard-*"))


def test_worker_processes_write_the_same_cache(phantom_dir, cache_dir, tmp_path):
    out = tmp_path / "cache"
    assert _build(_records(phantom_dir), out, workers=2).written_shards == 5
    names = sorted(p.name for p in cache_dir.glob("shard-*"))
    assert names == sorted(p.name for p in out.glob("shard-*"))
    for name in names:
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name


def test_the_preprocess_command_resumes_a_killed_build(phantom_dir, cache_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    (out / vc.INDEX).unlink()  # killed after four shards and before the last one's marker
    (out / "shard-00004-of-00005.done.json").unlink()
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess.py"), f"--data_dir={phantom_dir}", f"--out={out}",
           "--config=configs/merlin.py:tiny", "--workers=1", f"--shard_size={SHARD}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "24 studies in 5 shards" in run.stdout and "4 kept from an earlier run, 1 written" in run.stdout
    assert "kept 4 shard(s) finished by an earlier run (20 studies); preprocessing 1 (1 unfinished)" in run.stderr
    for name in sorted(p.name for p in cache_dir.glob("shard-*")):
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name
    vc.VolumeCache(out, CFG).check(_records(phantom_dir))
