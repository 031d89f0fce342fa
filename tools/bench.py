"""Benchmarks, printed as ratios against a baseline measured in the same run.

    python tools/bench.py data [--num-studies 64] [--data-dir DIR] [--repeats 3] [--batches 24] [--workers N]
    python tools/bench.py step [--config configs/merlin.py:phantom] [--batch N] [--steps 10]
    python tools/bench.py flops [--config configs/merlin.py] [--batch 1]

`data`: CT load + preprocess throughput (studies/s, MB/s of decoded voxels) on the phantom, beside
the I/O floor (read the same .nii.gz files and gunzip them, nothing else). Two targets: the phantom
training geometry and Merlin's full 224x224x160 at 1.5x1.5x3 mm. Then the training input pipeline
itself (`--config`, default the phantom recipe with alternating sampling): Grain batches per second
with 0 workers (in the trainer's process) and with N worker processes, against the I/O floor for the
same studies; compare with the train step time from `step` to see whether input can bottleneck.

`step`: compiles the config's train step, prints XLA's FLOPs and memory analysis, then times
`--steps` steps on one cached in-memory batch (no input pipeline): the compute-only step time.

`flops`: compile only (nothing runs): FLOPs per train step and peak temporary memory from XLA's cost
and memory analysis, e.g. for the full Merlin recipe at batch 1. The text tower is the config's
(`--text-size base` replaces a pretrained folder by a BERT-base-shaped tower, e.g. Bio_ClinicalBERT).
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


def bench_pipeline(config, root: pathlib.Path, batches: int, workers: int) -> None:
    """Batches/s of the trainer's Grain source (0 and `workers` processes) on the data in `root`."""
    from vljax import train
    from vljax.data import pipeline
    from vljax.data.manifest import load_manifest

    config.data.dir = str(root)
    manifest = load_manifest(root)
    tokenizer = train.tokenizer_for(config)
    source = train.train_source(config, manifest, tokenizer)  # token ids; a locked tower's cache is start-up cost
    files = [r.image for r in source.loader.records]
    b = config.batch_size
    t_floor = _best_of(lambda: [gzip.decompress(pathlib.Path(f).read_bytes()) for f in files[:64]], 2) / min(64, len(files))
    print(f"\ninput pipeline: {config.data.sampling} sampling, global batch {b}, volume "
          f"{tuple(config.data.shape)}, {len(files)} training studies")
    print(f"{'what':52s} {'batches/s':>10s} {'studies/s':>10s} {'x floor time':>13s}")
    print(f"{'I/O floor: read + gunzip, 1 process':52s} {1 / (t_floor * b):10.2f} {1 / t_floor:10.1f} {1.0:13.2f}")
    for n in sorted({0, workers}):
        it = pipeline.make_iterator(source, workers=n, prefetch=config.data.prefetch)
        next(it)  # start-up (worker processes, first batch) is not throughput
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = (time.perf_counter() - t0) / batches
        name = f"Grain source, {n} worker{'s' if n != 1 else ''}" + (" (in-process)" if n == 0 else "")
        print(f"{name:52s} {1 / dt:10.2f} {b / dt:10.1f} {dt / (t_floor * b):13.2f}")
        del it


