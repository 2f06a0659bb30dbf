"""Contrastive-exact gradient accumulation (GradCache, Gao et al. 2021): SimCLR's large batch in
chunks that fit in memory, `config.accumulation_chunks = K > 1`.

NT-Xent is no sum over examples: each view's loss depends on every other view of the global batch,
its negatives. Averaging the losses of micro-batches (optax.MultiSteps) would train a small-batch
SimCLR. Here each replica's batch is split into K equal chunks of consecutive rows, and a step is:

1. Pass 1, without gradients: each chunk's two views through the network in turn (lax.scan),
   keeping only the projections z (and, with the memory, the EMA network's keys of view b).
2. NT-Xent on the whole global batch (z gathered over replicas, the queue's negatives, as in the
   one-pass step) and its gradient dL/dz.
3. Pass 2: each chunk's views again, from the same augmentation keys (every random choice is keyed
   by the example's global id), and its forward again; jax.vjp with the chunk's slice of dL/dz (and
   with 1 for the chunk's share of the online probe's loss, a mean over examples) gives its
   parameter gradients, summed over the chunks (scan_sum: a lax.scan; unrolled on the CPU).
4. The replica average and one optimizer update, as in the one-pass step; the memory enqueues the
   whole batch's keys once.

Memory holds about one chunk's activations plus z of the whole batch; the cost is a second forward
pass of every chunk.

BatchNorm in training mode normalises each chunk with its own statistics (over every replica's
chunk under global BN): "ghost batch norm" with the chunk's size. The step is exactly the one-pass
step of a network whose BN normalises each chunk separately: pass 2 recomputes pass 1's statistics
from the same inputs and weights. The moving averages (the EMA network's too) move once per step,
towards the mean over the chunks of their statistics: the one-pass step's decay per step. With
K = 1 the trainers take their one-pass step, unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from simclr_jax import losses, memory, parallel
from simclr_jax.data import views
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train.state import TrainState


def split(tree: Any, chunks: int) -> Any:
    """Leaves [n, ...] -> [chunks, n / chunks, ...]: chunk c holds rows c*n/chunks onwards."""
    return jax.tree.map(lambda x: x.reshape((chunks, x.shape[0] // chunks) + x.shape[1:]), tree)


def merge(x: jax.Array) -> jax.Array:
    """[chunks, m, ...] -> [chunks * m, ...], the rows back in their order."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


_UNROLLED: list[bool] = []  # set by unrolled_loops; empty: decided by the default backend


def loops_unrolled() -> bool:
    """Whether chunks whose gradients are taken run unrolled rather than in a lax.scan: on the
    CPU, where XLA computes a convolution's weight gradient inside a loop body tens of times slower
    (jax issue 12868; it keeps that convolution's raw layout there). Accelerators loop."""
    return _UNROLLED[-1] if _UNROLLED else jax.default_backend() == "cpu"


@contextlib.contextmanager
def unrolled_loops(unrolled: bool) -> Iterator[None]:
    """Steps traced inside take this choice whatever this process's backend: for a program
    compiled here for another platform (a TPU or GPU plan on a CPU host: unrolled=False)."""
    _UNROLLED.append(unrolled)
    try:
        yield
    finally:
        _UNROLLED.pop()


def scan_sum(fn: Callable, chunked: Any) -> Any:
    """sum over c of fn(chunk c, after), the chunks along `chunked`'s leading axis in turn, in
    chunk order: a lax.scan (one body to compile, one chunk's intermediates alive at a time), or
    unrolled on the CPU (loops_unrolled).

    `after` is a float32 zero for fn to add to its input images. Unrolled, it is 0 times an
    element of each leaf of the sum so far, a zero XLA cannot fold: chunk c's work then waits for
    all of chunk c-1's, and XLA:CPU's scheduler keeps one chunk's activations alive at a time
    rather than overlapping the chunks (an optimization barrier would not do: XLA:CPU removes
    barriers before it schedules). A NaN there spreads to the rest of the sum: the update is not
    finite either way. The cost: K copies of fn to compile."""
    if loops_unrolled():
        total, after = None, jnp.zeros((), jnp.float32)
        for c in range(jax.tree.leaves(chunked)[0].shape[0]):
            out = fn(jax.tree.map(lambda x, c=c: x[c], chunked), after)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
            firsts = [leaf.ravel()[0].astype(jnp.float32) for leaf in jax.tree.leaves(total)]
            after = 0.0 * sum(firsts)
        return total
    first = jax.tree.map(lambda x: x[0], chunked)
    zero = jnp.zeros((), jnp.float32)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first, zero))
    total, _ = lax.scan(
        lambda acc, chunk: (jax.tree.map(jnp.add, acc, fn(chunk, zero)), None), zeros, chunked
    )
    return total


def chunked_inputs(config: ml_collections.ConfigDict, step: jax.Array, batch: dict) -> dict:
    """This replica's batch in chunks [K, b/K, ...]: images, labels and global example ids; with
    probe.clean_every, the probe's clean rows of the whole batch (the one-pass step's rows),
    zero-padded to a multiple of K, with weight 1 for a real row and 0 for padding."""
    chunks = config.accumulation_chunks
    images, labels = batch["image"], batch["label"]
    _, ids = views.example_keys(config.seed, step, images.shape[0])
    inputs = split({"image": images, "label": labels, "id": ids}, chunks)
    if config.probe.clean_every > 0:
        probe_images, probe_labels = views.probe_inputs(config, images, labels)
        rows, pad = probe_labels.shape[0], -probe_labels.shape[0] % chunks
        padded = lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])  # noqa: E731
        probe = {"image": padded(probe_images), "label": padded(probe_labels),
                 "weight": padded(jnp.ones(rows, jnp.float32))}  # fmt: skip
        inputs["probe"] = split(probe, chunks)
    return inputs


