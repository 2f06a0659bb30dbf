"""Evaluation that counts every example exactly once, and the kNN monitor on frozen features.

The reference SimCLR evaluates on whole batches only, so it drops the remainder of the eval set.
Here the last batch is padded and carries a mask (0 for padding); sums are masked and kept on
device until the end, so the result is exact and there is one host transfer per evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@jax.jit
def _add_masked_counts(
    totals: dict[str, jax.Array], logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """`totals` plus the correct top-1/top-5 predictions, summed loss and example count over
    the unmasked rows.

    Taking the running totals as an input chains the batches' programs; on several CPU devices
    `exact_evaluate` also waits for each batch (`_one_batch_at_a_time`).
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    weight = mask.astype(jnp.float32)
    counted = mask.astype(jnp.int32)
    _, top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "top1": totals["top1"] + jnp.sum((top5[:, 0] == labels) * counted),
        "top5": totals["top5"] + jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * counted),
        "loss": totals["loss"] + jnp.sum(loss * weight),
        "count": totals["count"] + jnp.sum(counted),
    }


def _one_batch_at_a_time() -> bool:
    """True on several CPU devices: there each batch's programs finish before the next batch's
    start. The batch is sharded, so each counting program holds a collective, and XLA:CPU's
    devices share one thread pool: a program queued behind another can hold the thread that the
    other's collective waits for, and the rendezvous aborts the process after 40 s. Chaining the
    programs through the totals made it rare, not impossible (a 2-core machine under load hit it
    in tests/test_scoring.py). Accelerators keep their queue full."""
    return jax.default_backend() == "cpu" and jax.device_count() > 1


_ZERO_COUNTS = {
    "top1": np.int32(0), "top5": np.int32(0), "loss": np.float32(0.0), "count": np.int32(0)
}  # fmt: skip


def exact_evaluate(
    predict_fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[Mapping[str, jax.Array]],
) -> dict[str, float | int]:
    """{'top1', 'top5', 'loss', 'count'} over every unmasked example of `batches`.

    `predict_fn(images)` returns logits [B, num_classes]; each batch is a dict with 'image',
    'label' and optionally 'mask' (1 = real example, 0 = padding; missing = all real). Arrays
    may be global arrays sharded over a mesh. top1/top5 are fractions, loss the mean
    cross-entropy, count the number of examples evaluated.
    """
    totals, in_order = None, _one_batch_at_a_time()
    for batch in batches:
        labels = batch["label"]
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(np.shape(labels), jnp.int32)
        logits = predict_fn(batch["image"])
        if in_order:
            jax.block_until_ready(logits)
        totals = _add_masked_counts(
            _ZERO_COUNTS if totals is None else totals, logits, labels, mask
        )
        if in_order:
            jax.block_until_ready(totals)
    if totals is None:
        raise ValueError("batches is empty: nothing to evaluate")
    totals = jax.device_get(totals)
    count = int(totals["count"])
    if count == 0:
        raise ValueError("every example is masked out: nothing to evaluate")
    return {
        "top1": int(totals["top1"]) / count,
        "top5": int(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
        "count": count,
    }


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "temperature", "chunk_size"))
def knn_scores(
    train_features: jax.Array,
    train_labels: jax.Array,
    query_features: jax.Array,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
) -> jax.Array:
    """Weighted kNN class votes [Q, num_classes] (the InstDisc / SimCLR kNN monitor).

    Features are L2-normalised; each query's k most cosine-similar training examples vote for
    their label with weight exp(similarity / temperature), scaled per query by
    exp(-best similarity / temperature) (same vote, no overflow). Queries go through in chunks
    of `chunk_size`, so memory is chunk_size x N rather than Q x N.
    """
    train = _l2_normalize(train_features)
    queries = _l2_normalize(query_features)
    k = min(k, train.shape[0])
    num_queries = queries.shape[0]
    chunk_size = min(chunk_size, num_queries)
    padded = -num_queries % chunk_size
    queries = jnp.pad(queries, ((0, padded), (0, 0)))
    chunks = queries.reshape(-1, chunk_size, queries.shape[-1])

    def chunk_votes(chunk: jax.Array) -> jax.Array:
        similarity = jnp.dot(chunk, train.T, precision=jax.lax.Precision.HIGHEST)
        # The barrier keeps XLA:CPU from fusing top_k into the exp below, which made a chunk
        # of queries against the whole bank many times slower (benchmarks/RESULTS.md).
        top_similarity, top_index = jax.lax.optimization_barrier(jax.lax.top_k(similarity, k))
        # Shifting by the best similarity scales a query's votes by one factor (same vote) and
        # keeps exp() finite at small temperatures.
        weights = jnp.exp((top_similarity - top_similarity[:, :1]) / temperature)
        neighbour_labels = jax.nn.one_hot(train_labels[top_index], num_classes)
        return jnp.einsum("qk,qkc->qc", weights, neighbour_labels)

    votes = jax.lax.map(chunk_votes, chunks)
    return votes.reshape(-1, num_classes)[:num_queries]


def knn_classify(
    train_features: jax.Array,
    train_labels: jax.Array,
    query_features: jax.Array,
    *,
    num_classes: int,
    **vote: Any,
) -> jax.Array:
    """Predicted labels int32 [Q] from the weighted kNN vote; `vote`: knn_scores' k,
    temperature and chunk_size."""
    _check_knn_args(
        train_features, train_labels, query_features, vote.get("k", 200),
        vote.get("temperature", 0.1),
    )  # fmt: skip
    scores = knn_scores(
        train_features, train_labels, query_features, num_classes=num_classes, **vote
    )
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def knn_evaluate(
    train_features: jax.Array,
    train_labels: jax.Array,
    query_features: jax.Array,
    query_labels: jax.Array,
    *,
    num_classes: int,
    **vote: Any,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier on the queries (`vote` as knn_classify)."""
    predicted = knn_classify(
        train_features, train_labels, query_features, num_classes=num_classes, **vote
    )
    return float(np.mean(np.asarray(predicted) == np.asarray(query_labels)))


def _l2_normalize(features: jax.Array) -> jax.Array:
    features = features.astype(jnp.float32)
    norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
    return features / jnp.maximum(norm, 1e-12)


def _check_knn_args(train_features, train_labels, query_features, k, temperature) -> None:
    if np.ndim(train_features) != 2 or np.ndim(query_features) != 2:
        raise ValueError(
            "train_features and query_features must be [N, D] and [Q, D], got shapes "
            f"{np.shape(train_features)} and {np.shape(query_features)}"
        )
    if np.shape(train_features)[1] != np.shape(query_features)[1]:
        raise ValueError("train_features and query_features must have the same feature size")
    if np.shape(train_labels) != np.shape(train_features)[:1]:
        raise ValueError(
            f"train_labels must be [N]={np.shape(train_features)[:1]}, got {np.shape(train_labels)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