def _load_config(spec: str):
    """`path.py[:arg]` → the config module's get_config(arg), unlocked."""
    import importlib.util

    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _compiled_step(config, batch: int, text_size: str | None):
    """(compiled train step, abstract state, abstract batch) for `config` on one device."""
    import types

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from vljax import train

    config.batch_size = batch
    if text_size:
        config.model.text.update(init="scratch", size=text_size, trainable=True)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = NamedSharding(mesh, P())
    phen = 16 if config.model.phenotype_weight > 0 else 0
    fake_manifest = types.SimpleNamespace(phenotype_codes=tuple(f"code{i}" for i in range(phen)))
    model = train.abstract_model(train.model_spec(config, fake_manifest), config.seed)
    tx, schedule = train.make_optimizer(config)
    state = train.abstract_train_state(model, tx, config.seed, rep)
    x, y, z = config.data.shape
    data_sharding = NamedSharding(mesh, P("data"))
    vol_dtype = jnp.bfloat16 if config.data.dtype == "bfloat16" else jnp.float32
    b = {"image": jax.ShapeDtypeStruct((batch, z, x, y), vol_dtype, sharding=data_sharding)}
    L = config.data.max_text_len
    b["attention_mask"] = jax.ShapeDtypeStruct((batch, L), jnp.int32, sharding=data_sharding)
    if config.model.text.trainable:
        b["input_ids"] = jax.ShapeDtypeStruct((batch, L), jnp.int32, sharding=data_sharding)
    else:  # locked text tower: cached token states
        hidden = model.spec.text_config().hidden_size
        b["text_hidden"] = jax.ShapeDtypeStruct((batch, L, hidden), jnp.float16, sharding=data_sharding)
    if phen:
        b["phenotypes"] = jax.ShapeDtypeStruct((batch, phen), jnp.int8, sharding=data_sharding)
    step = jax.jit(train.make_train_step(model, tx, schedule, config, mesh), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    return compiled, state, b


def _report_analysis(compiled) -> None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    print(f"FLOPs per train step (XLA cost analysis): {cost.get('flops', float('nan')) / 1e12:.3f} TFLOP")
    print(f"memory (XLA): arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs "
          f"{mem.output_size_in_bytes / 2**20:.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")


def bench_step(config, batch: int, steps: int, text_size: str | None, run: bool) -> None:
    import resource

    import jax
    import jax.numpy as jnp

    compiled, state_abs, batch_abs = _compiled_step(config, batch, text_size)
    _report_analysis(compiled)
    if not run:
        return
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jax.device_put(jnp.zeros(s.shape, s.dtype), s.sharding), state_abs)
    state["bad_step"] = jax.device_put(jnp.full((), -1, jnp.int32), state_abs["bad_step"].sharding)
    # Real initial parameters are not needed for timing; small random values keep the math finite.
    state["params"] = jax.tree.map(lambda p: p + 0.01 * jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                                   state["params"])
    data = {}
    for k, s in batch_abs.items():
        if k == "image":
            v = rng.uniform(0, 1, s.shape).astype(np.float32)
        elif k == "text_hidden":
            v = rng.standard_normal(s.shape).astype(np.float16)
        elif k == "attention_mask":
            v = np.ones(s.shape, np.int32)
        else:
            v = rng.integers(0, 2, s.shape).astype(s.dtype)
        data[k] = jax.device_put(v.astype(s.dtype) if k == "image" else v, s.sharding)
    state, m = compiled(state, data)  # warm-up
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, data)
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"step time on a cached batch: {dt:.3f} s ({batch / dt:.1f} examples/s); peak RSS {rss:.0f} MiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["data", "step", "flops"])
    p.add_argument("--config", default=None, help="config spec for step/flops (path.py[:arg])")
    p.add_argument("--batch", type=int, default=None, help="batch size for step/flops")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--text-size", default=None, help="replace the text tower by a scratch BERT preset")
    p.add_argument("--num-studies", type=int, default=64)
    p.add_argument("--data-dir", help="an existing phantom/Merlin folder (default: generate one in a temp dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=24, help="data: batches timed per pipeline setting")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data: Grain worker processes")
    a = p.parse_args(argv)
    if a.what in ("step", "flops"):
        spec = a.config or ("configs/merlin.py:phantom" if a.what == "step" else "configs/merlin.py")
        config = _load_config(spec)
        batch = a.batch or (config.batch_size if a.what == "step" else 1)
        print(f"config {spec}, batch {batch}, volume {tuple(config.data.shape)} (x,y,z), "
              f"ResNet-{config.model.image.depth} width {config.model.image.width}")
        bench_step(config, batch, a.steps, a.text_size, run=a.what == "step")
        return 0
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
        config = _load_config(a.config or "configs/merlin.py:phantom,sampling=alternating")
        bench_pipeline(config, root, a.batches, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
