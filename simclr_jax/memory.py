"""SimCLRv2's memory of negatives: an EMA (momentum) network whose projections fill a FIFO queue.

SimCLRv2 (Chen et al. 2020, section 2) borrows MoCo's memory: a moving average of the network embeds
images whose projections are kept as extra negatives for NT-Xent. The reference code never released
it, so where the paper is silent we follow MoCo (He et al. 2020). The semantics, precisely:

* Keys. The EMA copy of the whole model (backbone, projection head and the probe, so that its tree
  is `params`' tree) embeds view b of each image. One key per image, as in MoCo: the queue holds M
  distinct images, never the two views of one image, and the EMA forward costs half an online one.
  Keys are the L2-normalised 'projection' outputs in float32 under stop_gradient, gathered from
  every replica in replica order (the global batch order), so every replica pushes the same rows
  and holds the same queue, equal to one device's on the whole batch.
* EMA BatchNorm. Train mode, like MoCo's key encoder: batch statistics (over the global batch with
  global BN, which also removes the leak that MoCo's shuffled BN guards against), and its own moving
  averages, updated by its own forward pass and averaged over replicas like the online ones. They
  only matter to someone who evaluates the EMA network.
* Empty start. The queue starts with `count = 0` valid rows and fills slots 0, 1, ... in order, so
  the valid rows are exactly `arange(M) < count`; the others are masked out of the softmax
  (`losses.nt_xent(memory_mask=...)`), never negatives. Zero rows would not do: a zero vector has
  similarity 0 and still adds exp(0) to every denominator.
* Order inside a step: the loss uses the queue as it was before the step; the keys come from the EMA
  weights as they were before the step; after the optimizer update the EMA moves towards the new
  weights, ema = d * ema + (1 - d) * params; then the step's keys overwrite the oldest rows.
* The EMA starts as a copy of the initial weights (MoCo). The queue and the EMA weights are part of
  the train state (`MemoryTrainState.memory`), so checkpoints save and restore them exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from simclr_jax.losses import l2_normalize
from simclr_jax.train.state import TrainState


class MemoryState(flax.struct.PyTreeNode):
    """The EMA network's variables and the queue of its projections (all arrays, all saved)."""

    ema_params: Any
    ema_batch_stats: Any
    queue: jax.Array  # [M, D] float32, L2-normalised keys
    pointer: jax.Array  # int32 []: the slot the next key goes to (the oldest once full)
    count: jax.Array  # int32 []: valid rows, 0..M; they are rows 0..count-1

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def valid_mask(self) -> jax.Array:
        """[M] bool: True for rows that hold a key (the negatives the loss may use)."""
        return jnp.arange(self.size) < self.count


class MemoryTrainState(TrainState):
    """A TrainState that also carries the memory, so steps update it and checkpoints hold it."""

    memory: MemoryState


def check_config(memory_config: ml_collections.ConfigDict, *, global_batch: int) -> None:
    """Reject a memory config that cannot work, naming the field."""
    if memory_config.size < global_batch:
        raise ValueError(
            f"memory.size must be at least the global batch_size ({global_batch}), "
            f"got {memory_config.size}: each step pushes one key per image"
        )
    if not 0.0 <= memory_config.ema_decay <= 1.0:
        raise ValueError(f"memory.ema_decay must be in [0, 1], got {memory_config.ema_decay}")


def create(params: Any, batch_stats: Any, *, size: int, dim: int) -> MemoryState:
    """An empty queue of `size` keys of `dim` floats and an EMA equal to the given weights."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # own buffers: the state is donated
    return MemoryState(
        ema_params=copy(params),
        ema_batch_stats=copy(batch_stats),
        queue=jnp.zeros((size, dim), jnp.float32),
        pointer=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def attach(state: TrainState, memory: MemoryState) -> MemoryTrainState:
    """`state` with `memory` added."""
    fields = {name: getattr(state, name) for name in ("step", "params", "batch_stats", "opt_state")}
    return MemoryTrainState(**fields, tx=state.tx, memory=memory)


def attach_empty(
    state: TrainState,
    model: Any,
    memory_config: ml_collections.ConfigDict,
    *,
    image_size: int,
    channels: int,
    global_batch: int,
) -> MemoryTrainState:
    """`state` with an empty queue of projection-sized keys and an EMA copy of its weights."""
    check_config(memory_config, global_batch=global_batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    outputs = jax.eval_shape(functools.partial(model.apply, train=False), variables, dummy)
    bank = create(
        state.params,
        state.batch_stats,
        size=memory_config.size,
        dim=outputs["projection"].shape[-1],
    )
    return attach(state, bank)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """ema = decay * ema + (1 - decay) * params, leaf by leaf (optax's Polyak average)."""
    return optax.incremental_update(params, ema, step_size=1.0 - decay)


def enqueue(memory: MemoryState, keys: jax.Array) -> MemoryState:
    """Push keys [N, D] (N <= M) first-in-first-out: they overwrite the N oldest rows.

    Slots are written in a ring from `pointer`, wrapping at M, so any M works (not only
    multiples of N).
    """
    num_keys = keys.shape[0]
    if num_keys > memory.size:
        raise ValueError(f"cannot push {num_keys} keys into a memory of {memory.size}")
    slots = (memory.pointer + jnp.arange(num_keys)) % memory.size
    return memory.replace(
        queue=memory.queue.at[slots].set(keys.astype(memory.queue.dtype), unique_indices=True),
        pointer=(memory.pointer + num_keys) % memory.size,
        count=jnp.minimum(memory.count + num_keys, memory.size),
    )


def embed_keys(
    model: Any, memory: MemoryState, images: jax.Array, *, axis_name: str | None
) -> tuple[jax.Array, Any]:
    """The EMA network's keys for this replica's images, and its updated BN moving averages."""
    variables = {"params": memory.ema_params, "batch_stats": memory.ema_batch_stats}
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    keys = lax.stop_gradient(l2_normalize(out["projection"].astype(jnp.float32)))
    batch_stats = updates["batch_stats"]
    if axis_name is not None:
        batch_stats = lax.pmean(batch_stats, axis_name)
    return keys, batch_stats


def update(
    model: Any,
    memory: MemoryState,
    images: jax.Array,
    new_params: Any,
    *,
    decay: float,
    axis_name: str | None,
) -> MemoryState:
    """The memory after a step: keys from the old EMA, EMA moved to `new_params`, keys pushed.

    Per replica: `images` are this replica's key views; the keys of all replicas are gathered
    in replica order, so every replica pushes the same global batch of keys.
    """
    keys, ema_batch_stats = embed_keys(model, memory, images, axis_name=axis_name)
    return push(memory, keys, ema_batch_stats, new_params, decay=decay, axis_name=axis_name)


def push(
    memory: MemoryState,
    keys: jax.Array,
    ema_batch_stats: Any,
    new_params: Any,
    *,
    decay: float,
    axis_name: str | None,
) -> MemoryState:
    """`update`'s second half, for keys embedded beforehand (gradient accumulation embeds them
    chunk by chunk): this replica's keys gathered from every replica, the EMA moved, the keys
    pushed."""
    if axis_name is not None:
        keys = lax.all_gather(keys, axis_name, tiled=True)
    moved = memory.replace(
        ema_params=ema_update(memory.ema_params, new_params, decay),
        ema_batch_stats=ema_batch_stats,
    )
    return enqueue(moved, keys)
