"""Offline linear classifiers on fixed features: the yardstick for learned representations.

The demo compares SimCLR features with raw pixels under the same classifier: multinomial logistic
regression on standardised inputs with an L2 penalty, fit to convergence by full-batch L-BFGS
(optax), so the comparison measures the features and not the optimiser. The penalty is chosen the
same way for every input (`fit_with_validation`): by accuracy on held-out labelled examples, never
on the test set, so neither side gets a better-tuned classifier than the other.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax.train.task_progress import TaskProgress


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

    def as_dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel, bias) of the same logits on raw features: the standardisation folded in, so
        a plain dense layer (a network's classifier) computes them."""
        kernel = self.weights / self.std[:, None]
        return kernel, self.bias - self.mean @ kernel


def fit_linear_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    l2: float = 1e-4,
    max_steps: int = 500,
    weights: np.ndarray | None = None,
) -> LinearClassifier:
    """Fit softmax regression by L-BFGS: weighted mean cross-entropy + l2 * |W|^2 (no penalty on
    the bias). `weights` (default all ones; 0 leaves an example out) keep the shapes of a set
    fixed while its folds change, so one compiled solver serves every fold and penalty."""
    x = np.asarray(features, np.float32).reshape(len(features), -1)
    w = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
    total = w.sum()
    if total <= 0:
        raise ValueError("no example has a positive weight: nothing to fit")
    mean = (w @ x) / total
    std = np.sqrt((w @ (x - mean) ** 2) / total) + 1e-6
    params = _solve(
        jnp.asarray((x - mean) / std),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(w / total),
        jnp.float32(l2),
        num_classes=num_classes,
        max_steps=max_steps,
    )
    params = jax.device_get(params)
    return LinearClassifier(mean=mean, std=std, weights=params["w"], bias=params["b"])


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _solve(x, y, example_weights, l2, *, num_classes: int, max_steps: int):
    def loss(params):
        logits = x @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * example_weights) + l2 * jnp.sum(params["w"] ** 2)

    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry, _):
        params, opt_state = carry
        value, grad = value_and_grad(params, state=opt_state)
        updates, opt_state = solver.update(
            grad, opt_state, params, value=value, grad=grad, value_fn=loss
        )
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(body, (params, solver.init(params)), None, max_steps)
    return params


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # penalties tried by fit_with_validation
MANY_EXAMPLES = 6000  # fit_within_budget cheapens the penalty search above this many examples


def validation_folds(labels: np.ndarray, *, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Class-stratified folds of example indices: each class dealt round-robin after a shuffle."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return [np.flatnonzero(assignment == fold) for fold in range(folds)]


def fit_with_validation(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 5,
    max_folds: int | None = None,
    max_steps: int = 500,
    seed: int = 0,
) -> tuple[LinearClassifier, float, dict[float, float]]:
    """(classifier refit on every example with the best penalty, that penalty, the held-out
    accuracy of every penalty).

    The penalty maximises the mean held-out accuracy over class-stratified folds (`max_folds` of
    them are used, e.g. 1 for a single held-out fifth when the set is large and fits are slow).
    """
    x = np.asarray(features, np.float32).reshape(len(features), -1)
    labels = np.asarray(labels)
    splits = validation_folds(labels, folds=folds, seed=seed)[:max_folds]
    progress = TaskProgress(
        f"Linear fit on {x.shape[0]} examples x {x.shape[1]} features ({len(l2_grid)} penalties "
        f"x {len(splits)} held-out fold{'s' * (len(splits) > 1)}, then the refit)",
        len(l2_grid) * len(splits) + 1,
        unit=" fits",
    )
    scores = []
    for l2 in l2_grid:
        accuracies = []
        for held_out in splits:
            keep = np.ones(len(labels), np.float32)
            keep[held_out] = 0.0
            fitted = fit_linear_classifier(
                x, labels, num_classes=num_classes, l2=l2, max_steps=max_steps, weights=keep
            )
            accuracies.append(fitted.accuracy(x[held_out], labels[held_out]))
            progress.advance()
        scores.append(float(np.mean(accuracies)))
    best = float(l2_grid[int(np.argmax(scores))])
    classifier = fit_linear_classifier(
        x, labels, num_classes=num_classes, l2=best, max_steps=max_steps
    )
    progress.advance()
    return classifier, best, dict(zip(map(float, l2_grid), scores, strict=True))


def fit_within_budget(
    features: np.ndarray, labels: np.ndarray, *, num_classes: int, seed: int = 0
) -> LinearClassifier:
    """fit_with_validation at a cost that suits any set size, the same rule for any input.

    Every fit takes 200 L-BFGS steps (on 60,000 examples within 0.1 point of 500 steps, in 2.2x
    less time; fewer examples converge sooner). Above MANY_EXAMPLES examples the penalty search
    uses one held-out fifth and the three smallest penalties (more data needs less).
    """
    many = dict(max_folds=1, l2_grid=L2_GRID[:3]) if len(labels) > MANY_EXAMPLES else {}
    classifier, _, _ = fit_with_validation(
        features, labels, num_classes=num_classes, seed=seed, max_steps=200, **many
    )
    return classifier
