"""Batches for the step: a device-resident training set, and padded batches for exact evaluation.

Small fixed-size datasets (Fashion-MNIST, CIFAR, STL-10) are copied to every device once as uint8;
each step only sends the batch's indices (a few hundred int32) and gathers the images on device, so
no image crosses the host per step. The order is a pure function of (seed, step): resuming at step
k gives exactly the batches an uninterrupted run would have seen.

Multi-process: every process must hold the same whole split (they all load it from the same source)
and call `.batch(step)` with the same step; each then gathers only its own devices' rows of the same
global array. Datasets too large to replicate stream instead (step_stream.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax.data.arrays import ImageArrays

DATA_AXIS = "data"


def _check_batch(global_batch: int, mesh: Mesh, name: str = "batch_size") -> None:
    num_devices = mesh.devices.size
    if global_batch <= 0 or global_batch % num_devices:
        raise ValueError(
            f"{name}={global_batch} must be a positive multiple of the device count "
            f"({num_devices} devices) so every device gets the same number of examples"
        )


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """One epoch's example order: a permutation fixed by (seed, epoch), the same on every host."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


class DeviceResidentData:
    """The whole split on every device; `.batch(step)` gathers that step's global batch there.

    Each epoch visits a fresh permutation of the examples; the last `N % global_batch` of the
    permutation are dropped, so every step has a full batch and each kept example is seen once per
    epoch. The batch is {'image': uint8 [B, H, W, C], 'label': int32 [B] (-1 if unlabelled),
    'index': int32 [B] (dataset positions)}, sharded over the mesh axis 'data'.
    """

    def __init__(self, arrays: ImageArrays, *, global_batch: int, seed: int, mesh: Mesh):
        _check_batch(global_batch, mesh)
        num_examples = len(arrays)
        if global_batch > num_examples:
            raise ValueError(
                f"batch_size={global_batch} exceeds the {num_examples} examples of the split"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.steps_per_epoch = num_examples // global_batch
        self.seed = seed
        self.mesh = mesh
        labels = arrays.labels if arrays.labels is not None else np.full(num_examples, -1)
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
        self._images = _to_global(np.ascontiguousarray(arrays.images), replicated)
        self._labels = _to_global(np.asarray(labels, np.int32), replicated)
        # Indices arrive sharded like the batch: each device gathers its own rows from its copy.
        self._index_sharding = sharded
        self._gather = jax.jit(_gather, out_shardings=sharded)
        self._cached_epoch, self._cached_order = -1, np.empty(0, np.int32)

    def indices(self, step: int) -> np.ndarray:
        """Dataset positions int32 [B] of the global batch at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._cached_epoch:
            self._cached_order = epoch_permutation(self.seed, epoch, self.num_examples)
            self._cached_epoch = epoch
        start = position * self.global_batch
        return self._cached_order[start : start + self.global_batch]

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The global batch of `step`, sharded over 'data' (gathered on device)."""
        index = _to_global(self.indices(step), self._index_sharding)
        return self._gather(self._images, self._labels, index)


def _gather(images, labels, index):
    return {"image": images[index], "label": labels[index], "index": index}


def eval_batches(
    arrays: ImageArrays, *, global_batch: int, mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
    """The whole split once, in order, as global batches sharded over 'data'.

    The last batch is padded with zero images (label 0) and 'mask' float32 [B] is 1 for real rows, 0
    for padding, so a masked mean counts every example exactly once. Every process must pass the
    same arrays (each builds the same global batch and keeps its own devices' rows).
    """
    _check_batch(global_batch, mesh, "eval_batch_size")
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    num_examples = len(arrays)
    labels = arrays.labels if arrays.labels is not None else np.full(num_examples, -1, np.int32)
    for start in range(0, num_examples, global_batch):
        stop = min(start + global_batch, num_examples)
        real = stop - start
        batch = {
            "image": _pad(arrays.images[start:stop], global_batch),
            "label": _pad(np.asarray(labels[start:stop], np.int32), global_batch),
            "mask": (np.arange(global_batch) < real).astype(np.float32),
        }
        yield {k: _to_global(v, sharding) for k, v in batch.items()}


def num_eval_batches(num_examples: int, global_batch: int) -> int:
    """How many batches eval_batches yields for a split of `num_examples`."""
    return math.ceil(num_examples / global_batch)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


def _to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full (an explicit transfer:
    the loop's steady state runs under jax.transfer_guard("disallow"))."""
    return jax.device_put(x, sharding)


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local host batches (e.g. from step_stream.StepStream) as global sharded arrays."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


__all__ = [
    "DeviceResidentData",
    "epoch_permutation",
    "eval_batches",
    "num_eval_batches",
    "to_global_batch",
]
