"""`python tools/bench.py mesh`: per-device memory of a config's whole train step on several meshes.

Compile only (nothing runs): the trainer's own jitted step (`update.jit_train_step`, state sharded by
`sharding.state_shardings` with the config's `fsdp_min_size`, batch split over every device) is lowered
for each (data, fsdp) mesh of N devices (default 8 simulated CPU devices) at a fixed per-device batch,
and XLA's memory analysis of the per-device program gives its arguments (the state's shard and the
batch's), outputs and temporaries. What FSDP buys is the argument column: the replicated parameters and
AdamW moments shrink by the fsdp size; the temporaries (activations) follow the per-device batch.

On CPU the figures are XLA:CPU's (its fusion and layouts differ from a GPU's or TPU's); the ratios
between meshes are what carries over. On a pod, run it with the real devices (`--devices` = their count).
"""

from __future__ import annotations

import os
import sys
import time


def _simulate_devices(devices: int) -> None:
    """`devices` CPU devices, if JAX is not imported yet (else its devices are what they are)."""
    flag = f"--xla_force_host_platform_device_count={devices}"
    if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def mesh_memory(config, meshes: list[tuple[int, int]], per_device_batch: int, devices: int,
                text_size: str | None = None, on_row=None) -> list[dict]:
    """[{data, fsdp, args, outputs, temps, compile_s}] in bytes per device, one per mesh (each also
    passed to `on_row` as soon as it is measured)."""
    _simulate_devices(devices)
    import types

    import jax
    import ml_collections

    from vljax import checkpointing, inputs, modeling, sharding, update

    if jax.device_count() < devices:
        raise SystemExit(f"error: {jax.device_count()} devices, {devices} asked (use --devices)")
    if text_size:
        config.model.text.update(init="scratch", size=text_size, trainable=True)
    config.batch_size = per_device_batch * devices
    phen = 16 if config.model.phenotype_weight > 0 else 0
    manifest = types.SimpleNamespace(phenotype_codes=tuple(f"code{i}" for i in range(phen)))
    rows = []
    for data, fsdp in meshes:
        config.mesh = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp,
                                                     fsdp_min_size=sharding.min_size(config)))
        mesh = modeling.make_mesh(config, devices=jax.devices()[:devices])
        model = modeling.abstract_model(modeling.model_spec(config, manifest, mesh), config.seed)
        tx, schedule = update.make_optimizer(config)
        state = checkpointing.abstract_train_state(model, tx, config.seed, mesh, sharding.min_size(config))
        shardings = jax.tree.map(lambda x: x.sharding, state)
        spec = inputs.batch_spec(config, num_phenotypes=phen, hidden_size=model.spec.text_config().hidden_size)
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
                 for k, (shape, dtype) in spec.items()}
        step = update.jit_train_step(model, tx, schedule, config, mesh, shardings)
        t0 = time.perf_counter()
        m = step.lower(state, batch).compile().memory_analysis()
        rows.append(dict(data=data, fsdp=fsdp, args=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                         temps=m.temp_size_in_bytes, compile_s=time.perf_counter() - t0))
        if on_row:
            on_row(rows[-1])
    return rows


def bench_mesh(config, meshes: list[tuple[int, int]], per_device_batch: int, devices: int,
               text_size: str | None = None) -> None:
    _simulate_devices(devices)
    import jax

    gib = 2 ** 30
    image = config.model.image
    print(f"train step of ResNet-{image.depth} width {image.width} (conv {image.conv}) at {tuple(config.data.shape)} "
          f"(x,y,z), {config.model.dtype}, remat {image.remat}, text {text_size or config.model.text.get('size')}; "
          f"per-device batch {per_device_batch}, global {per_device_batch * devices}, on {devices} "
          f"{jax.devices()[0].platform} devices; per-device GiB from XLA's memory analysis (compile only)")
    print(f"{'mesh (data x fsdp)':>18} | {'arguments':>9} {'outputs':>8} {'temps':>8} {'total':>8} | compile s",
          flush=True)

    def row(r):
        total = r["args"] + r["temps"]  # outputs alias the donated arguments
        print(f"{r['data']:>9} x {r['fsdp']:<6} | {r['args'] / gib:9.2f} {r['outputs'] / gib:8.2f} "
              f"{r['temps'] / gib:8.2f} {total / gib:8.2f} | {r['compile_s']:.0f}", flush=True)

    mesh_memory(config, meshes, per_device_batch, devices, text_size, on_row=row)
