"""Optimizers, masks and schedules against NumPy references of the published algorithms."""

from __future__ import annotations

import logging
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from simclr_jax import optim


def fake_simclr_params() -> dict:
    """A SimCLRModel-like parameter tree (paths as the contract names them), tiny shapes."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def bn(channels, gamma=1.0):
        return {"scale": jnp.full((channels,), gamma), "bias": normal(channels) * 0.1}

    return {
        "backbone": {
            "stem": {"Conv_0": {"kernel": normal(3, 3, 1, 4)}, "BatchNorm_0": bn(4)},
            "block_group1": {
                "BottleneckBlock_0": {
                    "Conv_0": {"kernel": normal(1, 1, 4, 4)},
                    "BatchNorm_0": bn(4),
                    "Conv_1": {"kernel": normal(3, 3, 4, 4)},
                    "BatchNorm_1": bn(4, gamma=0.0),  # zero-init last BN of the block
                    "projection": {"Conv_0": {"kernel": normal(1, 1, 4, 4)}, "bn_proj": bn(4)},
                }
            },
        },
        "head": {
            "Dense_0": {"kernel": normal(4, 4)},
            "BatchNorm_0": bn(4),
            "Dense_1": {"kernel": jnp.zeros((4, 3))},  # zero norm: LARS must fall back to ratio 1
            "BatchNorm_1": {"scale": jnp.ones(3)},
        },
        "classifier": {"kernel": normal(4, 2), "bias": normal(2)},
    }


KERNELS = {
    ("backbone", "stem", "Conv_0", "kernel"),
    ("backbone", "block_group1", "BottleneckBlock_0", "Conv_0", "kernel"),
    ("backbone", "block_group1", "BottleneckBlock_0", "Conv_1", "kernel"),
    ("backbone", "block_group1", "BottleneckBlock_0", "projection", "Conv_0", "kernel"),
    ("head", "Dense_0", "kernel"),
    ("head", "Dense_1", "kernel"),
    ("classifier", "kernel"),
}


def _flat(tree) -> dict[tuple[str, ...], object]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _config(name: str, **overrides) -> ml_collections.ConfigDict:
    fields = dict(name=name, weight_decay=1e-2, momentum=0.9, trust_coefficient=1e-3)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def _gradients(params, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _run(optimizer, params, steps: int):
    """A few jitted optimizer steps with fresh random gradients; returns the final params."""
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for step in range(steps):
        updates, state = update(_gradients(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params


# ----------------------------------------------------------------------------- learning rate


def test_scaled_learning_rate_rules_and_errors():
    assert optim.scaled_learning_rate(0.3, 512, "linear") == pytest.approx(0.6)
    assert optim.scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    with pytest.raises(ValueError, match="optim.lr_scaling"):
        optim.scaled_learning_rate(0.3, 512, "cubic")
    with pytest.raises(ValueError, match="batch_size"):
        optim.scaled_learning_rate(0.3, 0, "linear")


def reference_lr(step: int, peak: float, total: int, warmup: int) -> float:
    if step < warmup:
        return peak * step / warmup
    return (
        peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))
    )


@pytest.mark.parametrize("total,warmup", [(50, 10), (20, 0), (7, 6)])
def test_warmup_cosine_schedule_matches_reference_formula(total, warmup, caplog):
    caplog.set_level(logging.DEBUG)
    schedule = optim.warmup_cosine_schedule(0.8, total, warmup)
    steps = np.arange(total + 3)
    values = np.asarray(jax.vmap(schedule)(steps))
    expected = [reference_lr(int(s), 0.8, total, warmup) for s in steps]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    assert values[total] == pytest.approx(0.0, abs=1e-7)
    # No warmup is no 0-step warmup schedule: optax would log that it is constant, every run.
    assert not [r.getMessage() for r in caplog.records if "optax" in r.pathname]


def test_warmup_longer_than_run_stays_on_warmup_line():
    schedule = optim.warmup_cosine_schedule(1.0, 5, 10)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in range(5)], [0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6
    )
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine_schedule(1.0, 0, 0)
    with pytest.raises(ValueError, match="warmup"):
        optim.warmup_cosine_schedule(1.0, 10, -1)


def run_config(**fields) -> ml_collections.ConfigDict:
    optim_config = dict(base_lr=0.3, lr_scaling="linear", warmup_epochs=fields.pop("warmup", 10.0))
    defaults = dict(batch_size=512, num_steps=0, num_epochs=100.0, optim=optim_config)
    return ml_collections.ConfigDict({**defaults, **fields})


@pytest.mark.parametrize(
    "examples,batch,epochs,warmup,total_steps,warmup_steps",
    [
        # google-research/simclr tf2/model.py: get_train_steps = N * epochs // B + 1;
        # WarmUpAndCosineDecay: warmup = int(round(warmup_epochs * N // B)).
        (50_000, 512, 100.0, 10.0, 9766, 976),  # CIFAR-10: 5,000,000 // 512 + 1
        (1_281_167, 4096, 100.0, 10.0, 31279, 3127),  # ImageNet, batch 4096
        (600, 60, 60.0, 0.0, 601, 0),  # 1% of Fashion-MNIST: 10 steps an epoch, plus one
        (1000, 300, 0.5, 1.5, 2, 5),  # a fraction of an epoch; warmup longer than the run
    ],
)
def test_train_schedule_counts_steps_as_the_reference(
    examples, batch, epochs, warmup, total_steps, warmup_steps
):
    config = run_config(batch_size=batch, num_epochs=epochs, warmup=warmup)
    schedule = optim.train_schedule(config, examples)
    assert (schedule.total_steps, schedule.warmup_steps) == (total_steps, warmup_steps)
    assert schedule.steps_per_epoch == examples // batch
    assert schedule.peak_lr == pytest.approx(0.3 * batch / 256)
    assert float(schedule.learning_rate()(warmup_steps // 2)) == pytest.approx(
        reference_lr(warmup_steps // 2, 0.3 * batch / 256, total_steps, warmup_steps), rel=1e-5
    )


def test_train_schedule_num_steps_and_unknown_sizes():
    assert optim.train_schedule(run_config(num_steps=7), 50_000).total_steps == 7
    # A streamed split of unknown size: only a length in steps (and no epoch warmup) works.
    assert optim.train_schedule(run_config(num_steps=7, warmup=0.0), None).total_steps == 7
    with pytest.raises(ValueError, match="num_steps > 0 and optim.warmup_epochs=0"):
        optim.train_schedule(run_config(), None)
    with pytest.raises(ValueError, match="batch_size=512 exceeds the 100 training examples"):
        optim.train_schedule(run_config(), 100)


# ----------------------------------------------------------------------------- masks


def test_weight_decay_and_trust_ratio_masks_from_paths():
    params = fake_simclr_params()
    decay = _flat(optim.weight_decay_mask(params))
    trust = _flat(optim.trust_ratio_mask(params))
    for path in _flat(params):
        assert decay[path] == (path in KERNELS), path
        assert trust[path] == (path in KERNELS and path[0] != "classifier"), path
    # The same masks for a FrozenDict tree.
    frozen_tree = _flat(optim.weight_decay_mask(flax.core.freeze(params)))
    assert frozen_tree == decay


# ----------------------------------------------------------------------------- LARS


def reference_lars(params, grads_per_step, lrs, *, weight_decay, eta, momentum, decay, adapt):
    """LARS (You et al. 2017) as the reference SimCLR implements it, on flat dicts of arrays.

    g <- g + wd * w (decayed params); trust = eta * ||w|| / ||g|| (adapted params, 1 if either norm
    is 0); v <- momentum * v + lr * trust * g; w <- w - v.
    """
    weights = {k: np.asarray(v, np.float64) for k, v in params.items()}
    velocity = {k: np.zeros_like(v) for k, v in weights.items()}
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for key, w in weights.items():
            g = np.asarray(grads[key], np.float64)
            if decay[key]:
                g = g + weight_decay * w
            trust = 1.0
            if adapt[key]:
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / g_norm
            velocity[key] = momentum * velocity[key] + lr * trust * g
            weights[key] = w - velocity[key]
    return weights


@pytest.mark.parametrize("schedule", [False, True])
def test_lars_matches_numpy_reference(schedule):
    params = fake_simclr_params()
    learning_rate = (lambda count: 2.0 + 0.5 * count) if schedule else 3.0
    optimizer = optim.make_optimizer(
        _config("lars", trust_coefficient=1e-2), params, learning_rate=learning_rate
    )
    steps = 4
    final = _flat(_run(optimizer, params, steps))
    flat = _flat(params)
    expected = reference_lars(
        flat,
        [_flat(_gradients(params, step)) for step in range(steps)],
        [learning_rate(s) if schedule else learning_rate for s in range(steps)],
        weight_decay=1e-2,
        eta=1e-2,
        momentum=0.9,
        decay={k: k in KERNELS for k in flat},
        adapt={k: k in KERNELS and k[0] != "classifier" for k in flat},
    )
    for key, value in final.items():
        np.testing.assert_allclose(value, expected[key], rtol=2e-5, atol=1e-6, err_msg=str(key))
        assert not np.allclose(value, flat[key]), key  # every parameter moved


# Every parameter but BatchNorm's: kernels and the classifier's bias (the reference's L2 set).
NON_BN = KERNELS | {("classifier", "bias")}


def reference_keras_nesterov(params, grads_per_step, lrs, *, weight_decay, momentum, decayed):
    """Keras SGD(nesterov=True) on loss + wd * sum ||w||^2 / 2 over `decayed`, on flat dicts:

    g <- g + wd * w;  v <- momentum * v - lr * g;  w <- w + momentum * v - lr * g.
    """
    weights = {k: np.asarray(v, np.float64) for k, v in params.items()}
    velocity = {k: np.zeros_like(v) for k, v in weights.items()}
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for key, w in weights.items():
            g = np.asarray(grads[key], np.float64) + (weight_decay * w if decayed[key] else 0.0)
            velocity[key] = momentum * velocity[key] - lr * g
            weights[key] = w + momentum * velocity[key] - lr * g
    return weights


def test_momentum_is_keras_nesterov_with_the_learning_rate_inside_the_velocity():
    params = fake_simclr_params()
    flat = _flat(params)
    steps = 10
    schedule = lambda count: 0.3 * 0.7**count  # noqa: E731 (a changing learning rate)
    optimizer = optim.make_optimizer(_config("momentum"), params, learning_rate=schedule)
    final = _flat(_run(optimizer, params, steps))
    grads = [_flat(_gradients(params, step)) for step in range(steps)]
    lrs = [schedule(s) for s in range(steps)]
    decayed = {k: k in NON_BN for k in flat}
    expected = reference_keras_nesterov(
        flat, grads, lrs, weight_decay=1e-2, momentum=0.9, decayed=decayed
    )
    for key, value in final.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
    # The test can tell where the learning rate sits: with it after the buffer (optax.sgd's
    # Nesterov) the weights end elsewhere.
    outside = _flat(
        _run(
            optax.chain(
                optax.add_decayed_weights(1e-2, mask=optim.l2_mask),
                optax.sgd(schedule, momentum=0.9, nesterov=True),
            ),
            params,
            steps,
        )
    )
    key = ("classifier", "kernel")
    assert np.abs(outside[key] - expected[key]).max() > 1e-2


def test_l2_mask_covers_biases_but_not_batch_norm():
    l2 = _flat(optim.l2_mask(fake_simclr_params()))
    assert {k for k, on in l2.items() if on} == NON_BN


def test_sgd_matches_numpy_reference():
    """optax.sgd: v <- momentum * v + (g + wd * w); w <- w - lr * v (L2 on kernels only)."""
    params = fake_simclr_params()
    optimizer = optim.make_optimizer(_config("sgd"), params, learning_rate=0.1)
    final = _flat(_run(optimizer, params, 3))
    flat = _flat(params)
    for key, w0 in flat.items():
        w, v = np.asarray(w0, np.float64), 0.0
        for step in range(3):
            g = np.asarray(_flat(_gradients(params, step))[key], np.float64)
            v = 0.9 * v + g + (1e-2 * w if key in KERNELS else 0.0)
            w = w - 0.1 * v
        np.testing.assert_allclose(final[key], w, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_adam_l2_term_covers_biases_but_not_batch_norm():
    """With zero gradients Adam's only input is the L2 term wd * w: exactly the non-BN params move."""
    params = fake_simclr_params()
    optimizer = optim.make_optimizer(_config("adam", weight_decay=0.5), params, learning_rate=0.1)
    updates, _ = jax.jit(optimizer.update)(
        jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params
    )
    moved = {k for k, u in _flat(updates).items() if np.abs(np.asarray(u)).max() > 0}
    assert moved == {k for k in NON_BN if np.abs(np.asarray(_flat(params)[k])).max() > 0}


