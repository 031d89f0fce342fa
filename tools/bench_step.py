"""`python tools/bench.py step|flops|fit`: one device's train step of a config, its FLOPs and memory.

`flops` compiles the config's train step (nothing runs) and prints its model FLOPs from the analytic
count (`vljax/flops.py`: 3 x the forward's convolutions and matrix products, padding included, remat
recompute not counted) per part (image tower, text side, heads and loss), the closed-form tower
counts beside them, the FLOPs the step's own jaxpr issues (remat recompute included) and XLA's cost
analysis labelled as XLA's, then XLA's memory analysis. `step` does the same, then times steps on one
cached in-memory batch (no input pipeline) and prints the achieved model TFLOP/s and the MFU against
the device's dense bf16 peak (`flops.PEAK_TFLOPS`, or `--peak-tflops`; n/a on a CPU). `fit` finds the
largest batch whose step fits in the device's memory (compile only: XLA's arguments + temporaries +
outputs not aliased to donated arguments, against `memory_stats()['bytes_limit']` or `--memory-gib`),
doubling the batch, then bisecting.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np


def _traced_step(config, batch: int, text_size: str | None):
    """(traced train step, abstract model, abstract state, abstract batch) for `config` on one device."""
    import types

    import jax

    from vljax import checkpointing, cxr, inputs, modeling, sharding, update

    config.batch_size = batch
    if text_size:
        config.model.text.update(init="scratch", size=text_size, trainable=True)
    mesh = modeling.make_mesh(devices=jax.devices()[:1])
    rep = sharding.replicated(mesh)
    phen = 16 if config.model.phenotype_weight > 0 else 0
    fake_manifest = types.SimpleNamespace(phenotype_codes=tuple(f"code{i}" for i in range(phen)))
    model = modeling.abstract_model(modeling.model_spec(config, fake_manifest), config.seed)
    tx, schedule = update.make_optimizer(config)
    state = checkpointing.abstract_train_state(model, tx, config.seed, rep)
    data_sharding = sharding.batch_sharding(mesh)
    hidden = model.spec.text_config().hidden_size
    if cxr.is_cxr(config):  # two views and two texts per study, CXR-CLIP's loss
        spec = cxr.batch_spec(config, hidden_size=hidden)
        step_fn = update.make_train_step(model, tx, schedule, config, mesh, grad_fn=cxr.make_grad_fn(model, config, mesh),
                                         metrics=cxr.CXRTrainMetrics)
    else:
        spec = inputs.batch_spec(config, num_phenotypes=phen, hidden_size=hidden)
        step_fn = update.make_train_step(model, tx, schedule, config, mesh)
    b = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharding) for k, (shape, dtype) in spec.items()}
    step = jax.jit(step_fn, donate_argnums=0)
    return step.trace(state, b), model, state, b


def compiled_step(config, batch: int, text_size: str | None):
    """(compiled train step, abstract state, abstract batch) for `config` on one device."""
    traced, _, state, b = _traced_step(config, batch, text_size)
    t0 = time.perf_counter()
    compiled = traced.lower().compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    return compiled, state, b


def step_inputs(state_abs, batch_abs):
    """A train state of small random parameters and one random batch, placed as the abstract ones."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jax.device_put(jnp.zeros(s.shape, s.dtype), s.sharding), state_abs)
    state["bad_step"] = jax.device_put(jnp.full((), -1, jnp.int32), state_abs["bad_step"].sharding)
    # Real initial parameters are not needed for timing; small random values keep the math finite.
    state["params"] = jax.tree.map(lambda p: p + 0.01 * jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                                   state["params"])
    data = {}
    for k, s in batch_abs.items():
        if k.startswith("image"):
            v = rng.uniform(0, 1, s.shape).astype(np.float32)
        elif k.startswith(("text_hidden", "text_pooled")):
            v = rng.standard_normal(s.shape).astype(s.dtype)
        elif k.startswith("attention_mask"):
            v = np.ones(s.shape, np.int32)
        else:
            v = rng.integers(0, 2, s.shape).astype(s.dtype)
        data[k] = jax.device_put(v.astype(s.dtype) if k.startswith("image") else v, s.sharding)
    return state, data


