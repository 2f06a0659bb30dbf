"""The training state: everything a step updates and a checkpoint saves."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Parameters, BatchNorm statistics and optimizer state, plus the step counter.

    Unlike `flax.training.train_state.TrainState` it carries `batch_stats` and no `apply_fn`
    (the trainers call the model directly), and `step` is an int32 array so the whole state
    is a pytree of arrays that orbax saves and `jax.jit` can donate. `tx` is static: it is
    code, not data, and is never checkpointed.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, batch_stats: Any, tx: optax.GradientTransformation) -> TrainState:
        """A fresh state at step 0 with `tx`'s initial optimizer state."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            tx=tx,
        )

    def apply_gradients(self, grads: Any, new_batch_stats: Any) -> TrainState:
        """One optimizer update; the BatchNorm statistics from the forward pass replace the old."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=new_batch_stats,
            opt_state=opt_state,
        )
