"""The update rules of fine-tuning and distillation: frozen parts stay frozen, replicas agree.

Pretraining's step (pretrain.py) shares `averaged_update` too: one optimizer update from a loss
whose gradients, metrics and BatchNorm statistics are averaged over replicas first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax import accumulation, parallel
from simclr_jax.models import frozen_tree, keep_frozen_stats
from simclr_jax.optim import make_optimizer
from simclr_jax.train.state import TrainState


def fine_tune_state(
    model_config: Any, optim_config: Any, variables: Any, learning_rate
) -> TrainState:
    """A TrainState whose optimizer gives frozen parameters exactly zero updates (and no state).

    model_config: a fine-tuning model block (fine_tune_after_block, ft_proj_selector).
    """
    frozen = _frozen(model_config, variables["params"])
    tx = make_optimizer(
        optim_config, variables["params"], learning_rate=learning_rate, frozen=frozen
    )
    return TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def averaged_update(
    state: TrainState, loss_fn: Callable, model_config: Any = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Per replica: one optimizer update from `loss_fn(params) -> (loss, (metrics, batch_stats))`.

    Gradients, metrics and new BN statistics are averaged over replicas first
    (parallel.replica_mean). With a fine-tuning `model_config`, the statistics of frozen layers
    keep their old values bit for bit.
    """
    grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    return _apply_averaged(state, grads, aux, batch_stats, model_config)


def accumulated_update(
    state: TrainState, loss_fn: Callable, batch: Any, chunks: int, model_config: Any = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """averaged_update of `loss_fn(params, batch) -> (loss, (metrics, batch_stats))` with the
    batch (a tree of [n, ...] leaves) in `chunks` equal chunks, one chunk's activations at a time.

    Gradients, metrics and BN statistics are the means over the chunks: exact for a loss that is
    a mean over examples (cross-entropy, distillation), but BatchNorm in training mode normalises
    each chunk with its own statistics. chunks=1 is averaged_update on the whole batch.
    """
    if chunks == 1:
        return averaged_update(state, lambda params: loss_fn(params, batch), model_config)

    def one(chunk, after):  # after: accumulation.scan_sum's zero, added to the float inputs
        floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
        chunk = jax.tree.map(lambda x: x + after.astype(x.dtype) if floating(x) else x, chunk)
        grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params, chunk)
        return grads, aux, batch_stats

    total = accumulation.scan_sum(one, accumulation.split(batch, chunks))
    grads, aux, batch_stats = jax.tree.map(lambda x: x / chunks, total)
    return _apply_averaged(state, grads, aux, batch_stats, model_config)


def _apply_averaged(state, grads, aux, batch_stats, model_config):
    grads, aux, batch_stats = parallel.replica_mean((grads, aux, batch_stats))
    if model_config is not None:
        frozen = _frozen(model_config, state.batch_stats)
        batch_stats = keep_frozen_stats(frozen, state.batch_stats, batch_stats)
    return state.apply_gradients(grads, batch_stats), aux


def _frozen(model_config: Any, tree: Any) -> Any:
    return frozen_tree(
        tree,
        fine_tune_after_block=model_config.fine_tune_after_block,
        ft_proj_selector=model_config.ft_proj_selector,
        freeze_head_in_linear_eval=model_config.get("freeze_head_in_linear_eval", False),
    )
