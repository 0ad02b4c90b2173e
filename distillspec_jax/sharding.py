"""Device mesh, parameter partition rules, multi-host start-up and global batch assembly (design §6).

Every parameter declares logical axis names where it is created (`nnx.Param(..., axes=(...))` in
models/qwen3.py). `LOGICAL_RULES` maps those names to the mesh axes ('data', 'fsdp', 'tensor');
nothing else in the code base writes a PartitionSpec for a weight.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both; fsdp also splits weights

# Logical axis -> mesh axis. Embedding and MLP weights split their model dimension over fsdp
# (gathered per layer in the forward pass, ZeRO-3 style) and their wide dimension over tensor;
# attention splits heads over tensor. Norm weights and head_dim are small and stay replicated.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked layer dimension: the scan over layers walks it on every device
    # Routed experts [E, D, F]: the expert dimension takes fsdp's part (gathered per layer, as every other
    # weight is under ZeRO-3), the expert width tensor's; so D stays whole (design §6).
    "expert": "fsdp",
    "expert_embed": None,
    "expert_mlp": "tensor",
    "expert_logits": None,  # the router's [D, E] output dimension (small: replicated)
}


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes over `num_devices` devices; one size may be -1 (the rest)."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the rest), got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                f"{num_devices} is not a multiple of {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh sizes data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
            f"do not multiply to the device count {num_devices}; set one of them to -1 to take the rest"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices (of all hosts); one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(data: int, fsdp: int, tensor: int, num_devices: int) -> AbstractMesh:
    """The mesh's shape without devices: enough for shardings and per-device sizes (memory estimates)."""
    return AbstractMesh(mesh_sizes(data, fsdp, tensor, num_devices), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, name: str = "") -> PartitionSpec:
    """PartitionSpec of one parameter from its logical axes; a dimension the mesh does not divide is an error."""
    partition = []
    for axis, size in zip(axes, shape):
        mesh_axis = LOGICAL_RULES[axis] if axis is not None else None
        if mesh_axis is not None and mesh.shape[mesh_axis] > 1:
            if size % mesh.shape[mesh_axis]:
                raise ValueError(
                    f"parameter {name or axes}: dimension {axis!r} of size {size} does not divide over mesh axis "
                    f"{mesh_axis!r} of size {mesh.shape[mesh_axis]}; choose mesh sizes that divide it"
                )
            partition.append(mesh_axis)
        else:
            partition.append(None)
    return PartitionSpec(*partition)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every Variable of an (abstract or concrete) nnx state, from its `axes` metadata."""

    def one(path, var):
        axes = var.get_metadata().get("axes")
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        name = "/".join(str(p) for p in path)
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_params(state: nnx.State, mesh: Mesh) -> dict:
    """ShapeDtypeStructs of a model's parameters (`nnx.to_pure_dict` layout), each carrying its NamedSharding
    on `mesh`: what a checkpoint restore targets, and what an ahead-of-time compile takes instead of weights."""
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch: B split over ('data', 'fsdp'), other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(global_batch: int, mesh: Mesh, what: str = "global batch") -> None:
    """Raises before any compile when a batch cannot be split evenly over data x fsdp."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(
            f"{what} {global_batch} does not divide over data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} "
            f"= {shards} batch shards; use a multiple of {shards}"
        )


def global_batch(local_bt: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles the global [B, ...] array from this host's slice of rows (all hosts call this together).

    Each host passes its own contiguous slice of B / process_count rows, in process order; on one host
    the slice is the whole batch.
    """
    sharding = batch_sharding(mesh, local_bt.ndim)
    global_shape = (local_bt.shape[0] * jax.process_count(), *local_bt.shape[1:])
    check_batch_divides(global_shape[0], mesh)
    return jax.make_array_from_process_local_data(sharding, local_bt, global_shape)


def host_slice(global_rows: int) -> slice:
    """The rows of a global batch that this host loads and feeds to `global_batch`."""
    if global_rows % jax.process_count():
        raise ValueError(f"global batch {global_rows} does not divide over {jax.process_count()} hosts")
    per_host = global_rows // jax.process_count()
    return slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Starts jax.distributed when the launch environment asks for it; returns whether it did.

    mode 'off' never starts it; 'on' always does (jax auto-detects TPU pods, SLURM and Open MPI);
    'auto' starts it when the environment names a multi-process job: JAX_COORDINATOR_ADDRESS (with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID), a SLURM job of several tasks, or a multi-host TPU slice.
    Must run before anything touches the devices.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or jax.distributed.is_initialized():
        return False
    env = os.environ
    _ensure_cpu_collectives()
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif mode == "on" or int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
    else:
        return False
    logging.info("jax.distributed: process %d of %d, %d local devices of %d",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _ensure_cpu_collectives() -> None:
    """Cross-process collectives on CPU need an implementation (gloo); without one, a multi-process CPU
    run fails at its first all-reduce. jax 0.10 defaults to gloo; an explicit 'none' is overridden here,
    which changes nothing on GPU and TPU hosts (the setting only concerns the CPU client)."""
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def global_batch_dict(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """`global_batch` for every array of a batch dict (this host's rows of each)."""
    return {key: global_batch(np.asarray(value), mesh) for key, value in local.items()}


def barrier(name: str) -> None:
    """Waits until every process reaches this point (a no-op on one process): what process 0 wrote to the
    shared workdir before it is visible to all after it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_processes_agree(flag: bool) -> bool:
    """True when `flag` is True on every process (every process must call it); `flag` on one process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def from_process_0(flag: bool) -> bool:
    """Process 0's `flag` on every process (every process must call it): one decision for all hosts,
    e.g. from files that each host sees with its own timestamps."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def place(tree, shardings):
    """Puts a pytree of arrays onto matching shardings (possibly spanning several hosts).

    Every host must hold the same values (e.g. the same seed): each device receives its slice of the
    host copy. Arrays already carrying exactly these shardings are kept as they are; an equivalent but
    differently named sharding (a SingleDeviceSharding for a 1-device NamedSharding) is replaced, since
    jit caches on the sharding and would compile a step twice. An abstract array (a ShapeDtypeStruct, as in
    an ahead-of-time compile) becomes the same abstract array carrying the sharding.
    """

    def one(x, sharding):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """NumPy copies of a pytree of (possibly multi-host) arrays; every process must call it."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
