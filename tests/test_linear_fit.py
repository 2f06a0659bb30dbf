"""The offline linear classifier of the demo: its optimum against scikit-learn, its folds, and the
penalty chosen on held-out examples."""

import numpy as np
import pytest

from simclr_jax.train import linear_fit


def _blobs(n_per_class: int, dims: int, classes: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dims)) * 2.0
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + spread * rng.standard_normal((len(labels), dims))
    return x.astype(np.float32), labels


def test_the_fit_reaches_scikit_learns_optimum():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(40, 6, 3, spread=2.5)
    l2 = 1e-2
    ours = linear_fit.fit_linear_classifier(x, y, num_classes=3, l2=l2, max_steps=500)
    standardised = (x - ours.mean) / ours.std
    # Ours: mean cross-entropy + l2 * |W|^2; scikit-learn: C * sum(cross-entropy) + |W|^2 / 2.
    reference = sklearn.LogisticRegression(C=1.0 / (2 * l2 * len(y)), tol=1e-10, max_iter=10_000)
    reference.fit(standardised, y)
    np.testing.assert_allclose(
        ours.logits(x) - ours.logits(x).mean(1, keepdims=True),
        reference.decision_function(standardised)
        - reference.decision_function(standardised).mean(1, keepdims=True),
        atol=2e-3,
    )


def test_folds_are_stratified_disjoint_and_cover_every_example():
    labels = np.repeat(np.arange(4), [10, 11, 12, 13])
    folds = linear_fit.validation_folds(labels, folds=5, seed=3)
    everything = np.sort(np.concatenate(folds))
    np.testing.assert_array_equal(everything, np.arange(len(labels)))
    for fold in folds:
        counts = np.bincount(labels[fold], minlength=4)
        assert counts.min() >= 2 and counts.max() <= 3  # 10..13 examples over 5 folds


def test_the_penalty_is_chosen_on_held_out_examples_then_refit_on_all():
    # Classes differ only in x1 - x2, under a large noise both coordinates share: the mean-difference
    # direction a strong penalty tends to (x1 alone) is poor, a weak penalty learns (1, -1).
    rng = np.random.default_rng(0)
    shared = 3.0 * rng.standard_normal(400)
    labels = np.repeat([0, 1], 200)
    x = np.stack([labels * 2.0 - 1.0 + shared, shared], axis=1).astype(np.float32)
    grid = (1.0, 1e-5)  # the strong one first: a tie would pick it
    classifier, chosen, scores = linear_fit.fit_with_validation(
        x, labels, num_classes=2, l2_grid=grid
    )
    assert chosen == 1e-5
    assert scores[1e-5] > scores[1.0] + 0.2, scores
    assert set(scores) == set(grid)
    refit = linear_fit.fit_linear_classifier(x, labels, num_classes=2, l2=chosen)
    np.testing.assert_allclose(classifier.weights, refit.weights, rtol=1e-5, atol=1e-6)


def test_weights_leave_examples_out_exactly():
    x, y = _blobs(30, 4, 3, spread=1.5, seed=4)
    keep = np.ones(len(y), np.float32)
    keep[::3] = 0.0
    masked = linear_fit.fit_linear_classifier(x, y, num_classes=3, l2=1e-2, weights=keep)
    subset = linear_fit.fit_linear_classifier(x[keep > 0], y[keep > 0], num_classes=3, l2=1e-2)
    np.testing.assert_allclose(masked.mean, subset.mean, rtol=1e-5)
    # The bias is not penalised, so the logits are defined up to a constant per example (softmax
    # ignores it): compare them centred, as the scikit-learn test above does.
    centred = lambda fit: fit.logits(x) - fit.logits(x).mean(1, keepdims=True)
    np.testing.assert_allclose(centred(masked), centred(subset), atol=2e-3)  # float32 L-BFGS


def test_as_dense_folds_the_standardisation_into_a_plain_dense_layer():
    """A network's classifier (x @ kernel + bias on raw features) gives the fitted classifier's
    logits, to float32 precision."""
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, [0.1, 2.0, 30.0], (200, 3)).astype(np.float32)  # offset, unequal spreads
    labels = (x[:, 0] - 5 + x[:, 1] / 20 > 0).astype(np.int32) + 2 * (x[:, 2] > 5)
    classifier = linear_fit.fit_linear_classifier(x, labels, num_classes=4, l2=1e-3)
    kernel, bias = classifier.as_dense()
    np.testing.assert_allclose(x @ kernel + bias, classifier.logits(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("examples", [600, linear_fit.MANY_EXAMPLES + 10])
def test_fit_within_budget_is_fit_with_validation_at_its_documented_cost(examples):
    """Small sets: 5 folds over L2_GRID; large ones: one held-out fifth, the 3 smallest penalties;
    either way 200 L-BFGS steps and the classifier refit on every example."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(examples, 6)).astype(np.float32)
    labels = (x[:, 0] + 0.5 * rng.normal(size=examples) > 0).astype(np.int32)
    many = examples > linear_fit.MANY_EXAMPLES
    expected, _, scores = linear_fit.fit_with_validation(
        x, labels, num_classes=2, max_steps=200, seed=1,
        **(dict(max_folds=1, l2_grid=linear_fit.L2_GRID[:3]) if many else {}),
    )  # fmt: skip
    assert len(scores) == (3 if many else len(linear_fit.L2_GRID))
    got = linear_fit.fit_within_budget(x, labels, num_classes=2, seed=1)
    np.testing.assert_array_equal(got.weights, expected.weights)
