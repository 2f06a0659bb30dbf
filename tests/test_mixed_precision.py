"""Mixed precision (config.dtype='bfloat16'): bf16 activations and convolutions, fp32 everything else.

Trains the same tiny ResNet-18 (base width 4) on the same Fashion-MNIST batches and augmentations
through pretrain.make_train_step, once in float32 and once in bfloat16, and checks that the
contrastive loss curves stay close and both fall, and that parameters, BatchNorm statistics,
optimizer state and the loss stay float32 under bfloat16 while the convolutions run in bfloat16.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import parallel, pretrain
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import pipeline, sources
from simclr_jax.optim import scaled_learning_rate, warmup_cosine_schedule
from simclr_jax.train import runner
from simclr_jax.train.state import TrainState

STEPS = 100
BATCH = 16
SMOOTH = 10  # steps per window when comparing curves (single steps are noisy at batch 16)
DTYPES = ("float32", "bfloat16")


def tiny_config():
    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.train_split = "train[:512]"
    config.optim.base_lr = 0.05  # peak 0.2 at batch 16 (sqrt scaling): the probe stays stable
    return config


def init_state(model, config, mesh, schedule):
    """pretrain.init_state, replicated on the mesh."""
    state = pretrain.init_state(model, config, 1, schedule)
    return parallel.DataParallel(mesh).replicate(state)


def train(compiled, state, data) -> tuple[np.ndarray, np.ndarray, TrainState, dict]:
    history = []
    for i in range(STEPS):
        state, aux = compiled(state, data.batch(i))
        history.append((aux["contrastive_loss"], aux["probe_loss"]))
    contrastive, probe = np.asarray(jax.device_get(history)).T
    return contrastive, probe, state, aux


@pytest.fixture(scope="module")
def runs():
    """name -> (contrastive losses [STEPS], probe losses, final state, last aux, lowered text,
    model) for 'float32', 'bfloat16' and 'control': float32 from bf16-rounded initial parameters,
    which shows how far a perturbation of bf16's size moves this (chaotic) training by itself."""
    config = tiny_config()
    arrays = sources.load_split(config.dataset, config.dataset.train_split)
    mesh = parallel.make_mesh(jax.devices()[:1])
    dp = parallel.DataParallel(mesh)
    data = pipeline.DeviceResidentData(arrays, global_batch=BATCH, seed=0, mesh=mesh)
    peak = scaled_learning_rate(config.optim.base_lr, BATCH, config.optim.lr_scaling)
    schedule = warmup_cosine_schedule(peak, STEPS, STEPS // 10)
    results = {}
    for dtype in DTYPES:
        config.dtype = dtype
        model = pretrain.make_model(config, arrays.num_classes)
        state = init_state(model, config, mesh, schedule)
        step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=False)
        lowered = step.lower(state, data.batch(0))
        compiled = lowered.compile()
        if dtype == "float32":
            rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), state.params)
            control_state = state.replace(params=rounded, opt_state=state.tx.init(rounded))
            control_state = jax.tree.map(jnp.copy, control_state)  # own buffers (donation)
        results[dtype] = (*train(compiled, state, data), lowered.as_text(), model)
        if dtype == "float32":
            results["control"] = train(compiled, control_state, data)
    return results


def smooth(x: np.ndarray) -> np.ndarray:
    return x[: len(x) // SMOOTH * SMOOTH].reshape(-1, SMOOTH).mean(axis=1)


def curve_gap(x: np.ndarray, reference: np.ndarray) -> float:
    """Mean relative difference of the curves' 10-step means."""
    a, b = smooth(reference), smooth(x)
    return float(np.mean(np.abs(a - b) / a))


def test_bf16_loss_curve_follows_fp32(runs):
    fp32, bf16, control = runs["float32"][0], runs["bfloat16"][0], runs["control"][0]
    for name in ("float32", "bfloat16", "control"):
        assert np.all(np.isfinite(runs[name][0])) and np.all(np.isfinite(runs[name][1])), name
    # Same data, augmentation and initial parameters: the first step differs only by bf16 rounding.
    assert bf16[0] == pytest.approx(fp32[0], rel=0.01)
    # bf16 really was used (the curves are not bit-identical) ...
    assert np.max(np.abs(fp32 - bf16)) > 1e-4
    # ... and its curve stays as close to fp32's as rounding the initial parameters to bf16 alone
    # moves the fp32 curve (tiny-batch LARS training amplifies any perturbation within steps).
    gap, sensitivity = curve_gap(bf16, fp32), curve_gap(control, fp32)
    assert gap < max(2 * sensitivity, 0.1), (gap, sensitivity)
    # Both learn: the last 10 steps' mean is well below the first 10 steps'.
    for curve in (fp32, bf16):
        assert smooth(curve)[-1] < smooth(curve)[0] - 1.0, smooth(curve)


def test_state_and_loss_stay_float32_under_bf16(runs):
    _, _, state, aux, _, _ = runs["bfloat16"]
    for name, tree in [
        ("params", state.params),
        ("batch_stats", state.batch_stats),
        ("opt_state", state.opt_state),
    ]:
        floating = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floating and all(d == jnp.float32 for d in floating), (name, set(floating))
    for key in ("loss", "contrastive_loss", "probe_loss"):
        assert aux[key].dtype == jnp.float32, key


def test_bf16_activations_and_convolutions(runs):
    for dtype in DTYPES:
        _, _, state, _, text, model = runs[dtype]
        want = "bf16" if dtype == "bfloat16" else "f32"
        # Every convolution of the step (forward and both backward ones) computes in `want`.
        results = re.findall(r"stablehlo\.convolution.*->\s*tensor<[0-9x]+x(\w+)>", text)
        assert len(results) >= 3 * 20 and set(results) == {want}, (dtype, set(results))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
        out = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
        assert out["block_group4"].dtype == jnp.dtype(dtype)
        for key in ("features", "projection", "logits"):
            assert out[key].dtype == jnp.float32, (dtype, key)