def _tf(flops: float) -> str:
    """TFLOP (or GFLOP below 0.1 TF)."""
    return f"{flops / 1e12:.4f} TF" if flops >= 1e11 else f"{flops / 1e9:.4f} GF"


def model_flops(model, batch_abs, config) -> dict[str, int]:
    """Analytic forward FLOPs per part of one batch, printed with the closed-form tower counts."""
    from flax import nnx

    from vljax import flops

    m = nnx.merge(model.graphdef, model.abstract_params, model.abstract_rest)
    fwd = flops.two_tower_forward_flops(m, batch_abs)
    b, (d, h, w) = batch_abs["image"].shape[0], batch_abs["image"].shape[1:4]
    img = config.model.image
    closed_img = b * flops.resnet3d_forward_flops(img.depth, img.width, (d, h, w))
    print("model FLOPs per train step (analytic, vljax/flops.py: convolutions and matrix products, padding "
          "included; train step = 3 x forward; remat recompute not counted)")
    print(f"  {'part':40s} {'forward':>12s} {'train step':>12s}")
    names = {"image": f"image tower ResNet-{img.depth} w{img.width} x{b}",
             "text": "text side" + (" (tower)" if "input_ids" in batch_abs else
                                    " (locked tower: pooling only)" if "text_hidden" in batch_abs else
                                    " (locked tower: cached features)"),
             "heads": "projections, heads, InfoNCE logits"}
    for k, v in fwd.items():
        print(f"  {names[k]:40s} {_tf(v):>12s} {_tf(3 * v):>12s}")
    total = sum(fwd.values())
    print(f"  {'total':40s} {_tf(total):>12s} {_tf(3 * total):>12s}")
    agree = lambda a, c: "agrees" if a == c else f"DIFFERS ({a / c:.4f})"  # noqa: E731
    print(f"  closed form, image tower: {_tf(closed_img)} ({_tf(closed_img / b)} per {d}x{h}x{w} volume, "
          f"one input channel): {agree(fwd['image'], closed_img)}")
    if "input_ids" in batch_abs:
        text_cfg = m.text_tower.config
        seq = batch_abs["input_ids"].shape[1]
        closed_txt = b * flops.bert_forward_flops(text_cfg, seq)
        print(f"  closed form, text tower (BERT {text_cfg.num_hidden_layers} layers, hidden "
              f"{text_cfg.hidden_size}, {seq} tokens): {_tf(closed_txt)}: {agree(fwd['text'], closed_txt)}")
    return fwd


def bench_step(config, batch: int, steps: int, text_size: str | None, run: bool,
               peak_tflops: float | None = None) -> None:
    import jax

    from vljax import flops

    traced, model, state_abs, batch_abs = _traced_step(config, batch, text_size)
    program = flops.jaxpr_flops(traced.jaxpr)
    if "image" in batch_abs:
        fwd = model_flops(model, batch_abs, config)
        train_flops = 3 * sum(fwd.values())
    else:  # CXR-CLIP (no remat in its recipe): the step's own convolutions and matrix products
        train_flops = program
        print(f"CXR-CLIP: model FLOPs per step = the step's jaxpr (both views through the image tower, "
              f"both texts through the text path, no remat): {_tf(program)}")
    print(f"program FLOPs per step (the step's jaxpr walked: what it issues, remat recompute included, no "
          f"gradient of the input volume; CPU depth-tap convs skip padding-only taps): {_tf(program)} "
          f"({program / train_flops:.3f} x model)")
    t0 = time.perf_counter()
    compiled = traced.lower().compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"XLA's cost analysis: {_tf(cost.get('flops', float('nan')))} (not a FLOP count: on GPU it "
          f"leaves out convolutions run as cuDNN custom calls; on CPU it counts conv multiply-adds on real "
          f"input only, not on padding, and adds elementwise ops)")
    mem = compiled.memory_analysis()
    print(f"memory (XLA): arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs "
          f"{mem.output_size_in_bytes / 2**20:.1f} MiB ({mem.alias_size_in_bytes / 2**20:.1f} aliased), "
          f"temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")
    if not run:
        return
    state, data = step_inputs(state_abs, batch_abs)
    state, _ = compiled(state, data)  # warm-up
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = compiled(state, data)
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"step time on a cached batch: {dt:.4f} s ({batch / dt:.1f} examples/s); peak RSS {rss:.0f} MiB")
    kind = jax.devices()[0].device_kind
    peak = peak_tflops or flops.peak_tflops(kind)
    util = flops.mfu(train_flops, dt, peak)
    print(f"achieved: {flops.achieved_tflops(train_flops, dt):.4g} model TFLOP/s; MFU "
          + (f"{100 * util:.1f} % of {peak:g} TFLOP/s ({'--peak-tflops' if peak_tflops else 'dense bf16'}, "
             f"{kind}, compute dtype {config.model.dtype})" if util is not None else
             f"n/a (no peak known for device kind {kind!r}; pass --peak-tflops)"))


