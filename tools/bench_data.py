"""`python tools/bench.py data`: CT input throughput: the I/O floors, load + preprocess on the fly, and
reads from the preprocessed-volume cache (vljax/data/volume_cache.py, tools/preprocess.py).

Loading: for each target geometry, studies/s and MB/s of (1) the NIfTI I/O floor (read the .nii.gz and
gunzip it, nothing else), (2) `ct.load_model_input` on the fly, (3) the cache build (`--workers`
processes), (4) the cache's I/O floor (read its shard files, nothing else) and (5) `VolumeCache.read`
(ArrayRecord record, crc32, header and source-file checks). "warm": files in the page cache (best of
`--repeats`); "cold": evicted first (posix_fadvise DONTNEED), as a dataset larger than memory is read.
MB/s counts the bytes each row delivers: decoded NIfTI voxels for the NIfTI floor, model-input voxels
for the rest.

Pipeline: batches/s of the trainer's Grain source (`--config`, default the phantom recipe) with 0 and
`--workers` worker processes, its volumes preprocessed on the fly and read from a volume cache (and, when
the config keeps them in memory, `config.data.cache_volumes`, as configured).

`--realistic N`: N synthetic 512x512x300 int16 CTs (0.8x0.8x1.5 mm, body, organs, bone, lungs,
15 HU noise) in place of the phantom's volumes, in the Merlin layout.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import tempfile
import time
import types

import numpy as np

from vljax.data import volume_cache
from vljax.data.ct import CTPreprocessConfig, load_model_input
from vljax.data.phantom import IMAGES_DIR, PhantomConfig, generate_phantom

TARGETS = {
    "phantom 64x64x48 @ 7x7x10 mm": CTPreprocessConfig(spacing=(7.0, 7.0, 10.0), shape=(64, 64, 48)),
    "merlin 224x224x160 @ 1.5x1.5x3 mm": CTPreprocessConfig(),
}


def _best_of(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _evict(paths) -> None:
    """Drops the files' pages from the page cache (clean pages; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def synthesize_realistic(root: pathlib.Path, n: int, seed: int = 0) -> None:
    """An n-study phantom dataset (reports, labels) whose volumes are replaced by 512x512x300 int16
    abdominal-CT-like volumes at 0.8x0.8x1.5 mm: the size and gzip ratio of real scans."""
    import nibabel as nib

    generate_phantom(root, PhantomConfig(num_studies=n, seed=seed, workers=1), log=lambda *_: None)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(512) - 255.5, np.arange(512) - 255.5, indexing="ij")
    z = np.arange(300)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    for path in sorted((root / IMAGES_DIR).glob("*.nii.gz")):
        a, b = rng.uniform(200, 230), rng.uniform(140, 170)  # body semi-axes, voxels
        body = (x / a) ** 2 + (y / b) ** 2
        vol = np.where(body < 1, np.where(body > 0.8, -100, 40), -1000).astype(np.float32)[:, :, None]
        vol = np.repeat(vol, len(z), axis=2)
        vol[(x / 30) ** 2 + ((y + 0.7 * b) / 30) ** 2 < 1, :] = 700  # spine
        for cx, cy, r, hu in ((-0.4 * a, 0.1 * b, 70, 60), (0.45 * a, 0.0, 40, 50), (0.0, 0.2 * b, 35, 30)):
            vol[((x - cx) ** 2 + (y - cy) ** 2 < r ** 2)] = hu  # liver, spleen, aorta-ish
        lung = (((np.abs(x) - 0.45 * a) / (0.35 * a)) ** 2 + (y / (0.7 * b)) ** 2 < 1)[:, :, None] & (z > 230)
        vol[lung] = -850
        vol += rng.normal(0, 15, vol.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.clip(vol, -1024, 3071).astype(np.int16), affine), str(path))


