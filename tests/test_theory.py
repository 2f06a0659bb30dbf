"""Tests for simclr_jax.theory: data model, network, trainers against NumPy, and the smoke run."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.theory import __main__ as cli
from simclr_jax.theory import analysis, contrastive, data_model, network, supervised

# --------------------------------------------------------------------------------- data model


def test_signal_vector_has_requested_snr():
    for dim, snr, sigma_p in [(100, 0.3, 1.0), (1000, 0.07, 2.5)]:
        mu = data_model.signal_vector(dim, snr, sigma_p)
        assert np.isclose(float(jnp.linalg.norm(mu)), snr * sigma_p * np.sqrt(dim), rtol=1e-6)
        assert np.isclose(float(data_model.empirical_snr(mu, sigma_p)), snr, rtol=1e-6)


def test_noise_is_orthogonal_to_mu_with_projected_covariance():
    dim, sigma_p = 6, 1.5
    mu = jax.random.normal(jax.random.key(1), (dim,))  # a generic direction, not an axis
    xi = np.asarray(data_model.sample_noise(jax.random.key(2), 40000, mu, sigma_p), np.float64)
    unit = np.asarray(mu, np.float64) / np.linalg.norm(mu)
    assert np.abs(xi @ unit).max() < 1e-4 * sigma_p
    expected = sigma_p**2 * (np.eye(dim) - np.outer(unit, unit))
    np.testing.assert_allclose(np.cov(xi.T), expected, atol=0.05)


def test_sample_layout_labels_and_snr():
    dim, sigma_p, snr = 500, 1.0, 0.2
    mu = data_model.signal_vector(dim, snr, sigma_p)
    x, y = data_model.sample(jax.random.key(0), 2000, mu, sigma_p)
    x, y, mu_np = np.asarray(x), np.asarray(y), np.asarray(mu)
    assert x.shape == (2000, 2, dim) and set(np.unique(y)) == {-1.0, 1.0}
    assert abs(y.mean()) < 0.1  # equal odds
    np.testing.assert_allclose(x[:, 0], y[:, None] * mu_np, atol=1e-6)
    assert np.abs(x[:, 1] @ mu_np).max() < 1e-3
    # ||mu|| / ||xi|| = SNR sqrt(d / (d - 1)): the noise lives in d - 1 dimensions.
    ratio = np.linalg.norm(mu_np) / np.sqrt((x[:, 1] ** 2).sum(1).mean())
    assert np.isclose(ratio, snr * np.sqrt(dim / (dim - 1)), rtol=0.01)


def test_random_patch_order_swaps_about_half():
    mu = data_model.signal_vector(20, 0.5, 1.0)
    x, y = data_model.sample(jax.random.key(3), 1000, mu, 1.0, random_order=True)
    x, y = np.asarray(x), np.asarray(y)
    signal_first = np.all(np.isclose(x[:, 0], y[:, None] * np.asarray(mu)), axis=1)
    signal_second = np.all(np.isclose(x[:, 1], y[:, None] * np.asarray(mu)), axis=1)
    assert np.all(signal_first ^ signal_second)
    assert 0.4 < signal_first.mean() < 0.6


@pytest.mark.parametrize("kind", ["fresh", "mask", "flip", "rotate"])
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_augmentation_shares_the_stated_fraction_of_noise(kind, strength):
    dim, sigma_p = 300, 1.0
    mu = data_model.signal_vector(dim, 0.3, sigma_p)
    xi = data_model.sample_noise(jax.random.key(4), 400, mu, sigma_p)
    new = data_model.augment_noise(jax.random.key(5), xi, mu, sigma_p, kind, strength)
    xi, new = np.asarray(xi, np.float64), np.asarray(new, np.float64)
    assert np.abs(new @ np.asarray(mu)).max() < 1e-3  # still orthogonal to the signal
    assert np.isclose((new**2).sum(1).mean(), sigma_p**2 * (dim - 1), rtol=0.03)  # same law
    correlation = (xi * new).sum(1).mean() / (sigma_p**2 * (dim - 1))
    assert np.isclose(correlation, 0.0 if kind == "fresh" else strength, atol=0.03)


def test_positive_pairs_share_signal_only():
    mu = data_model.signal_vector(200, 0.3, 1.0)
    a, b = data_model.positive_pairs(jax.random.key(6), 50, mu, 1.0)
    np.testing.assert_array_equal(np.asarray(a[:, 0]), np.asarray(b[:, 0]))
    assert not np.allclose(np.asarray(a[:, 1]), np.asarray(b[:, 1]))


def test_data_model_rejects_bad_arguments():
    mu = data_model.signal_vector(10, 0.3, 1.0)
    xi = data_model.sample_noise(jax.random.key(0), 3, mu, 1.0)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        data_model.augment_noise(jax.random.key(0), xi, mu, 1.0, "crop", 0.5)
    with pytest.raises(ValueError, match="strength"):
        data_model.augment_noise(jax.random.key(0), xi, mu, 1.0, "mask", 1.5)
    with pytest.raises(ValueError, match="dim"):
        data_model.signal_vector(1, 0.3, 1.0)


# ------------------------------------------------------------------------------------ network


def _numpy_forward(w: np.ndarray, x: np.ndarray, q: float) -> np.ndarray:
    """f(W, x) written out with loops, straight from the definition."""
    _, m, _ = w.shape
    out = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        for j, sign in enumerate((1.0, -1.0)):
            for r in range(m):
                for p in range(x.shape[1]):
                    out[i] += sign / m * max(0.0, w[j, r] @ x[i, p]) ** q
    return out


def _numpy_loss_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, q: float) -> np.ndarray:
    """d/dW of mean log(1 + exp(-y f)): -y sigmoid(-y f) (+-1/m) q relu(<w,x_p>)^(q-1) x_p."""
    _, m, _ = w.shape
    f = _numpy_forward(w, x, q)
    coeff = -y / (1.0 + np.exp(y * f)) / x.shape[0]
    grad = np.zeros_like(w)
    for j, sign in enumerate((1.0, -1.0)):
        for r in range(m):
            for i in range(x.shape[0]):
                for p in range(x.shape[1]):
                    z = w[j, r] @ x[i, p]
                    grad[j, r] += coeff[i] * sign / m * q * max(0.0, z) ** (q - 1) * x[i, p]
    return grad


def _small_problem(seed=0, n=6, m=3, dim=12, scale=0.5):
    rng = np.random.default_rng(seed)
    w = scale * rng.normal(size=(2, m, dim))
    x = rng.normal(size=(n, 2, dim))
    y = rng.choice([-1.0, 1.0], size=n)
    return w, x, y


@pytest.mark.parametrize("q", [3.0, 4.0])
def test_forward_and_gradient_match_numpy(q):
    w, x, y = _small_problem()
    out = network.forward(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32), q)
    np.testing.assert_allclose(np.asarray(out), _numpy_forward(w, x, q), rtol=1e-4, atol=1e-5)
    grad = jax.grad(network.logistic_loss)(
        jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), q
    )
    np.testing.assert_allclose(np.asarray(grad), _numpy_loss_grad(w, x, y, q), rtol=1e-3, atol=1e-5)


def test_forward_ignores_patch_order_and_alignment_matches_numpy():
    w, x, _ = _small_problem(seed=1)
    w, x = jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(network.forward(w, x, 3.0)),
        np.asarray(network.forward(w, x[:, ::-1], 3.0)),
        rtol=1e-5,
    )
    mu = np.arange(1.0, 13.0)
    expected = np.abs(np.asarray(w) @ mu) / (
        np.linalg.norm(np.asarray(w), axis=-1) * np.linalg.norm(mu)
    )
    np.testing.assert_allclose(
        np.asarray(network.alignment(w, jnp.asarray(mu))), expected, rtol=1e-5
    )


def test_coefficient_space_training_equals_plain_gradient_descent():
    w, x, y = _small_problem(seed=2, n=5, dim=20, scale=0.3)
    w, x, y = (jnp.asarray(a, jnp.float32) for a in (w, x, y))
    x_test, y_test = x[:3] * 1.1, y[:3]
    lr, steps = 0.05, 12
    history = supervised.train(w, x, y, x_test, y_test, q=3.0, lr=lr, steps=steps, eval_every=4)
    plain = w
    losses = []
    gd_step = jax.jit(lambda v: v - lr * x.shape[0] * jax.grad(network.logistic_loss)(v, x, y, 3.0))
    for step in range(1, steps + 1):
        plain = gd_step(plain)
        if step % 4 == 0:
            losses.append(float(network.logistic_loss(plain, x, y, 3.0)))
    assert not np.allclose(np.asarray(plain), np.asarray(w), atol=1e-3)  # it did move
    np.testing.assert_allclose(
        np.asarray(history["filters"]), np.asarray(plain), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(history["train_loss"]), losses, rtol=1e-4)
    test_out = network.forward(plain, x_test, 3.0)
    np.testing.assert_allclose(
        float(history["test_error"][-1]), float(jnp.mean(test_out * y_test <= 0)), atol=1e-6
    )


# -------------------------------------------------------------------------------- contrastive


def _numpy_nt_xent(w, a, b, tau):
    z = np.concatenate([a.sum(1) @ w.T, b.sum(1) @ w.T])
    n2 = z.shape[0]
    logits = z @ z.T / tau
    total = 0.0
    for i in range(n2):
        others = [k for k in range(n2) if k != i]
        partner = (i + n2 // 2) % n2
        total += -logits[i, partner] + np.log(np.exp(logits[i, others]).sum())
    return total / n2


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    w, a, b = rng.normal(size=(4, 7)) * 0.3, rng.normal(size=(5, 2, 7)), rng.normal(size=(5, 2, 7))
    got = contrastive.contrastive_loss(*(jnp.asarray(v, jnp.float32) for v in (w, a, b)), 0.5)
    np.testing.assert_allclose(float(got), _numpy_nt_xent(w, a, b, 0.5), rtol=1e-5)


def test_curvature_at_origin_matches_explicit_hessian():
    dim, n, tau = 30, 40, 0.7
    mu = data_model.signal_vector(dim, 0.6, 1.0)
    a, b = data_model.positive_pairs(jax.random.key(7), n, mu, 1.0)
    v = np.concatenate([np.asarray(a).sum(1), np.asarray(b).sum(1)]).astype(np.float64)
    # At W = 0 all logits vanish, so dL/ds_ak = (1/(2n tau)) (1/(2n-1) - [k = partner(a)]) for
    # k != a, and s_ak = (w.v_a)(w.v_k) has Hessian v_a v_k^T + v_k v_a^T.
    g = np.full((2 * n, 2 * n), 1.0 / (2 * n - 1))
    np.fill_diagonal(g, 0.0)
    g[np.arange(2 * n), (np.arange(2 * n) + n) % (2 * n)] -= 1.0
    g /= 2 * n * tau
    hessian = v.T @ (g + g.T) @ v
    expected = np.abs(np.linalg.eigvalsh(hessian)).max()
    got = contrastive.curvature_at_origin(a, b, tau, iterations=300)
    np.testing.assert_allclose(float(got), expected, rtol=1e-3)


def test_pretraining_aligns_filters_with_mu_when_n0_snr2_is_large():
    dim, n0 = 200, 128
    mu = data_model.signal_vector(dim, 0.5, 1.0)  # n0 SNR^2 = 32
    a, b = data_model.positive_pairs(jax.random.key(8), n0, mu, 1.0)
    history = contrastive.pretrain(
        jax.random.key(9),
        a,
        b,
        mu,
        num_filters=6,
        sigma0=1e-6,
        temperature=1.0,
        rate=0.4,
        steps=60,
        log_every=10,
    )
    assert float(history["alignment"][0]) < 0.9
    assert float(network.alignment(history["filters"], mu).min()) > 0.95


def test_finetune_init_permutes_and_rescales():
    rng = np.random.default_rng(1)
    filters = jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(20, 2, 9)), jnp.float32)
    out = contrastive.finetune_init(jax.random.key(0), filters, x, 1.7)
    assert out.shape == (2, 3, 9)
    pre = np.asarray(x).reshape(-1, 9) @ np.asarray(out).reshape(6, 9).T
    assert np.isclose(np.sqrt((pre**2).mean()), 1.7, rtol=1e-4)
    # Same rows up to one common scale and order.
    scale = np.linalg.norm(np.asarray(out)) / np.linalg.norm(np.asarray(filters))
    rows = np.asarray(out).reshape(6, 9) / scale
    order = [int(np.argmin(np.linalg.norm(np.asarray(filters) - r, axis=1))) for r in rows]
    assert sorted(order) == list(range(6))
    np.testing.assert_allclose(rows, np.asarray(filters)[order], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- analysis


def test_crossing_interpolates_in_log_n():
    assert analysis.crossing([2, 8], [0.45, 0.05], 0.25) == pytest.approx(4.0)
    assert analysis.crossing([2, 4, 8], [0.1, 0.0, 0.0], 0.25) is None  # already below
    assert analysis.crossing([2, 4, 8], [0.5, 0.4, 0.3], 0.25) is None  # never below


def test_boundary_fit_recovers_the_exponent():
    records = []
    for snr in (0.3, 0.45, 0.7):
        n_star = 2.0 / snr**3
        for n in (2, 4, 8, 16, 32, 64, 128):
            err = 0.5 if n < n_star else 0.0
            records.append({"method": "supervised", "snr": snr, "n": n, "last_test_error": err})
    boundary = analysis.supervised_boundary(records, 0.25, 3.0)
    assert len(boundary["points"]) == 3
    assert boundary["slope"] == pytest.approx(-3.0, abs=0.6)  # grid-limited resolution


# ------------------------------------------------------------------------------- smoke run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("theory_smoke"))
    results = cli.run_experiment(cli.config_from_overrides({}, smoke=True), out)
    return out, results


def test_smoke_run_writes_results_and_figure(smoke):
    out, results = smoke
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    cfg = saved["config"]
    per_method = len(cfg["snr_grid"]) * cfg["seeds"]
    methods = [r["method"] for r in saved["records"]]
    assert methods.count("supervised") == per_method * len(cfg["n_grid"])
    assert methods.count("simclr") == per_method * len(cfg["n0_grid"]) * len(cfg["simclr_n_grid"])
    for key in (
        "best_test_error",
        "last_test_error",
        "best_test_loss",
        "last_test_loss",
        "train_loss",
        "final_alignment",
    ):
        assert all(np.isfinite(r[key]) for r in saved["records"])
    assert all("alignment" in r for r in saved["records"] if r["method"] == "simclr")
    assert os.path.getsize(os.path.join(out, "label_complexity.png")) > 20_000


def test_smoke_run_shows_the_separation(smoke):
    _, results = smoke
    records = results["records"]
    low, high = min(results["config"]["snr_grid"]), max(results["config"]["snr_grid"])
    n = min(results["config"]["simclr_n_grid"])

    def mean(field, **match):
        return np.mean([r[field] for r in records if all(r[k] == v for k, v in match.items())])

    supervised_low = mean("last_test_error", method="supervised", snr=low, n=n)
    simclr_low = mean("last_test_error", method="simclr", snr=low, n=n)
    assert supervised_low > 0.35  # harmful overfitting: noise memorised, signal not learned
    assert mean("train_error", method="supervised", snr=low, n=n) == 0.0  # ... and memorised
    assert mean("train_loss", method="supervised", snr=low, n=n) < 1e-3
    assert simclr_low < 0.1
    assert supervised_low - simclr_low > 0.3
    assert mean("alignment", method="simclr", snr=low, n=n) > 0.8
    # Supervised training itself works when the signal is strong.
    assert mean("last_test_error", method="supervised", snr=high, n=n) < 0.15


def test_bad_values_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="augmentation must be one of"):
        cli.config_from_overrides({"augmentation": "blur"}, smoke=True)
    with pytest.raises(ValueError, match="q must be > 2"):
        cli.config_from_overrides({"q": 2.0}, smoke=True)
    with pytest.raises(ValueError, match="--snr_grid takes float values"):
        cli.config_from_overrides({"snr_grid": ["0.1", "high"]}, smoke=True)
    assert cli.config_from_overrides({"snr_grid": ["0.1", "0.3"]}).snr_grid == (0.1, 0.3)
