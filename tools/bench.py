"""Benchmarks, printed as ratios against a baseline measured in the same run.

    python tools/bench.py data [--num-studies 64] [--data-dir DIR] [--realistic N] [--repeats 3] [--batches 24]
        [--workers N] [--config configs/merlin.py:phantom]
    python tools/bench.py step [--config configs/merlin.py:phantom] [--batch N] [--steps 10] [--peak-tflops T]
    python tools/bench.py flops [--config configs/merlin.py] [--batch 1] [--text-size base]
    python tools/bench.py fit [--config configs/merlin.py] [--memory-gib G] [--max-batch 4096]
    python tools/bench.py conv [--volumes 16x24x24,32x48x48] [--batch 8] [--repeats 10] [--no-per-kind]
    python tools/bench.py loss [--devices 8] [--per-device-batches 16,128,512] [--dim 512]
    python tools/bench.py mesh [--config configs/merlin.py] [--batch 1] [--devices 8] [--meshes 8x1,4x2,1x8]

`data` (tools/bench_data.py): CT input throughput (studies/s, MB/s) on the phantom (or `--realistic N`
synthetic 512x512x300 CTs) for two targets, the phantom training geometry and Merlin's full
224x224x160 at 1.5x1.5x3 mm: load + preprocess on the fly, the preprocessed-volume cache's build and
its reads (tools/preprocess.py), beside the I/O floors (gunzip the .nii.gz files; read the cache's
shard files), warm and cold. Then the training input pipeline itself (`--config`, default the phantom
recipe with alternating sampling): Grain batches per second with 0 workers (in the trainer's process)
and with N worker processes, on the fly and from the cache; compare with the train step time from
`step` to see whether input can bottleneck.

`step`, `flops`, `fit` (tools/bench_step.py): one device's train step of `--config`. `flops` compiles
it (nothing runs) and prints the analytic model FLOPs per step (`vljax/flops.py`: 3 x the forward's
convolutions and matrix products, padding included, remat recompute not counted) for the image tower,
the text side and the heads, the closed-form tower counts beside them, the FLOPs the step's jaxpr
issues (recompute included), XLA's cost analysis labelled as XLA's (not a FLOP count: GPU leaves out
cuDNN convolutions, CPU skips padding) and XLA's memory analysis, e.g. for the full Merlin recipe at
batch 1. `step` also times `--steps` steps on one cached in-memory batch (no input pipeline: the
compute-only step time) and prints achieved model TFLOP/s and MFU against the device's dense bf16 peak
(`--peak-tflops` otherwise; n/a on CPU). `fit`: the largest batch whose step fits in the device's
memory (`--memory-gib` where the backend reports none), compile only, doubling then bisecting. The
text tower is the config's (`--text-size base` replaces a pretrained folder by a BERT-base-shaped
tower, e.g. Bio_ClinicalBERT).

`conv`: native 3D convolutions against 2D convolutions over the depth taps (`vljax/models/conv.py`,
`config.model.image.conv`), interleaved in one process, per volume (D,H,W): every distinct conv of the
image tower (ResNet-`--depth`, width `--width`, float32, BatchNorm) alone, forward and forward+backward;
the tower's forward (train mode), gradient and AdamW step with all convs native, all depth taps, and
(unless `--no-per-kind`) depth taps for one conv kind only and for all kinds but one; then the whole
vljax train step of `--config` (default the phantom recipe) at that volume. Ratios are native time /
candidate time of the medians (> 1: the candidate is faster).

`mesh`: per-device memory (arguments, temporaries) of the config's whole train step on simulated
devices for each (data x fsdp) mesh, per-device batch `--batch` (tools/bench_mesh.py).

`loss`: per-device memory of the contrastive loss (forward + backward) on simulated devices, vljax's
all-gather loss against the naive replicated B x B computation (tools/bench_loss.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

def _load_config(spec: str):
    """`path.py[:arg]` → the config module's get_config(arg), unlocked."""
    import importlib.util

    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


# ---------------------------------------------------------------------------------------------------
# conv: native 3D convolutions against depth taps.


def _interleaved(fns: dict, repeats: int) -> dict[str, np.ndarray]:
    """Seconds per call of each zero-argument function, warmed up once, then run A,B,A,B,..."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(t) for name, t in times.items()}


def _fmt(t: np.ndarray) -> str:
    return f"{t.min() * 1e3:8.2f} {np.median(t) * 1e3:8.2f}"


def _ratio(base: np.ndarray, t: np.ndarray) -> str:
    return f"x{np.median(base) / np.median(t):5.2f}"


def _set_conv(model, impl_of_kind) -> None:
    """Point every nnx.Conv of `model` at `impl_of_kind(kind)`'s implementation (parameters untouched)."""
    from flax import nnx

    from vljax.models.conv import conv_function, conv_kind

    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Conv):
            m.conv_general_dilated = conv_function(impl_of_kind(conv_kind(m.kernel_size, m.strides)))


