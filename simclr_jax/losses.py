"""Losses: NT-Xent with cross-replica negatives, supervised cross-entropy, distillation.

All losses compute in float32 whatever the input dtype (bf16 projections or logits are upcast
first), so mixed-precision training keeps an fp32 loss, as the design asks.

NT-Xent across replicas (`axis_name`, inside shard_map/pmap): the negatives are
`lax.all_gather`ed from every replica, labels are offset by `lax.axis_index(axis_name) * b`, and
the returned loss and metrics are global means (local mean, then `lax.pmean`), the same on every
replica and equal to the single-device values on the whole batch. Gradients flow back through the
gathered copies (all_gather's transpose is a reduce-scatter), so:
  * under `jax.shard_map(..., check_vma=True)`, `jax.grad` of the loss inside the mapped function
    is exactly the single-device gradient, for the local z and for replicated parameters alike
    (the latter already summed over replicas: do not pmean them again);
  * under `jax.pmap` or `shard_map(check_vma=False)`, a replicated parameter's gradient is exact
    after the usual `lax.pmean` of the per-replica gradients (the local z gradient itself is R
    times the single-device one, as for any loss under pmap).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

# Subtracted from a view's similarity with itself so that it is never its own positive or negative
# (the reference SimCLR masks the diagonal this way rather than removing the column).
LARGE_NUM = 1e9


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
    """x / max(||x||, sqrt(epsilon)): tf.math.l2_normalize's definition, finite gradient at zero."""
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(squared_norm, epsilon))


def _gather_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Rows of x from every replica in replica order ([b, D] -> [R*b, D]); x without an axis."""
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, tiled=True)


def _global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Mean over the global batch: local mean averaged over replicas (equal local batches)."""
    local_mean = jnp.mean(x)
    return local_mean if axis_name is None else lax.pmean(local_mean, axis_name)


