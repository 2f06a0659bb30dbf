"""Gradient accumulation (config.accumulation_chunks): exact for NT-Xent across chunks and devices,
BatchNorm per chunk as documented, plain accumulation caught, bad values refused, still guarded.

The step-level comparisons run in two subprocesses side by side on 4 forced CPU devices
(tests/multidevice/accumulation.py, which writes the references); the tests below bound them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from devices import xla_flags

from simclr_jax import parallel, pretrain, validation
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.train import runner

HERE = pathlib.Path(__file__).resolve().parent

# fp32 bounds, relative to the largest magnitude of each quantity (at least 1). Without BatchNorm
# the chunks agree with the full batch to a few float32 roundings; BatchNorm's backward pass over
# chunks of 4-8 rows amplifies rounding, so the network with BN gets compare_steps.py's bound.
EXACT = 1e-5
WITH_BN = 1e-4


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS=xla_flags(4))
    script = str(HERE / "multidevice" / "accumulation.py")
    runs = [
        subprocess.Popen(
            [sys.executable, script, group],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for group in ("exact", "steps")
    ]
    merged = {"scale": {}}
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        found = json.loads(out.strip().splitlines()[-1])
        assert found["devices"] == 4
        merged["scale"].update(found.pop("scale"))
        merged.update(found)
    return merged


def failures(diffs: dict[str, float], scale: dict[str, float], bound: float) -> list[str]:
    """The quantities whose difference exceeds `bound` times their size (at least 1)."""
    return [
        f"{key}: {diff:.3g} > {bound * max(1.0, scale[key]):.3g}"
        for key, diff in diffs.items()
        if key in scale and not diff <= bound * max(1.0, scale[key])
    ]


@pytest.mark.parametrize("chunks", [1, 2, 4])
@pytest.mark.parametrize("devices", [1, 2])
def test_without_batchnorm_chunks_give_the_full_batch_loss_and_gradients(report, devices, chunks):
    diffs, scale = (
        report[f"bn_free/{devices}dev/K{chunks}"],
        report["scale"][f"bn_free/{devices}dev"],
    )
    assert scale["grads"] > 0.05 and scale["contrastive_loss"] > 1.0, scale  # not zeros
    assert set(diffs) >= {"grads", "contrastive_loss", "probe_loss"}
    assert failures(diffs, scale, EXACT) == []


@pytest.mark.parametrize("chunks", [2, 4])
def test_plain_accumulation_is_caught(report, chunks):
    """Averaging each chunk's own NT-Xent (its negatives only) is a different gradient: the
    bound that the exact accumulation meets rejects it, by orders of magnitude."""
    diffs, scale = report[f"plain/K{chunks}"], report["scale"]["plain"]
    assert diffs["encoder_grads"] > 100 * EXACT * max(1.0, scale["grads"]), diffs
    assert any(line.startswith("grads") for line in failures(diffs, scale, EXACT))


@pytest.mark.parametrize("case", ["1dev/K4", "2dev/K2"])
def test_training_mode_batchnorm_normalises_each_chunk(report, case):
    """Global BN in training mode: the chunks equal one full-batch jax.grad whose BN normalises
    each chunk group (chunk c of every replica) separately; moving averages = the groups' mean."""
    diffs, scale = report[f"ghost_bn/{case}"], report["scale"][f"ghost_bn/{case}"]
    assert scale["grads"] > 1.0 and scale["batch_stats"] > 0.1, scale
    assert set(diffs) == {"grads", "contrastive_loss", "probe_loss", "batch_stats", "encoder_grads"}
    assert failures(diffs, scale, WITH_BN) == []


def test_a_whole_step_with_the_memory_and_the_probe_equals_the_one_pass_step(report):
    """K=2 on 2 devices against K=1 on 4 devices with per-device BN (each device normalises what a
    chunk holds): parameters, BN statistics, optimizer state, the queue, the EMA and metrics."""
    diffs, scale = report["step"], report["scale"]["step"]
    assert set(diffs) == {"params", "batch_stats", "opt_state", "memory", "metrics"}
    assert scale["update"] > 0.1, scale  # the step moved the parameters
    assert diffs["params"] <= 1e-3 * scale["update"], (diffs, scale)
    assert failures(diffs, scale, EXACT) == []


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_fine_tuning_and_distillation_average_their_chunks(report, kind):
    """Plain accumulation (exact for cross-entropy): K=2 on 1 device against K=1 on 2 devices,
    per-device BN; distillation chunks its labelled batch too."""
    diffs, scale = report[kind], report["scale"][kind]
    assert scale["update"] > 1e-3, scale
    assert diffs["params"] <= 1e-3 * scale["update"], (diffs, scale)
    assert failures(diffs, scale, EXACT) == []


def tiny_config(chunks: int):
    config = pretrain_fashion_mnist.get_config("tiny")
    config.model.backbone, config.model.depth = "convnet", 4
    config.accumulation_chunks = chunks
    return config


@pytest.mark.parametrize("chunks", [0, -2])
def test_accumulation_chunks_must_be_a_positive_int(chunks):
    with pytest.raises(ValueError, match=r"^accumulation_chunks must be an int >= 1, got -?\d+$"):
        validation.validate_pretrain(tiny_config(chunks))


def test_accumulation_chunks_must_divide_the_per_device_batch():
    eight_devices = types.SimpleNamespace(devices=np.zeros(8))
    message = (
        r"^accumulation_chunks=3 does not divide the per-device batch_size \(64 over 8 devices "
        r"= 8\); use a divisor of 8$"
    )
    with pytest.raises(ValueError, match=message):
        parallel.check_chunks("batch_size", 64, 3, eight_devices)
    parallel.check_chunks("batch_size", 64, 4, eight_devices)
    config = tiny_config(5)  # batch 32 on this process's one device
    with pytest.raises(ValueError, match="accumulation_chunks=5 does not divide"):
        parallel.from_config(config)
    config.accumulation_chunks = 4
    assert parallel.from_config(config).num_replicas == jax.device_count()


def test_the_nonfinite_guard_still_guards_the_accumulated_step():
    """An infinite learning rate blows the update up: with nonfinite='skip' the step is flagged
    and its state kept, as for the one-pass step."""
    config = tiny_config(2)
    config.batch_size, config.probe.clean_every = 8, 2
    model = pretrain.make_model(config, 10)
    state = jax.device_get(pretrain.init_state(model, config, 1, float("inf")))
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=True)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, 8, dtype=np.int32)}  # fmt: skip
    new, metrics = step(dp.replicate(state), jax.device_put(batch, dp.batch_sharding))
    assert float(metrics["nonfinite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1
    for kept, old in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(kept, old)
