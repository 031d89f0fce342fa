"""The device mesh and where every array lives on it (`config.mesh`).

The mesh has two axes, `data` and `fsdp`; their product is the device count (`-1`: the rest). The
batch is split over both (`BATCH`): every device gets `batch_size / devices` examples, and the
contrastive loss all-gathers the embeddings over both. Parameters and optimiser state are sharded
over `fsdp` (fully sharded data parallel): each array at least `config.mesh.fsdp_min_size` elements
large is split along its largest dimension that `fsdp` divides; smaller ones (biases, norms, scalars)
are replicated. Inside the jitted step XLA gathers each weight where it is used and reduce-scatters
its gradient (GSPMD), so per-device memory for the state is about 1/fsdp of the replicated one.

`data=-1, fsdp=1` (the default) is plain data parallelism with replicated state, as before `mesh`
existed. The rule depends only on shapes, so an optimiser moment gets its parameter's sharding, and
a checkpoint written on one mesh restores on another (orbax reads into the target shardings).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")   # the batch's leading axis is split over both mesh axes
DEFAULT_FSDP_MIN_SIZE = 2 ** 14


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes from `config.mesh` (None: all devices on `data`); -1 is "the rest"."""
    data = int(mesh_config.get("data", -1)) if mesh_config is not None else -1
    fsdp = int(mesh_config.get("fsdp", 1)) if mesh_config is not None else 1
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh.data and config.mesh.fsdp are both -1; give one of them a size")
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name}={size}: a positive size, or -1 for the rest of the devices")
    known = (data if data > 0 else 1) * (fsdp if fsdp > 0 else 1)
    if num_devices % known:
        raise ValueError(f"config.mesh data={data} x fsdp={fsdp} does not divide the {num_devices} devices; "
                         "make their product the device count (or set one of them to -1)")
    data = num_devices // known if data == -1 else data
    fsdp = num_devices // known if fsdp == -1 else fsdp
    if data * fsdp != num_devices:
        raise ValueError(f"config.mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are "
                         f"{num_devices}; make their product the device count (or set one of them to -1)")
    return data, fsdp


def make_mesh(mesh_config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp) mesh over `devices` (default: every device of every process). On TPU the
    device order follows the physical topology (`jax.make_mesh`), so `fsdp` neighbours are close."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    if devices == list(jax.devices()):  # GSPMD ("Auto") axes, as `Mesh` makes them
        mesh = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
        processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
        if _hosts_contiguous(processes, len(set(processes.flat))):
            return mesh
        # The topology order splits some host's devices across the batch (`check_host_rows`): order
        # them host by host instead, which every (data, fsdp) shape allows.
        devices = host_ordered(devices)
    return Mesh(np.array(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def host_ordered(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """`devices` process by process (each process's in their own order): every host's devices then
    hold one contiguous block of the batch, process 0's first."""
    return sorted(devices, key=lambda d: d.process_index)


def _hosts_contiguous(device_processes: np.ndarray, process_count: int) -> bool:
    order = np.asarray(device_processes).reshape(-1)
    return order.size % process_count == 0 and np.array_equal(
        order, np.repeat(np.arange(process_count), order.size // process_count))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch is cut into: one per device."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The batch's leading axis split over every device; a scalar replicated."""
    return NamedSharding(mesh, P(BATCH) if ndim else P())


def check_host_rows(device_processes: np.ndarray, process_count: int) -> None:
    """The input pipeline gives process p rows [p*b, (p+1)*b) of every global batch (b = B / processes,
    `pipeline.host_slice`); the batch sharding gives the mesh's devices consecutive blocks of rows in
    (data, fsdp) order. They agree only if, in that order, process p's devices come p-th and together.
    `device_processes` is `mesh.devices`' process indices. A mesh where they do not (an `fsdp` axis that
    interleaves hosts) would train on rows that no host loaded for those devices: refused here."""
    if not _hosts_contiguous(device_processes, process_count):
        order = np.asarray(device_processes).reshape(-1)
        raise ValueError(
            f"the mesh {tuple(np.shape(device_processes))} (data, fsdp) orders the devices of the {process_count} "
            f"processes as {order.tolist()}: each host must hold a contiguous block of the batch, process 0's "
            "first. Choose config.mesh.fsdp as a divisor of the devices per host (FSDP within each host, data "
            "parallel across hosts), or config.mesh.data=1 with fsdp over all devices; `make_mesh` orders them so.")


def check_mesh_hosts(mesh: Mesh) -> None:
    """`check_host_rows` for `mesh` (a no-op on one process)."""
    if jax.process_count() > 1:
        check_host_rows(np.vectorize(lambda d: d.process_index)(mesh.devices), jax.process_count())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """The rule: split the largest dimension that `fsdp` divides (the last of equal ones), for arrays
    of at least `min_size` elements; otherwise replicate."""
    if fsdp <= 1 or not shape or int(np.prod(shape)) < max(min_size, fsdp):
        return P()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return P(*([None] * axis), "fsdp")


def state_shardings(mesh: Mesh, tree: Any, min_size: int | None = None) -> Any:
    """A NamedSharding for every array (or ShapeDtypeStruct) of `tree`, by `fsdp_spec`."""
    min_size = DEFAULT_FSDP_MIN_SIZE if min_size is None else min_size
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)), tree)


def min_size(config) -> int:
    mesh_config = config.get("mesh")
    return int(mesh_config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)) if mesh_config is not None \
        else DEFAULT_FSDP_MIN_SIZE


def describe(mesh: Mesh, shardings: Any, tree: Any) -> str:
    """One line for the log: the mesh, and how much of the state is sharded."""
    total = sharded = 0
    for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(tree)):
        n = int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        total += n
        sharded += n if any(a is not None for a in s.spec) else 0
    per_device = total - sharded + sharded / mesh.shape["fsdp"]
    return (f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over {mesh.size} devices; state "
            f"{total / 2**20:.1f} MiB, {100 * sharded / max(total, 1):.0f} % of it sharded over fsdp: "
            f"{per_device / 2**20:.1f} MiB per device")