def nt_xent(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    temperature: float,
    normalize: bool = True,
    axis_name: str | None = None,
    memory: jax.Array | None = None,
    memory_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLR's normalised-temperature cross-entropy (NT-Xent), as the reference
    `add_contrastive_loss` defines it (how it behaves across replicas: the module docstring).

    z_a, z_b: this replica's projections [b, D] of the two views of the same b images (row i of
    z_a and row i of z_b are the positive pair). Each of the 2N views of the global batch (N = R*b
    over the R replicas of `axis_name`) is scored against the 2N - 1 others, its own similarity
    masked out, and the loss is cross-entropy with the other view as the target:

        loss = mean_i [ CE(i; [a_i.all_b, a_i.all_a]) + CE(i; [b_i.all_a, b_i.all_b]) ]

    i.e. the sum of the two directions, averaged over the N images of the global batch (the
    reference's value and gradient scale). Dot products are divided by `temperature`; with
    `normalize` the projections are L2-normalised first (cosine similarity).

    memory: optional [M, D] extra negatives (SimCLRv2's queue), the same on every replica, never a
    positive, without gradient; L2-normalised here with `normalize` (idempotent). memory_mask:
    optional [M] bool, False for rows that are not negatives (a queue's unfilled slots): their
    logits get -LARGE_NUM and add exactly nothing to the softmax.

    Returns (loss, metrics): 'contrast_acc' is the fraction of z_a views whose most similar z_b
    view is their positive (argmax of the a->b logits), 'contrast_entropy' the mean entropy of
    softmax(a->b logits), both over the global batch, as the reference logs them.
    """
    _check_contrastive_inputs(z_a, z_b, temperature, memory, memory_mask)
    z_a = z_a.astype(jnp.float32)
    z_b = z_b.astype(jnp.float32)
    if normalize:
        z_a, z_b = l2_normalize(z_a), l2_normalize(z_b)
    scores = functools.partial(_scores, temperature=temperature)
    logits_a, logits_b, labels = _pair_logits(z_a, z_b, scores, axis_name)
    if memory is not None:
        negatives, unused = _memory_negatives(memory, memory_mask, normalize)
        logits_a.append(scores(z_a, negatives) - unused)
        logits_b.append(scores(z_b, negatives) - unused)

    ce = optax.softmax_cross_entropy_with_integer_labels
    loss_a = ce(jnp.concatenate(logits_a, axis=1), labels)
    loss_b = ce(jnp.concatenate(logits_b, axis=1), labels)
    loss = _global_mean(loss_a + loss_b, axis_name)
    return loss, _contrast_metrics(logits_a[0], labels, axis_name)


def _check_contrastive_inputs(z_a, z_b, temperature, memory, memory_mask) -> None:
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"nt_xent: z_a and z_b must both be [batch, dim] of equal shape; got {z_a.shape} and "
            f"{z_b.shape}"
        )
    if not temperature > 0:
        raise ValueError(f"nt_xent: temperature (loss.temperature) must be > 0; got {temperature}")
    if memory is not None and (memory.ndim != 2 or memory.shape[1] != z_a.shape[1]):
        raise ValueError(
            f"nt_xent: memory must be [M, {z_a.shape[1]}] (same dim as z); got {memory.shape}"
        )
    if memory_mask is not None and (memory is None or memory_mask.shape != memory.shape[:1]):
        raise ValueError(
            "nt_xent: memory_mask must be [M] for a memory of M rows; got "
            f"{getattr(memory_mask, 'shape', None)} with memory "
            f"{None if memory is None else memory.shape}"
        )


def _scores(q: jax.Array, keys: jax.Array, *, temperature: float) -> jax.Array:
    return jnp.matmul(q, keys.T, precision=lax.Precision.HIGHEST) / temperature


def _pair_logits(z_a, z_b, scores, axis_name):
    """([a->b, a->a], [b->a, b->b]) logits against every replica's views, and the labels (the
    other view's global row); a view's own similarity is masked with -LARGE_NUM."""
    local_batch = z_a.shape[0]
    all_a = _gather_rows(z_a, axis_name)
    all_b = _gather_rows(z_b, axis_name)
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * local_batch
    labels = offset + jnp.arange(local_batch)
    self_mask = jax.nn.one_hot(labels, all_a.shape[0], dtype=jnp.float32) * LARGE_NUM
    logits_ab = scores(z_a, all_b)
    logits_ba = scores(z_b, all_a)
    logits_aa = scores(z_a, all_a) - self_mask
    logits_bb = scores(z_b, all_b) - self_mask
    return [logits_ab, logits_aa], [logits_ba, logits_bb], labels


def _memory_negatives(memory, memory_mask, normalize: bool):
    """The queue as extra negatives (no gradient) and what masks its unused rows out."""
    negatives = lax.stop_gradient(memory.astype(jnp.float32))
    if normalize:
        negatives = l2_normalize(negatives)
    unused = 0.0
    if memory_mask is not None:
        unused = (1.0 - memory_mask.astype(jnp.float32)) * LARGE_NUM
    return negatives, unused


def _contrast_metrics(logits_ab, labels, axis_name) -> dict[str, jax.Array]:
    correct = jnp.argmax(logits_ab, axis=1) == labels
    log_probs = jax.nn.log_softmax(logits_ab, axis=1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=1)
    metrics = {
        "contrast_acc": _global_mean(correct.astype(jnp.float32), axis_name),
        "contrast_entropy": _global_mean(entropy, axis_name),
    }
    return jax.tree.map(lax.stop_gradient, metrics)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
    """Mean cross-entropy of integer `labels` [B] under `logits` [B, C], in float32.

    mask: optional [B] bool/0-1 weights (e.g. padding of the last eval batch, or the labelled
    subset); the mean is over the examples it keeps, and 0 when it keeps none.
    """
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    if mask is None:
        return jnp.mean(per_example)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float
) -> jax.Array:
    """SimCLRv2 distillation: -sum_y P_T(y|x; tau) log P_S(y|x; tau), mean over the batch.

    Both distributions are softmaxes at the same temperature tau; the teacher is a fixed target
    (stop_gradient). As in the SimCLRv2 paper (eq. 3), the loss is NOT multiplied by tau**2 (Hinton
    et al.'s correction that keeps gradient magnitudes comparable across temperatures); at the
    paper's usual tau = 1 the two agree. Scale the result yourself if you want Hinton's convention.
    """
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0; got {temperature}")
    teacher_probs = jax.nn.softmax(
        lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature, axis=-1
    )
    student_scaled = student_logits.astype(jnp.float32) / temperature
    return jnp.mean(optax.softmax_cross_entropy(student_scaled, teacher_probs))


def distillation_objective(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    alpha: float = 0.0,
    labeled_logits: jax.Array | None = None,
    labels: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of distillation: (1 - alpha) * distillation_loss + alpha * cross-entropy.

    The labelled cross-entropy is on `labeled_logits` (a separate labelled batch) when given.
    Metrics: 'distill_loss', 'teacher_agreement' (argmax match), 'labeled_loss', 'loss'.
    """
    distill = distillation_loss(student_logits, teacher_logits, temperature=temperature)
    agreement = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
    aux = {"distill_loss": distill, "teacher_agreement": jnp.mean(agreement)}
    loss = distill
    if labeled_logits is not None:
        labeled = softmax_cross_entropy(labeled_logits, labels)
        loss = (1.0 - alpha) * distill + alpha * labeled
        aux["labeled_loss"] = labeled
    aux["loss"] = loss
    return loss, aux