def test_adamw_decays_only_masked_params():
    """With zero gradients AdamW's only move is decoupled decay lr * wd * w, on kernels only."""
    params = fake_simclr_params()
    optimizer = optim.make_optimizer(_config("adamw", weight_decay=0.5), params, learning_rate=0.1)
    state = optimizer.init(params)
    updates, _ = jax.jit(optimizer.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    for key, update in _flat(updates).items():
        expected = -0.1 * 0.5 * np.asarray(_flat(params)[key]) if key in KERNELS else 0.0
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-8, err_msg=str(key))


# ----------------------------------------------------------------------------- frozen, errors


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_params_never_move(name):
    params = fake_simclr_params()
    frozen = jax.tree.map(lambda _: False, params)
    frozen["backbone"]["stem"] = jax.tree.map(lambda _: True, params["backbone"]["stem"])
    optimizer = optim.make_optimizer(
        _config(name, weight_decay=0.1), params, learning_rate=0.5, frozen=frozen
    )
    final = _flat(_run(optimizer, params, 2))
    # Every update rule here is per-parameter, so trainable params move exactly as without freezing
    # (this also checks that the masks still apply under optax.multi_transform).
    unfrozen = optim.make_optimizer(_config(name, weight_decay=0.1), params, learning_rate=0.5)
    final_unfrozen = _flat(_run(unfrozen, params, 2))
    for key, value in _flat(params).items():
        if key[:2] == ("backbone", "stem"):
            np.testing.assert_array_equal(final[key], value, err_msg=str(key))
        else:
            assert not np.allclose(final[key], value), key
            np.testing.assert_allclose(final[key], final_unfrozen[key], rtol=1e-6, atol=1e-7)


