"""SimCLRv2's memory of negatives: the FIFO queue, the EMA, the step's wiring, 8 devices, resume.

The step-level checks use one subprocess on 8 forced CPU devices (tests/multidevice/memory_queue.py):
it runs the memory step on 1 and on 8 devices from a known queue and saves the arrays that the tests
below compare with NumPy.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from devices import xla_flags

from simclr_jax import memory, pretrain
from simclr_jax.configs import pretrain_fashion_mnist, pretrain_imagenet

HERE = pathlib.Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- NumPy references


def numpy_nt_xent(z_a, z_b, temperature, negatives):
    """NT-Xent in float64 with extra negatives: each view against the 2N-1 others plus the queue.

    Zero rows stay zero (similarity 0): what an unmasked, unfilled queue slot would contribute.
    """
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    z_a, z_b = unit(np.asarray(z_a, np.float64)), unit(np.asarray(z_b, np.float64))
    negatives = unit(np.asarray(negatives, np.float64))
    views, n = np.concatenate([z_a, z_b]), len(z_a)
    total = 0.0
    for i, view in enumerate(views):
        others = np.delete(views, i, axis=0)
        logits = np.concatenate([others, negatives]) @ view / temperature
        top = logits.max()
        positive = views[(i + n) % (2 * n)] @ view / temperature
        total += top + np.log(np.exp(logits - top).sum()) - positive
    return total / n


def numpy_ring(pushed: list[np.ndarray], size: int, dim: int) -> np.ndarray:
    """The i-th row ever pushed sits in slot i mod size; only the newest `size` rows survive."""
    ring = np.zeros((size, dim), np.float32)
    for i in range(max(0, len(pushed) - size), len(pushed)):
        ring[i % size] = pushed[i]
    return ring


# ----------------------------------------------------------------------------- queue and EMA


def test_queue_is_first_in_first_out_and_wraps_around():
    size, per_push, dim = 10, 4, 3  # 10 is no multiple of 4: pushes straddle the end
    bank = memory.create({"w": jnp.ones(2)}, {}, size=size, dim=dim)
    assert int(bank.count) == 0 and not np.any(bank.valid_mask())  # starts empty
    push = jax.jit(memory.enqueue)
    rng = np.random.default_rng(0)
    pushed: list[np.ndarray] = []
    for _ in range(6):
        keys = rng.normal(size=(per_push, dim)).astype(np.float32)
        bank = push(bank, keys)
        pushed.extend(keys)
        np.testing.assert_array_equal(bank.queue, numpy_ring(pushed, size, dim))
        assert int(bank.pointer) == len(pushed) % size
        assert int(bank.count) == min(len(pushed), size)
        np.testing.assert_array_equal(bank.valid_mask(), np.arange(size) < min(len(pushed), size))
    with pytest.raises(ValueError, match="cannot push 11 keys"):
        memory.enqueue(bank, np.zeros((11, dim), np.float32))


def test_ema_update_matches_numpy_to_one_ulp():
    rng = np.random.default_rng(1)
    shapes = {"kernel": (7, 5), "bn": {"scale": (5,), "bias": (5,)}}
    draw = lambda shape: rng.normal(size=shape).astype(np.float32)
    ema = jax.tree.map(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))
    params = jax.tree.map(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))
    decay = 0.999
    got = jax.jit(functools.partial(memory.ema_update, decay=decay))(ema, params)
    leaves = (jax.tree.leaves(tree) for tree in (got, ema, params))
    for g, e, p in zip(*leaves, strict=True):
        expected = np.float32(decay) * e + np.float32(1.0 - decay) * p  # float32 arithmetic
        np.testing.assert_array_max_ulp(np.asarray(g), expected, maxulp=1)
        assert not np.allclose(g, e, rtol=1e-6, atol=0)  # it moved


@pytest.mark.parametrize(
    "field,value,needle",
    [("size", 16, "memory.size must be at least"), ("ema_decay", 1.5, "memory.ema_decay")],
)
def test_bad_memory_config_names_the_field(field, value, needle):
    config = ml_collections.ConfigDict({"enabled": True, "size": 64, "ema_decay": 0.99})
    config[field] = value
    with pytest.raises(ValueError, match=needle):
        memory.check_config(config, global_batch=32)


# ----------------------------------------------------------------------------- the step (8 CPUs)


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_queue") / "run.npz"
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    result = subprocess.run(
        [sys.executable, str(HERE / "multidevice" / "memory_queue.py"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, dict(np.load(out))


def _tree(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix + "[")}


def test_step_loss_uses_the_valid_queue_rows_before_the_push(step_run):
    report, arrays = step_run
    before, filled, tau = arrays["before_queue"], report["filled"], report["temperature"]
    expected = numpy_nt_xent(arrays["z_a"], arrays["z_b"], tau, before[:filled])
    np.testing.assert_allclose(arrays["losses_one"][0], expected, rtol=2e-5)
    # What it must not equal: the loss without the queue, or with the unfilled rows as negatives.
    np.testing.assert_array_equal(before[filled:], 0.0)
    for wrong in (before[:0], before):
        assert abs(numpy_nt_xent(arrays["z_a"], arrays["z_b"], tau, wrong) - expected) > 1e-3


def test_step_pushes_the_ema_keys_of_view_b_first_in_first_out(step_run):
    report, arrays = step_run
    before, after, keys = arrays["before_queue"], arrays["after_queue"], arrays["keys"]
    filled, size, batch = report["filled"], report["queue"], report["batch"]
    tail = size - filled  # the first keys fill the end of the queue, the rest wrap to slot 0
    np.testing.assert_allclose(after[filled:], keys[:tail], atol=2e-5)
    np.testing.assert_allclose(after[: len(keys) - tail], keys[tail:], atol=2e-5)
    np.testing.assert_array_equal(
        after[len(keys) - tail : filled], before[len(keys) - tail : filled]
    )
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, rtol=1e-5)
    assert report["pointer"] == [(filled + batch * k) % size for k in (1, 2, 3)]
    assert report["count"] == [size] * 3


def test_step_moves_the_ema_after_the_optimizer_update(step_run):
    report, arrays = step_run
    decay = report["decay"]
    before, after = _tree(arrays, "before_params"), _tree(arrays, "after_params")
    ema = _tree(arrays, "after_ema_params")
    assert ema.keys() == after.keys() and len(ema) > 20
    for path, value in ema.items():
        expected = np.float32(decay) * before[path] + np.float32(1.0 - decay) * after[path]
        # Two float32 roundings (or one, if XLA fuses a multiply-add) either side: 2 ulp at most.
        np.testing.assert_array_max_ulp(value, expected, maxulp=2)
    # The EMA network's BN moving averages come from its own train-mode forward pass.
    stats = _tree(arrays, "after_ema_batch_stats")
    reference = _tree(arrays, "reference_ema_batch_stats")
    for path, value in stats.items():
        np.testing.assert_allclose(value, reference[path], rtol=1e-4, atol=1e-6)


def test_eight_devices_hold_the_same_memory_as_one(step_run):
    report, arrays = step_run
    assert report["devices"] == 8
    assert all(spread == 0.0 for spread in report["replica_spread"].values()), report
    first, last = report["eight_vs_one_first"], report["eight_vs_one_last"]
    assert first["pointer"] == first["count"] == last["pointer"] == last["count"] == 0
    assert first["queue"] < 1e-5 and first["ema_params"] < 1e-5, first
    assert first["ema_batch_stats"] < 1e-5 and first["params"] < 5e-5, first
    # Three LARS steps later float rounding (reduction order over 8 replicas) has been amplified by
    # training, but the unit-norm keys still agree to ~1e-3.
    assert last["queue"] < 2e-3, last
    np.testing.assert_allclose(arrays["losses_eight"][:2], arrays["losses_one"][:2], rtol=1e-5)
    np.testing.assert_allclose(arrays["losses_eight"], arrays["losses_one"], rtol=1e-3)


# ----------------------------------------------------------------------------- resume


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_resume_restores_the_queue_and_the_ema(tmp_path):
    config = pretrain_fashion_mnist.get_config("tiny")  # batch 32, 4 steps, checkpoints every 2
    config.dataset.train_split = "train[:1024]"
    config.dataset.eval_split = ""
    config.log_every_steps = 1
    config.memory.enabled = True
    config.memory.size = 48  # the second push wraps around
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.train_and_evaluate(config, str(straight))
    assert pretrain.train_and_evaluate(config, str(resumed), stop_at_step=2)["step"] == 2
    assert pretrain.train_and_evaluate(config, str(resumed))["step"] == 4

    expected, got = read_losses(straight), read_losses(resumed)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    # The final states are bit-identical, queue and EMA included.
    final = [
        ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "4" / "state")
        for workdir in (straight, resumed)
    ]
    assert int(final[0]["memory"]["count"]) == 48 and int(final[0]["memory"]["pointer"]) == 32
    flat = [jax.tree_util.tree_flatten_with_path(tree)[0] for tree in final]
    assert [path for path, _ in flat[0]] == [path for path, _ in flat[1]]
    for (path, a), (_, b) in zip(*flat, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_memory_is_off_by_default_and_on_in_the_v2_presets():
    assert not pretrain_imagenet.get_config("v1").memory.enabled
    v2 = pretrain_imagenet.get_config("r152_3x_sk1").memory
    assert (v2.enabled, v2.size, v2.ema_decay) == (True, 65536, 0.999)
