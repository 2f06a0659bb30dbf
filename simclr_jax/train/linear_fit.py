"""Offline linear classifiers on fixed features: the yardstick for learned representations.

The demo compares SimCLR features with raw pixels under the same classifier: multinomial logistic
regression on standardised inputs with a small L2 penalty, fit to convergence by full-batch L-BFGS
(optax), so the comparison measures the features and not the optimiser.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """Standardisation statistics and weights of a fitted multinomial logistic regression."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return x @ self.weights + self.bias

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.logits(features).argmax(-1) == labels))


def fit_linear_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    l2: float = 1e-4,
    max_steps: int = 500,
) -> LinearClassifier:
    """Fit softmax regression by L-BFGS; l2 is the penalty on the weights (mean loss + l2 * |W|^2)."""
    x = np.asarray(features, np.float32).reshape(len(features), -1)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = jnp.asarray((x - mean) / std)
    y = jnp.asarray(labels, jnp.int32)

    def loss(params):
        logits = x @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + l2 * jnp.sum(params["w"] ** 2)

    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def run(params):
        def body(carry, _):
            params, opt_state = carry
            value, grad = value_and_grad(params, state=opt_state)
            updates, opt_state = solver.update(
                grad, opt_state, params, value=value, grad=grad, value_fn=loss
            )
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(body, (params, solver.init(params)), None, max_steps)
        return params

    params = jax.device_get(run(params))
    return LinearClassifier(mean=mean, std=std, weights=params["w"], bias=params["b"])