def test_make_optimizer_errors():
    params = fake_simclr_params()
    with pytest.raises(ValueError, match=r"optim\.name.*lars"):
        optim.make_optimizer(_config("rmsprop"), params, learning_rate=0.1)
    for bad_lr in (0.0, -1.0):
        with pytest.raises(ValueError, match="learning_rate"):
            optim.make_optimizer(_config("lars"), params, learning_rate=bad_lr)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.make_optimizer(_config("lars", weight_decay=-1.0), params, learning_rate=0.1)
    with pytest.raises(ValueError, match="frozen"):
        optim.make_optimizer(_config("lars"), params, learning_rate=0.1, frozen={"backbone": True})


def test_separate_probe_optimizer_trains_only_the_classifier_by_adam():
    params = {
        "backbone": {"conv": {"kernel": jnp.ones((3, 3, 1, 2))}},
        "classifier": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros((3,))},
    }
    base = optax.sgd(1.0)
    tx = optim.with_separate_probe(base, params, learning_rate=0.1)
    state = tx.init(params)
    m = v = 0.0  # NumPy Adam (b1 0.9, b2 0.999, eps 1e-8, bias-corrected), one scalar per leaf
    for step, g in enumerate([0.5, -0.2, 0.3], start=1):
        grads = jax.tree.map(lambda x, g=g: jnp.full_like(x, g), params)
        updates, state = tx.update(grads, state, params)
        # Backbone: plain sgd(1.0) from the base optimizer.
        np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -g)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        expected = -0.1 * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
        np.testing.assert_allclose(updates["classifier"]["kernel"], expected, rtol=1e-4)
    with pytest.raises(ValueError, match="classifier"):
        optim.with_separate_probe(base, {"backbone": params["backbone"]}, learning_rate=0.1)