def _host_tower(depth: int, width: int):
    """ResNet3D (native convs) with He-normal kernels drawn on the host (no per-shape init compiles)."""
    import jax
    from flax import nnx

    from vljax.models.resnet3d import ResNet3D

    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: ResNet3D(depth, width=width, norm="batch", conv="native", rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[-2].key == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        return (np.ones if path[-2].key in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _tower_convs(model, x_shape) -> list[tuple[str, tuple, tuple, tuple, list, int]]:
    """The distinct convolutions the tower runs on a [B,D,H,W] input: (kind, x shape, kernel shape,
    strides, padding, how many times), in order, found by tracing with a recording conv."""
    import jax
    from flax import nnx
    from jax import lax

    from vljax.models.conv import conv_kind

    seen: dict[tuple, int] = {}

    def record(lhs, rhs, window_strides, padding, *args, **kwargs):
        key = (conv_kind(rhs.shape[:3], window_strides), tuple(lhs.shape), tuple(rhs.shape),
               tuple(window_strides), tuple(tuple(p) for p in padding))
        seen[key] = seen.get(key, 0) + 1
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)

    clone = nnx.clone(model)
    for _, m in nnx.iter_graph(clone):
        if isinstance(m, nnx.Conv):
            m.conv_general_dilated = record
    graphdef, state = nnx.split(clone)
    jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v, train=True), state,
                   jax.ShapeDtypeStruct(x_shape, np.float32))
    return [(k[0], k[1], k[2], k[3], [list(p) for p in k[4]], n) for k, n in seen.items()]


def _bench_single_convs(convs, repeats: int) -> None:
    import jax
    import jax.numpy as jnp

    from vljax.models.conv import conv_function

    rng = np.random.default_rng(0)
    print(f"  single convs: ms min / median over {repeats} interleaved runs; ratio = native / depth_taps"
          " (medians); fwd+bwd = value and gradient (kernel and input; the stem: kernel only)")
    print(f"    {'kind':12s} {'x':22s} {'n':>2s} | {'fwd native':>17s} {'fwd depth_taps':>17s} "
          f"{'ratio':>6s} | {'fwd+bwd native':>17s} {'fwd+bwd taps':>17s} {'ratio':>6s}")
    for kind, xs, ks, strides, padding, count in convs:
        x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
        k = jnp.asarray(rng.standard_normal(ks) * 0.1, jnp.float32)
        argnums = (1,) if xs[-1] == 1 else (0, 1)  # the 1-channel stem reads data: no input gradient
        fns = {}
        for impl in ("native", "depth_taps"):
            f = conv_function(impl)
            conv = lambda x, k, f=f: f(x, k, strides, padding,  # noqa: E731
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
            fwd = jax.jit(conv)
            both = jax.jit(jax.value_and_grad(lambda x, k, conv=conv: jnp.sum(conv(x, k) ** 2), argnums))
            fns[(impl, "fwd")] = lambda fwd=fwd: fwd(x, k)
            fns[(impl, "both")] = lambda both=both: both(x, k)
        t = _interleaved(fns, repeats)
        shape = "x".join(str(v) for v in xs)
        print(f"    {kind:12s} {shape:22s} {count:2d} | {_fmt(t['native', 'fwd'])} "
              f"{_fmt(t['depth_taps', 'fwd'])} "
              f"{_ratio(t['native', 'fwd'], t['depth_taps', 'fwd'])} | {_fmt(t['native', 'both'])} "
              f"{_fmt(t['depth_taps', 'both'])} {_ratio(t['native', 'both'], t['depth_taps', 'both'])}")


def _bench_tower(model, kinds: list[str], x_shape, repeats: int, per_kind: bool) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vljax.models.conv import resolve_conv

    backend = jax.default_backend()
    variants = {"native": lambda kind: "native", "depth_taps": lambda kind: "depth_taps",
                "auto": lambda kind: resolve_conv("auto", kind, backend)}
    if all(variants["auto"](k) == "depth_taps" for k in kinds):
        del variants["auto"]  # the same program as depth_taps
    if per_kind:
        for one in kinds:
            variants[f"only {one}"] = lambda kind, one=one: "depth_taps" if kind == one else "native"
        for one in kinds:
            variants[f"all but {one}"] = lambda kind, one=one: "native" if kind == one else "depth_taps"
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, x_shape), jnp.float32)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    fns = {}
    for name, impl_of_kind in variants.items():
        m = nnx.clone(model)
        _set_conv(m, impl_of_kind)
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p, r, v, graphdef=graphdef):
            m = nnx.merge(graphdef, p, r, copy=True)
            return jnp.mean(m(v, train=True) ** 2), nnx.state(m, nnx.Not(nnx.Param))

        def step(p, r, o, v, loss=loss):
            (value, r), grads = jax.value_and_grad(loss, has_aux=True)(p, r, v)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), r, o, value

        fwd = jax.jit(lambda p, r, v, graphdef=graphdef: nnx.merge(graphdef, p, r, copy=True)(v, train=True))
        grad = jax.jit(jax.grad(loss, has_aux=True))
        state = {"s": (params, rest, tx.init(params))}
        step = jax.jit(step, donate_argnums=(0, 1, 2))

        def run_step(step=step, state=state):
            p, r, o, value = step(*state["s"], x)
            state["s"] = (p, r, o)
            return value

        fns[(name, "fwd")] = lambda fwd=fwd, p=params, r=rest: fwd(p, r, x)
        fns[(name, "grad")] = lambda grad=grad, p=params, r=rest: grad(p, r, x)
        fns[(name, "step")] = run_step
    t0 = time.perf_counter()
    t = _interleaved(fns, repeats)
    print(f"  image tower alone ({len(variants)} variants x 3, compile + {repeats} interleaved runs: "
          f"{time.perf_counter() - t0:.0f} s); ms min / median; ratio = native / variant (medians)")
    print(f"    {'convs':22s} | {'forward':>17s} {'ratio':>6s} | {'gradient':>17s} {'ratio':>6s} | "
          f"{'AdamW step':>17s} {'ratio':>6s}")
    for name in variants:
        cells = [f"{_fmt(t[name, mode])} {_ratio(t['native', mode], t[name, mode])}"
                 for mode in ("fwd", "grad", "step")]
        print(f"    {name:22s} | " + " | ".join(cells))


