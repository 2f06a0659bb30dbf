"""Multi-device: the mapped pretraining step on 8 CPU devices equals one device on the whole batch."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, str(HERE / "multidevice" / "compare_steps.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_eight_devices_equal_one(report, backend):
    assert report["devices"] == 8
    assert report["scale"]["grads"] > 1e-3  # the comparison is not between zeros
    diffs = report[backend]
    # Gradients N times too large (the shard_map check_vma trap) would differ by ~7x their scale.
    assert diffs["grads"] < 1e-4 * max(1.0, report["scale"]["grads"]), diffs
    assert diffs["metrics"] < 1e-4, diffs
    assert diffs["batch_stats"] < 1e-4, diffs
    assert diffs["params"] < 5e-5, diffs


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
