"""Multi-device: every stage's mapped train step on 8 CPU devices equals one device on the whole
batch, with both backends; and the comparison catches a step that forgot to average replicas."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from devices import xla_flags

HERE = pathlib.Path(__file__).resolve().parent
KINDS = ("pretrain", "finetune", "distill")


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    result = subprocess.run(
        [sys.executable, str(HERE / "multidevice" / "compare_steps.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def failures(diffs: dict[str, float], scale: dict[str, float]) -> list[str]:
    """The quantities whose 8-device value is not the 1-device one up to float rounding.

    Bounds are relative to each quantity's size (at least 1; the update: its own size): summing
    over 8 devices in another order moves the last bits; a gradient or statistic not averaged over
    replicas (or averaged twice, the shard_map check_vma trap: ~7x) is off by its own order.
    """
    bounds = {"metrics": 1e-4, "batch_stats": 1e-4, "params": 5e-5, "grads": 1e-4, "update": 1e-3}
    found = []
    for key, bound in bounds.items():
        if key in diffs:
            limit = bound * (scale[key] if key == "update" else max(1.0, scale[key]))
            if not diffs[key] <= limit:
                found.append(f"{key}: {diffs[key]:.3g} > {limit:.3g}")
    return found


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
@pytest.mark.parametrize("kind", KINDS)
def test_eight_devices_equal_one(report, kind, backend):
    assert report["devices"] == 8
    scale = report["scale"][kind]
    assert scale["update"] > 1e-4, scale  # the comparison is not between zeros
    assert "grads" not in scale or scale["grads"] > 1e-3, scale
    assert failures(report[kind][backend], scale) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_forgotten_average_over_replicas_is_caught(report, kind):
    """The same step with parallel.replica_mean replaced by the identity: each replica keeps its
    own gradients (and statistics), and the comparison above must reject it."""
    caught = failures(report[kind]["forgot_pmean"], report["scale"][kind])
    assert any(line.startswith(("params", "update", "grads")) for line in caught), caught


def test_batch_must_divide_devices():
    import types

    import numpy as np

    from simclr_jax import parallel

    eight_devices = types.SimpleNamespace(devices=np.zeros(8))
    with pytest.raises(ValueError, match="batch_size=12 does not divide over 8 devices"):
        parallel.check_divisible("batch_size", 12, eight_devices)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        parallel.check_divisible("batch_size", 0, eight_devices)
    parallel.check_divisible("batch_size", 16, eight_devices)