def make_gradient_fn(model: Any, config: ml_collections.ConfigDict) -> Callable:
    """Per replica `gradients(state, batch) -> (grads, metrics, batch_stats, keys)`: the one-pass
    step's (pretrain.make_view_gradient_fn on the whole batch's views) in
    config.accumulation_chunks chunks (module docstring). keys: with the memory, (this replica's
    EMA keys [b, D], the EMA network's BN statistics); else None."""
    use_memory, clean_every = config.memory.enabled, config.probe.clean_every

    def gradients(state: TrainState, batch: dict[str, jax.Array]):
        inputs = chunked_inputs(config, state.step, batch)
        online = functools.partial(_online, model, config, state)
        z, batch_stats, keys = _first_pass(model, online, state, inputs, use_memory)
        queue = {}
        if use_memory:
            queue = dict(memory=state.memory.queue, memory_mask=state.memory.valid_mask())

        def contrastive(z):
            half = z.shape[1] // 2  # each chunk's z: its view a rows, then its view b rows
            z_a, z_b = merge(z[:, :half]), merge(z[:, half:])
            return losses.nt_xent(
                z_a, z_b, temperature=config.loss.temperature, axis_name=DATA_AXIS, **queue
            )

        (loss, aux), dz = jax.value_and_grad(contrastive, has_aux=True)(z)
        local_batch = batch["label"].shape[0]  # the probe's rows: the clean ones, or both views
        rows = -(-local_batch // clean_every) if clean_every > 0 else 2 * local_batch
        probe = functools.partial(_probe_share, model, state.batch_stats, rows)
        grads, probe_loss, probe_acc = _second_pass(online, probe, state.params, inputs, dz)
        aux = dict(aux, contrastive_loss=loss, probe_loss=probe_loss, probe_acc=probe_acc)
        grads, aux, batch_stats = parallel.replica_mean((grads, aux, batch_stats))
        aux["loss"] = aux["contrastive_loss"] + aux["probe_loss"]
        return grads, aux, batch_stats, keys

    return gradients


def make_train_step(model: Any, config: ml_collections.ConfigDict) -> Callable:
    """Per-replica step, pretrain.make_train_step's in chunks: gradients, one optimizer update,
    then (with the memory) the EMA and one push of the whole batch's keys."""
    gradients = make_gradient_fn(model, config)
    decay = config.memory.ema_decay

    def step(state: TrainState, batch: dict[str, jax.Array]):
        grads, aux, batch_stats, keys = gradients(state, batch)
        new_state = state.apply_gradients(grads, batch_stats)
        if keys is not None:
            new_memory = memory.push(
                state.memory, *keys, new_state.params, decay=decay, axis_name=DATA_AXIS
            )
            new_state = new_state.replace(memory=new_memory)
        return new_state, aux

    return step


def _online(model, config, state, params, chunk, after=0.0):
    """(outputs, new BN statistics, view b) of a chunk's two views in training mode; the views
    come from the chunk's example ids, so both passes see the same ones. after: scan_sum's zero."""
    view_a, view_b = views.contrastive_views(config, state.step, chunk["image"], chunk["id"])
    variables = {"params": params, "batch_stats": state.batch_stats}
    images = jnp.concatenate([view_a, view_b]) + after
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return out, updates.get("batch_stats", {}), view_b


def _probe_share(model, batch_stats, rows, params, chunk, out):
    """The chunk's shares of the online probe's loss and accuracy, means over the replica's
    `rows`: on the clean rows in inference mode (probe.clean_every), else on both views."""
    if "probe" in chunk:
        probe = chunk["probe"]
        variables = {"params": params, "batch_stats": batch_stats}
        logits = model.apply(variables, probe["image"], train=False)["logits"]
        labels, weight = probe["label"], probe["weight"]
    else:
        logits, labels = out["logits"], jnp.concatenate([chunk["label"], chunk["label"]])
        weight = jnp.ones(labels.shape, jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(ce * weight) / rows, jnp.sum(correct * weight) / rows


def _first_pass(model, online, state, inputs, use_memory):
    """Pass 1, chunk by chunk without gradients: z [K, 2b/K, D], the BN statistics (mean over the
    chunks) and, with the memory, (EMA keys [b, D], the EMA's BN statistics)."""

    def one(_, chunk):
        out, stats, view_b = online(state.params, chunk)
        ys = {"z": out["projection"], "stats": stats}
        if use_memory:
            ys["keys"], ys["ema_stats"] = memory.embed_keys(
                model, state.memory, view_b, axis_name=DATA_AXIS
            )
        return None, ys

    _, ys = lax.scan(one, None, inputs)
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)  # noqa: E731
    keys = (merge(ys["keys"]), mean(ys["ema_stats"])) if use_memory else None
    return ys["z"], mean(ys["stats"]), keys


def _second_pass(online, probe, params, inputs, dz):
    """Pass 2: each chunk's forward again and its vjp with the chunk's dL/dz (and 1 for its
    probe share); the parameter gradients, probe loss and accuracy summed over the chunks."""

    def one(chunk_and_dz, after):
        chunk, dz_chunk = chunk_and_dz

        def outputs(params):
            out, _, _ = online(params, chunk, after)
            probe_loss, probe_acc = probe(params, chunk, out)
            return (out["projection"], probe_loss), probe_acc

        (_, probe_loss), vjp_fn, probe_acc = jax.vjp(outputs, params, has_aux=True)
        (grads,) = vjp_fn((dz_chunk, jnp.ones_like(probe_loss)))
        return grads, probe_loss, probe_acc

    return scan_sum(one, (inputs, dz))
