"""`python tools/bench.py loss`: per-device memory of the contrastive loss, forward and backward.

Compile only (nothing runs): XLA's memory analysis of the compiled per-device program gives the bytes
of its arguments and of its temporaries. Two computations of the same number, on N devices (default 8
simulated CPU devices) with per-device batch b, global batch B = N*b, embedding width D:
  all-gather   vljax's loss (`update.contrastive_loss_fn`: `shard_map`, each device all-gathers both
               towers' embeddings, scores its b rows against the B columns; memory O(B*D + b*B));
  naive        the embeddings replicated on every device and the whole B x B logits computed there
               (`losses.infonce`; memory O(B*D + B*B)).
The last line is the ratio naive / all-gather at the largest b.
"""

from __future__ import annotations

import os
import sys


def loss_memory(devices: int, batches: list[int], dim: int) -> list[dict]:
    """Per-device bytes (arguments, temporaries) of both computations, for each per-device batch b."""
    flag = f"--xla_force_host_platform_device_count={devices}"
    if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import jax.numpy as jnp

    from vljax import losses, sharding, update

    if jax.device_count() < devices:
        raise SystemExit(f"error: {jax.device_count()} devices, {devices} asked (set XLA_FLAGS={flag} "
                         "before anything imports JAX, or use --devices)")
    mesh = sharding.make_mesh(devices=jax.devices()[:devices])
    split, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def memory(fn, in_sharding, big: int) -> tuple[int, int]:
        emb = jax.ShapeDtypeStruct((big, dim), jnp.float32, sharding=in_sharding)
        scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
        m = step.lower(emb, emb, scale).compile().memory_analysis()
        return m.argument_size_in_bytes, m.temp_size_in_bytes

    rows = []
    for b in batches:
        ga, gt = memory(update.contrastive_loss_fn(mesh), split, b * devices)
        na, nt = memory(losses.infonce, replicated, b * devices)
        rows.append(dict(b=b, B=b * devices, gather_args=ga, gather_temps=gt, naive_args=na, naive_temps=nt))
    return rows


def bench_loss(devices: int, batches: list[int], dim: int) -> None:
    rows = loss_memory(devices, batches, dim)
    import jax

    mib = 2 ** 20
    print(f"contrastive loss, forward + backward, float32 embeddings of width {dim}, on {devices} devices "
          f"({jax.devices()[0].platform}); per-device MiB from XLA's memory analysis (compile only)")
    print(f"{'b':>6} {'B':>7} | {'all-gather args':>15} {'temps':>9} {'total':>9} | "
          f"{'naive args':>10} {'temps':>9} {'total':>9} | naive/all-gather")
    for r in rows:
        g, n = r["gather_args"] + r["gather_temps"], r["naive_args"] + r["naive_temps"]
        print(f"{r['b']:>6} {r['B']:>7} | {r['gather_args'] / mib:>15.2f} {r['gather_temps'] / mib:>9.2f} "
              f"{g / mib:>9.2f} | {r['naive_args'] / mib:>10.2f} {r['naive_temps'] / mib:>9.2f} {n / mib:>9.2f} | "
              f"{n / g:.1f}x")
    last = rows[-1]
    ratio = (last["naive_args"] + last["naive_temps"]) / (last["gather_args"] + last["gather_temps"])
    print(f"loss memory ratio at {devices} devices, b={last['b']}: {ratio:.1f}x")