def _bench_full_step(spec: str, batch: int, volume, repeats: int) -> None:
    """The whole vljax train step of `spec` at `volume` (D,H,W), conv native vs depth_taps."""
    import contextlib
    import io

    from bench_step import compiled_step, step_inputs  # tools/ is this script's directory

    compiled = {}
    for impl in ("native", "depth_taps"):
        config = _load_config(spec)
        d, h, w = volume
        config.data.shape = (h, w, d)  # x y z
        config.model.image.conv = impl
        with contextlib.redirect_stdout(io.StringIO()):
            step, state_abs, batch_abs = compiled_step(config, batch, None)
        state, data = step_inputs(state_abs, batch_abs)
        compiled[impl] = (step, {"s": state}, data)

    def runner(impl):
        step, holder, data = compiled[impl]

        def run():
            holder["s"], metrics = step(holder["s"], data)
            return holder["s"]["step"]

        return run

    t = _interleaved({impl: runner(impl) for impl in compiled}, repeats)
    print(f"  whole vljax train step ({spec}, image tower ResNet-{config.model.image.depth} width "
          f"{config.model.image.width}): ms min / median over {repeats} interleaved runs")
    print(f"    native {_fmt(t['native'])} | depth_taps {_fmt(t['depth_taps'])} "
          f"{_ratio(t['native'], t['depth_taps'])}")