def step_memory(config, batch: int, text_size: str | None) -> tuple[int, dict]:
    """Bytes the train step at `batch` needs on its device (arguments + temporaries + outputs not
    aliased to donated arguments), with XLA's figures and the compile time."""
    traced, *_ = _traced_step(config, batch, text_size)
    t0 = time.perf_counter()
    m = traced.lower().compile().memory_analysis()
    parts = dict(args=m.argument_size_in_bytes, temps=m.temp_size_in_bytes,
                 outputs=m.output_size_in_bytes - m.alias_size_in_bytes, compile_s=time.perf_counter() - t0)
    return parts["args"] + parts["temps"] + parts["outputs"], parts


def device_memory_bytes() -> int | None:
    """The allocator's limit of the first device (None where the backend does not say, e.g. CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def bench_fit(load_config: Callable, text_size: str | None, memory_gib: float | None,
              max_batch: int = 4096) -> int:
    """The largest batch whose train step fits (0 if not even 1); prints every probe. With
    `accum_steps` k in the config, the batches tried are multiples of k (k micro-batches)."""
    import jax

    k = int(load_config().get("accum_steps", 1))

    limit = int(memory_gib * 2**30) if memory_gib else device_memory_bytes()
    if not limit:
        raise SystemExit(f"error: {jax.devices()[0].device_kind} reports no memory limit: pass --memory-gib")
    gib = 2**30
    print(f"device {jax.devices()[0].device_kind}: {limit / gib:.2f} GiB "
          f"({'--memory-gib' if memory_gib else 'memory_stats bytes_limit'}); compile only")
    print(f"{'batch':>6} | {'arguments':>9} {'temps':>8} {'outputs':>8} {'total':>8} | fits | compile s",
          flush=True)

    def fits(m: int) -> bool:
        b = k * m
        try:
            total, p = step_memory(load_config(), b, text_size)
        except Exception as e:  # noqa: BLE001  a compiler that refuses for lack of memory does not fit
            print(f"{b:>6} | compile failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            return False
        ok = total <= limit
        print(f"{b:>6} | {p['args'] / gib:9.3f} {p['temps'] / gib:8.3f} {p['outputs'] / gib:8.3f} "
              f"{total / gib:8.3f} | {'yes' if ok else 'no':4s} | {p['compile_s']:.0f}", flush=True)
        return ok

    best, capped = largest_batch(fits, max_batch // k)
    best *= k
    print(f"largest batch that fits: {best or f'none (batch {k} does not)'}"
          + (" (the --max-batch cap)" if capped else ""))
    return best


def largest_batch(fits: Callable[[int], bool], max_batch: int) -> tuple[int, bool]:
    """(largest b <= max_batch with fits(b), whether max_batch itself fits), fits assumed monotone:
    1, 2, 4, ... until one does not fit, then bisection between the last two. 0 if 1 does not fit."""
    if not fits(1):
        return 0, False
    lo, hi = 1, None  # lo fits, hi (once found) does not
    while hi is None and lo < max_batch:
        b = min(2 * lo, max_batch)
        lo, hi = (b, None) if fits(b) else (lo, b)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi is None
