"""Data parallelism: one mesh axis, per-replica steps mapped by `jax.shard_map` (default) or `jax.pmap`.

Train steps are written once, as pure per-replica functions with named-axis collectives on `'data'`
(`lax.pmean` for gradients, `lax.all_gather` for negatives, BatchNorm with `axis_name='data'`).
`DataParallel` maps them. Both backends use pmap's semantics for gradients (`check_vma=False` under
shard_map): the gradient a replica computes for replicated parameters is its own, and the step averages
them with `lax.pmean`. With `check_vma=True` shard_map would already sum them, and the pmean on top would
leave them N times too large (see DESIGN.md, "Trap to know").

Arrays cross the boundary as global `jax.Array`s: replicated trees (state) and batches sharded on their
leading axis. Under pmap the replicated trees carry a leading device axis instead; `replicate` and
`unreplicate` hide the difference from the trainers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
BACKENDS = ("shard_map", "pmap")
# The batches a training step splits into config.accumulation_chunks chunks.
ACCUMULATED_BATCHES = ("batch_size", "labeled_batch_size")


def use_cpu_devices(count: int | None = None) -> int:
    """Split the CPU into `count` JAX devices (default: one per core this process may use).

    Data parallelism across cores: each device computes its share of the batch and XLA:CPU runs
    the devices side by side, which keeps every core busy through the small, memory-bound ops
    that one multi-threaded device runs on one core. Numerics do not change (BatchNorm, NT-Xent
    and gradients are global either way). Affects only the CPU backend; must run before JAX
    initialises its backends (the first device query), as `python -m simclr_jax.demo` does.
    Returns the count.
    """
    count = count or len(os.sched_getaffinity(0))
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        raise RuntimeError(
            f"cannot split the CPU into {count} devices: JAX is already initialised in this "
            "process; call parallel.use_cpu_devices before any JAX operation"
        ) from None
    return int(count)


def waits_for_each_step(mesh: Mesh) -> bool:
    """Whether a loop on `mesh` must finish each step before dispatching the next work.

    XLA:CPU runs each device's part of a program as a task on one thread pool, about one thread
    per core, and a part blocks its thread while it waits in a collective for the other parts.
    Two programs with collectives in flight at once (the step, and the next batch's gather or
    an evaluation) can then hold every thread with parts that wait for parts that cannot start:
    with 2 devices on 2 cores the demo deadlocked until XLA aborted the process (40 s). Waiting
    for each step keeps one such program in flight; it costs only the host's dispatch time.
    """
    devices = list(mesh.devices.flat)
    return len(devices) > 1 and all(device.platform == "cpu" for device in devices)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh over all (global) devices, named 'data'."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(name: str, batch_size: int, mesh: Mesh) -> None:
    """Fail before compiling when a global batch cannot be split evenly over devices and processes."""
    if batch_size <= 0:
        raise ValueError(f"{name} must be positive, got {batch_size}")
    devices, processes = mesh.devices.size, jax.process_count()
    if batch_size % devices:
        raise ValueError(
            f"{name}={batch_size} does not divide over {devices} devices "
            f"({processes} process(es)); use a multiple of {devices}"
        )


def check_chunks(name: str, batch_size: int, chunks: int, mesh: Mesh) -> None:
    """Fail before compiling when gradient accumulation cannot split a device's batch evenly."""
    per_device = batch_size // mesh.devices.size
    if per_device % chunks:
        raise ValueError(
            f"accumulation_chunks={chunks} does not divide the per-device {name} ({batch_size} "
            f"over {mesh.devices.size} devices = {per_device}); use a divisor of {per_device}"
        )


def replica_mean(tree: Any) -> Any:
    """Inside a mapped step: the mean over replicas of every leaf (gradients, metrics, BN stats).

    The one place the steps average across replicas, so a test can remove it and watch the
    8-device comparison fail (tests/multidevice/compare_steps.py).
    """
    return jax.lax.pmean(tree, DATA_AXIS)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Maps per-replica functions over the mesh with the chosen backend."""

    mesh: Mesh
    backend: str = "shard_map"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def num_replicas(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def replicate(self, tree: Any) -> Any:
        """Place a tree (train state, dataset) on every device in the backend's layout."""
        if jax.process_count() > 1:
            tree = jax.tree.map(_host_copy_if_local, tree)
        if self.backend == "pmap":
            n = self.num_replicas
            stack = lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x))
            return jax.device_put(jax.tree.map(stack, tree), self.batch_sharding)
        return jax.device_put(tree, self.replicated_sharding)

    def unreplicate(self, tree: Any) -> Any:
        """One logical copy of a replicated tree (for checkpoints and evaluation)."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        return tree

    def map(
        self,
        fn: Callable,
        *,
        sharded_args: Sequence[bool],
        sharded_outputs: Any = False,
        donate_argnums: Sequence[int] = (),
    ) -> Callable:
        """Map a per-replica function.

        sharded_args[i] says whether argument i is a batch (split on its leading axis) or replicated;
        sharded_outputs is a pytree prefix of the outputs with the same meaning. Replicated outputs
        must really be equal on every replica (after a pmean); batch outputs come back as global
        arrays sharded on their leading axis.
        """
        if self.backend == "pmap":
            return self._map_pmap(fn, sharded_args, sharded_outputs, tuple(donate_argnums))
        spec = lambda sharded: P(DATA_AXIS) if sharded else P()
        in_specs = tuple(spec(s) for s in sharded_args)
        out_specs = jax.tree.map(spec, sharded_outputs)
        mapped = jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
        return jax.jit(mapped, donate_argnums=tuple(donate_argnums))

    def _map_pmap(self, fn, sharded_args, sharded_outputs, donate_argnums):
        devices = list(self.mesh.devices.flat)
        pmapped = jax.pmap(fn, axis_name=DATA_AXIS, devices=devices, donate_argnums=donate_argnums)
        n = len(devices)

        def split(x):  # [B, ...] global batch -> [devices, B / devices, ...]
            return jnp.reshape(x, (n, x.shape[0] // n) + x.shape[1:])

        def merge(x):  # [devices, b, ...] -> [devices * b, ...]
            return jnp.reshape(x, (n * x.shape[1],) + x.shape[2:])

        def call(*args):
            args = [
                jax.tree.map(split, a) if s else a for a, s in zip(args, sharded_args, strict=True)
            ]
            outs = pmapped(*args)
            return jax.tree.map(
                lambda s, o: jax.tree.map(merge if s else (lambda x: x), o),
                sharded_outputs,
                outs,
            )

        return call

    def first(self, tree: Any) -> Any:
        """Replicated outputs (metrics) as one copy, whatever the backend, without a host
        transfer (an index would be one): this process's first device's copy under pmap."""
        if self.backend == "pmap":
            return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)
        return tree


def from_config(config: Any, batch_fields: Sequence[str] = ("batch_size", "eval_batch_size")):
    """The run's DataParallel over all devices, after checking that its batches divide them."""
    mesh = make_mesh()
    for name in batch_fields:
        check_divisible(name, config[name], mesh)
    chunks = config.get("accumulation_chunks", 1)
    for name in (n for n in batch_fields if n in ACCUMULATED_BATCHES):
        check_chunks(name, config[name], chunks, mesh)
    return DataParallel(mesh, config.parallel.backend)


def _host_copy_if_local(x: Any) -> Any:
    """A host copy of an array on this process's devices (e.g. a restored train state).

    Multi-process, device_put cannot move an array committed to one local device onto other
    processes' devices, but it does spread host data that every process holds alike.
    """
    if isinstance(x, jax.Array) and x.is_fully_addressable and x.committed:
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(x)
    return x
