"""Benchmarks, printed as ratios against a baseline measured in the same run.

    python tools/bench.py data [--num-studies 64] [--data-dir DIR] [--repeats 3]

`data`: CT load + preprocess throughput (studies/s, MB/s of decoded voxels) on the phantom, beside
the I/O floor (read the same .nii.gz files and gunzip them, nothing else). Two targets: the phantom
training geometry and Merlin's full 224x224x160 at 1.5x1.5x3 mm.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from vljax.data.ct import CTPreprocessConfig, preprocess_ct
from vljax.data.phantom import IMAGES_DIR, PhantomConfig, generate_phantom

TARGETS = {
    "phantom 64x64x48 @ 7x7x10 mm": CTPreprocessConfig(spacing=(7.0, 7.0, 10.0), shape=(64, 64, 48)),
    "merlin 224x224x160 @ 1.5x1.5x3 mm": CTPreprocessConfig(),
}


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_data(files: list[pathlib.Path], repeats: int) -> None:
    n = len(files)
    raw_bytes = sum(len(gzip.decompress(p.read_bytes())) for p in files)
    gz_bytes = sum(p.stat().st_size for p in files)

    def io_floor():
        for p in files:
            gzip.decompress(p.read_bytes())

    t_floor = _best_of(io_floor, repeats)
    print(f"{n} phantom studies, {gz_bytes / 2**20:.1f} MiB gzipped, {raw_bytes / 2**20:.1f} MiB decoded; "
          f"best of {repeats}, 1 process")
    print(f"{'what':52s} {'studies/s':>10s} {'MB/s':>8s} {'x floor time':>13s}")
    print(f"{'I/O floor: read + gunzip':52s} {n / t_floor:10.1f} {raw_bytes / 1e6 / t_floor:8.1f} {1.0:13.2f}")
    for name, cfg in TARGETS.items():
        def run(cfg=cfg):
            for p in files:
                preprocess_ct(p, cfg)

        t = _best_of(run, repeats)
        print(f"{'load+preprocess -> ' + name:52s} {n / t:10.1f} {raw_bytes / 1e6 / t:8.1f} {t / t_floor:13.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["data"])
    p.add_argument("--num-studies", type=int, default=64)
    p.add_argument("--data-dir", help="an existing phantom/Merlin folder (default: generate one in a temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(a.data_dir) if a.data_dir else pathlib.Path(tmp)
        if not a.data_dir:
            generate_phantom(root, PhantomConfig(num_studies=a.num_studies, seed=0), log=lambda *_: None)
        files = sorted((root / IMAGES_DIR).glob("*.nii*"))[: a.num_studies]
        if not files:
            print(f"error: no .nii/.nii.gz files under {root / IMAGES_DIR}", file=sys.stderr)
            return 2
        print(f"cpu cores: {os.cpu_count()}, numpy {np.__version__}")
        bench_data(files, a.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
