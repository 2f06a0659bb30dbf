"""Full-batch gradient descent on the logistic loss of the two-layer CNN.

Used for both supervised training from a small random initialisation and fine-tuning from pretrained
filters; the two differ only in the starting filters.

Why it runs in coefficient space: the gradient of the loss with respect to a filter is a weighted sum
of training patches, so ``W_t = W_0 + A_t @ patches`` at every step, with ``A_t`` of shape
``[2, m, n*P]``. Pre-activations on the training patches are ``W_0 patches^T + A_t K`` with the Gram
matrix ``K = patches patches^T``, and on test patches ``W_0 test^T + A_t (patches test^T)``. Each
step then costs ``O(m (nP)^2)`` instead of ``O(m nP d)``, independent of the dimension ``d``; this
is exactly gradient descent on ``W`` (a test checks it against plain GD), only cheaper.

The step size is ``lr * n``, i.e. gradient descent on the summed (not averaged) loss. Memorising one
example's noise then takes the same number of steps for every ``n``, so one step budget covers the
whole label grid; the race between signal and noise, which decides the outcome, does not depend on
the step size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from simclr_jax.theory import network


def _split_patches(pre: jax.Array, n: int) -> jax.Array:
    """``[2, m, n*P]`` pre-activations -> ``[n, 2, m, P]`` as ``network`` expects."""
    two, m, n_patches = pre.shape
    return pre.reshape(two, m, n, n_patches // n).transpose(2, 0, 1, 3)


def _scores(split: str, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """The logistic loss and the error; a diverged (non-finite) output counts as an error."""
    return {
        f"{split}_loss": network.logistic_loss_from_outputs(outputs, labels),
        f"{split}_error": jnp.mean(~(outputs * labels > 0)),
    }


@functools.partial(jax.jit, static_argnames=("q", "steps", "eval_every"))
def train(
    filters0: jax.Array,
    x: jax.Array,
    y: jax.Array,
    x_test: jax.Array,
    y_test: jax.Array,
    *,
    q: float,
    lr: float,
    steps: int,
    eval_every: int,
) -> dict[str, jax.Array]:
    """Run ``steps`` GD steps from ``filters0`` ``[2, m, d]`` on ``(x [n,P,d], y [n])``.

    Returns trajectories sampled after every ``eval_every`` steps (``train_loss``, ``train_error``,
    ``test_loss``, ``test_error``, each ``[steps // eval_every]``) and the final ``filters``.
    Pure and shape-static, so callers can ``jax.vmap`` and ``jax.jit`` it over seeds and SNRs.
    """
    if steps < 1 or eval_every < 1 or steps % eval_every:
        raise ValueError(
            f"steps ({steps}) and eval_every ({eval_every}) must be >= 1 with eval_every "
            "dividing steps"
        )
    n, n_test = x.shape[0], x_test.shape[0]
    dim = x.shape[-1]
    patches = x.reshape(-1, dim)
    test_patches = x_test.reshape(-1, dim)
    pre_train0 = filters0 @ patches.T
    pre_test0 = filters0 @ test_patches.T
    gram = patches @ patches.T
    cross_gram = patches @ test_patches.T
    step_size = lr * n

    def train_loss_of_pre(pre: jax.Array) -> jax.Array:
        outputs = network.output_from_preactivations(_split_patches(pre, n), q)
        return network.logistic_loss_from_outputs(outputs, y)

    grad_pre = jax.grad(train_loss_of_pre)

    def gd_step(_, coeffs: jax.Array) -> jax.Array:
        # dL/dW = (dL/dpre) @ patches, so a GD step on W moves the coefficients by -step * dL/dpre.
        return coeffs - step_size * grad_pre(pre_train0 + coeffs @ gram)

    def evaluate(coeffs: jax.Array) -> dict[str, jax.Array]:
        out = network.output_from_preactivations(_split_patches(pre_train0 + coeffs @ gram, n), q)
        out_test = network.output_from_preactivations(
            _split_patches(pre_test0 + coeffs @ cross_gram, n_test), q
        )
        return {**_scores("train", out, y), **_scores("test", out_test, y_test)}

    def chunk(coeffs: jax.Array, _) -> tuple[jax.Array, dict[str, jax.Array]]:
        coeffs = jax.lax.fori_loop(0, eval_every, gd_step, coeffs)
        return coeffs, evaluate(coeffs)

    coeffs0 = jnp.zeros(pre_train0.shape, pre_train0.dtype)
    coeffs, history = jax.lax.scan(chunk, coeffs0, None, length=steps // eval_every)
    history["filters"] = filters0 + coeffs @ patches
    return history
