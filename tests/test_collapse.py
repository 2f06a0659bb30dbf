"""The collapse monitor (train/collapse.py): its two statistics against independent NumPy
formulas, and a collapsed encoder (a constant output) warns once while a healthy one does not."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from simclr_jax import parallel
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.models import build_model, init_variables
from simclr_jax.train import collapse


def test_std_of_normalised_projections_is_about_one_over_sqrt_d_when_spread_and_0_collapsed():
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(8192, 64))
    assert collapse.l2_normalized_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.02)
    constant = np.tile(rng.normal(size=(1, 64)), (500, 1))
    assert collapse.l2_normalized_std(constant) == pytest.approx(0.0, abs=1e-9)
    # Scaling rows changes nothing (they are normalised first): the formula written out.
    x = rng.normal(size=(300, 16)) * rng.uniform(0.1, 10, size=(300, 1))
    unit = x / np.sqrt((x**2).sum(1, keepdims=True))
    mean = unit.sum(0) / len(unit)
    expected = np.mean(np.sqrt(((unit - mean) ** 2).sum(0) / len(unit)))
    assert collapse.l2_normalized_std(x) == pytest.approx(expected, rel=1e-12)


def test_effective_rank_is_exp_of_the_entropy_of_the_singular_values():
    rng = np.random.default_rng(1)
    left, _ = np.linalg.qr(rng.normal(size=(50, 3)))  # orthonormal columns
    right, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    x = left @ np.diag([3.0, 1.0, 0.0]) @ right  # singular values 3, 1, 0
    p = np.array([0.75, 0.25])
    assert collapse.effective_rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert collapse.effective_rank(np.ones((40, 8))) == pytest.approx(1.0)
    assert collapse.effective_rank(np.eye(12)) == pytest.approx(12.0)
    assert collapse.effective_rank(np.zeros((5, 4))) == 0.0


@pytest.fixture(scope="module")
def monitor_and_variables():
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    model = build_model(
        dict(backbone="convnet", depth=4, base_width=4), num_classes=10, image_size=16
    )
    images = np.random.default_rng(2).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    monitor = collapse.CollapseMonitor(dp, model, 16, ImageArrays(images, None, 10), batch_size=16)
    healthy = init_variables(model, seed=0, image_size=16, channels=1)

    # Every kernel zero and every offset 0.5: each image gets the same (non-zero) features.
    def constant(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        return (
            jnp.zeros_like(leaf)
            if name == "kernel"
            else jnp.full_like(leaf, 0.5)
            if name == "bias"
            else leaf
        )

    collapsed = {
        "params": jax.tree_util.tree_map_with_path(constant, healthy["params"]),
        "batch_stats": healthy["batch_stats"],
    }
    return monitor, healthy, collapsed


def test_a_collapsed_encoder_warns_once_and_a_healthy_one_does_not(
    monitor_and_variables, monkeypatch
):
    monitor, healthy, collapsed = monitor_and_variables
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda message, *args: warnings.append(message % args))
    found = monitor(healthy)
    assert set(found) == {"proj_std", "effective_rank"}
    assert found["proj_std"] > collapse.COLLAPSED_FRACTION / math.sqrt(128)
    assert found["effective_rank"] > 2.0 and not warnings and not monitor.warned
    found = monitor(collapsed)
    assert found["proj_std"] < 1e-6 and found["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert len(warnings) == 1 and "Representation collapse" in warnings[0]
    monitor(collapsed)
    assert len(warnings) == 1  # once per run