def bench_conv(volumes, *, batch: int, depth: int, width: int, repeats: int, per_kind: bool,
               full_step: str | None) -> None:
    import jax

    from vljax.models.conv import resolve_conv

    backend = jax.default_backend()
    print(f"backend {backend}, {jax.devices()[0].device_kind}, {os.cpu_count()} cpu cores; "
          f"jax {jax.__version__}; ResNet-{depth} width {width}, BatchNorm, float32, batch {batch}")
    model = _host_tower(depth, width)
    for volume in volumes:
        x_shape = (batch, *volume)
        convs = _tower_convs(model, x_shape)
        kinds = list(dict.fromkeys(c[0] for c in convs))
        auto = {k: resolve_conv("auto", k, backend) for k in kinds}
        print(f"\nvolume D,H,W = {'x'.join(map(str, volume))}; conv kinds {kinds}; auto on {backend}: {auto}")
        _bench_single_convs(convs, repeats)
        _bench_tower(model, kinds, x_shape, repeats, per_kind)
        if full_step:
            _bench_full_step(full_step, batch, volume, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["data", "step", "flops", "fit", "conv", "loss", "mesh"])
    p.add_argument("--config", default=None, help="config spec for step/flops/fit (path.py[:arg])")
    p.add_argument("--batch", type=int, default=None, help="batch size for step/flops/conv")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="step: the device's peak for the MFU")
    p.add_argument("--memory-gib", type=float, default=None, help="fit: device memory (default: its bytes_limit)")
    p.add_argument("--max-batch", type=int, default=4096, help="fit: largest batch tried")
    p.add_argument("--accum-steps", type=int, default=None,
                   help="step/flops/fit: config.accum_steps (GradCache micro-batches; fit: batches of its multiples)")
    p.add_argument("--text-size", default=None, help="replace the text tower by a scratch BERT preset")
    p.add_argument("--num-studies", type=int, default=64)
    p.add_argument("--data-dir", help="an existing phantom/Merlin folder (default: generate one in a temp dir)")
    p.add_argument("--realistic", type=int, default=0, help="data: N synthetic 512x512x300 CTs (into --data-dir)")
    p.add_argument("--repeats", type=int, default=None, help="data: best of (3); conv: interleaved runs (10)")
    p.add_argument("--batches", type=int, default=24, help="data: batches timed per pipeline setting")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data: Grain worker processes")
    p.add_argument("--volumes", default="16x24x24,32x48x48", help="conv: model input sizes DxHxW")
    p.add_argument("--depth", type=int, default=18, help="conv: ResNet depth")
    p.add_argument("--width", type=int, default=16, help="conv: ResNet width")
    p.add_argument("--no-per-kind", action="store_true", help="conv: skip the one-kind-only tower variants")
    p.add_argument("--no-full-step", action="store_true", help="conv: skip the whole vljax train step")
    p.add_argument("--devices", type=int, default=8, help="loss, mesh: simulated devices")
    p.add_argument("--per-device-batches", default="16,128,512", help="loss: per-device batch sizes b")
    p.add_argument("--dim", type=int, default=512, help="loss: embedding width")
    p.add_argument("--meshes", default="8x1,4x2,1x8", help="mesh: (data)x(fsdp) shapes over --devices")
    a = p.parse_args(argv)
    if a.what == "mesh":
        from bench_mesh import bench_mesh

        meshes = [tuple(int(v) for v in m.split("x")) for m in a.meshes.split(",")]
        bench_mesh(_load_config(a.config or "configs/merlin.py"), meshes, a.batch or 1, a.devices, a.text_size)
        return 0
    if a.what == "loss":
        from bench_loss import bench_loss  # tools/ is this script's directory

        bench_loss(a.devices, [int(b) for b in a.per_device_batches.split(",")], a.dim)
        return 0
    if a.what == "conv":
        volumes = [tuple(int(v) for v in s.split("x")) for s in a.volumes.split(",")]
        bench_conv(volumes, batch=a.batch or 8, depth=a.depth, width=a.width,
                   repeats=a.repeats or 10, per_kind=not a.no_per_kind,
                   full_step=None if a.no_full_step else (a.config or "configs/merlin.py:phantom"))
        return 0
    if a.what in ("step", "flops", "fit"):
        from bench_step import bench_fit, bench_step

        spec = a.config or ("configs/merlin.py:phantom" if a.what == "step" else "configs/merlin.py")
        def load():
            c = _load_config(spec)
            if a.accum_steps:
                c.accum_steps = a.accum_steps
            return c

        config = load()
        batch = a.batch or (config.batch_size if a.what == "step" else config.get("accum_steps", 1))
        shape = (f"volume {tuple(config.data.shape)} (x,y,z)" if "shape" in config.data else
                 f"two {config.data.image_size}px views and two texts per study")
        print(f"config {spec}, {shape}, {config.model.image.name} depth {config.model.image.depth} "
              f"width {config.model.image.width}, {config.model.dtype}, remat {config.model.image.remat}, "
              f"accum_steps {config.get('accum_steps', 1)}"
              + ("" if a.what == "fit" else f", batch {batch}"))
        if a.what == "fit":
            bench_fit(load, a.text_size, a.memory_gib, a.max_batch)
        else:
            bench_step(config, batch, a.steps, a.text_size, run=a.what == "step", peak_tflops=a.peak_tflops)
        return 0
    from bench_data import main as bench_data  # tools/ is this script's directory

    return bench_data(_load_config(a.config or "configs/merlin.py:phantom,sampling=alternating"), a.data_dir,
                      a.num_studies, a.realistic, a.repeats or 3, a.batches, a.workers)


if __name__ == "__main__":
    sys.exit(main())