def bench_loading(files: list[pathlib.Path], repeats: int, workers: int) -> None:
    n = len(files)
    raw_bytes = sum(len(gzip.decompress(p.read_bytes())) for p in files)
    gz_bytes = sum(p.stat().st_size for p in files)
    records = [types.SimpleNamespace(study_id=p.name.split(".")[0], image=str(p)) for p in files]
    print(f"{n} studies, {gz_bytes / 2**20:.1f} MiB gzipped, {raw_bytes / 2**20:.1f} MiB decoded; best of {repeats}")
    print(f"{'what':60s} {'studies/s':>10s} {'MB/s':>8s} {'x floor time':>13s}")
    floor = {}
    for mode, evict in (("warm", None), ("cold", lambda: _evict(files))):
        floor[mode] = _best_of(lambda: [gzip.decompress(p.read_bytes()) for p in files], repeats, evict)
        print(f"{f'NIfTI I/O floor, {mode}: read + gunzip':60s} {n / floor[mode]:10.1f} "
              f"{raw_bytes / 1e6 / floor[mode]:8.1f} {1.0:13.2f}")
    for name, cfg in TARGETS.items():
        out_bytes = n * int(np.prod(cfg.shape)) * 4
        print(f"{name} (float32 model input, {out_bytes / n / 2**20:.1f} MiB a study):")

        def row(what: str, t: float, mode: str = "warm") -> None:
            print(f"  {what:58s} {n / t:10.1f} {out_bytes / 1e6 / t:8.1f} {t / floor[mode]:13.2f}")

        row("on the fly: load + preprocess, 1 process", _best_of(lambda: [load_model_input(p, cfg) for p in files],
                                                                 repeats))
        with tempfile.TemporaryDirectory() as tmp:
            summary = volume_cache.build_cache(records, tmp, cfg, workers=workers, log=lambda *_: None)
            row(f"cache build: {workers} process(es), {summary.shards} shards, {summary.bytes / out_bytes:.2f} "
                "of raw size", summary.seconds)
            shards = sorted(pathlib.Path(tmp).glob("*.array_record"))
            cache = volume_cache.VolumeCache(tmp, cfg)
            for mode, evict in (("warm", None), ("cold", lambda: _evict(shards))):
                row(f"cache I/O floor, {mode}: read the shard files", _best_of(
                    lambda: [p.read_bytes() for p in shards], repeats, evict), mode)
                row(f"cached read, {mode}: VolumeCache.read (+ crc32, stat)", _best_of(
                    lambda: [cache.read(r.study_id, r.image) for r in records], repeats, evict), mode)


def bench_pipeline(config, root: pathlib.Path, batches: int, workers: int) -> None:
    """Batches/s of the trainer's Grain source (0 and `workers` processes): on the fly, from a volume
    cache, and as configured when the config keeps volumes in memory."""
    from vljax import inputs
    from vljax.data import pipeline
    from vljax.data.manifest import load_manifest

    config.data.dir = str(root)
    manifest = load_manifest(root)
    tokenizer = inputs.tokenizer_for(config)
    records = inputs.train_records(config, manifest)
    while config.batch_size > 1:  # a small dataset: the largest batch (halving) that every text unit can fill
        try:
            inputs.make_sampler(config, records)
            break
        except ValueError:
            config.batch_size //= 2
    b = config.batch_size
    files = [r.image for r in manifest.split("train")[:64]]
    t_floor = _best_of(lambda: [gzip.decompress(pathlib.Path(f).read_bytes()) for f in files], 2) / len(files)
    print(f"\ninput pipeline: {config.data.sampling} sampling, global batch {b}, volume {tuple(config.data.shape)} "
          f"{config.data.dtype}, {len(manifest.split('train'))} training studies")
    print(f"{'what':60s} {'batches/s':>10s} {'studies/s':>10s}")
    print(f"{'NIfTI I/O floor, warm: read + gunzip, 1 process':60s} {1 / (t_floor * b):10.2f} {1 / t_floor:10.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        volume_cache.build_cache(manifest.records, tmp, inputs.ct_config(config), workers=workers, log=lambda *_: None)
        modes = {"on the fly": dict(cache_volumes=False, cache=None),
                 "volume cache": dict(cache_volumes=False, cache=tmp)}
        if config.data.cache_volumes:
            modes["in memory (config.data.cache_volumes)"] = dict(cache_volumes=True, cache=None)
        for mode, fields in modes.items():
            config.data.update(fields)
            source = inputs.train_source(config, manifest, tokenizer)
            for n in sorted({0, workers}):
                with pipeline.closing_iterator(pipeline.make_iterator(source, workers=n,
                                                                      prefetch=config.data.prefetch)) as it:
                    next(it)  # start-up (worker processes, first batch) is not throughput
                    t0 = time.perf_counter()
                    for _ in range(batches):
                        next(it)
                    dt = (time.perf_counter() - t0) / batches
                print(f"{f'Grain source, {mode}, {n} worker(s)':60s} {1 / dt:10.2f} {b / dt:10.1f}")


def main(config, data_dir: str | None, num_studies: int, realistic: int, repeats: int, batches: int,
         workers: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(data_dir) if data_dir else pathlib.Path(tmp)
        if realistic:
            synthesize_realistic(root, realistic)
        elif not data_dir:
            generate_phantom(root, PhantomConfig(num_studies=num_studies, seed=0), log=lambda *_: None)
        files = sorted((root / IMAGES_DIR).glob("*.nii*"))[: realistic or num_studies]
        if not files:
            print(f"error: no .nii/.nii.gz files under {root / IMAGES_DIR}")
            return 2
        print(f"cpu cores: {os.cpu_count()}, numpy {np.__version__}; cache compression {volume_cache.COMPRESSION}")
        bench_loading(files, repeats, workers)
        bench_pipeline(config, root, batches, workers)
    return 0
