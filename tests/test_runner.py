"""The runner's lifecycle on a tiny stage (tests/multiprocess/runner_worker.py), in one process:
when it saves, how a stop request ends a run, the transfer guard, and closing on failure."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import pytest

from simclr_jax import parallel
from simclr_jax.train import checkpoint, loop, metrics, runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "runner_worker", ROOT / "tests" / "multiprocess" / "runner_worker.py"
)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
worker.STEP_SECONDS = 0.0


@pytest.fixture(scope="module")
def dp():
    return parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))


def run(dp, workdir, num_steps: int, **changes):
    """runner.run on the tiny stage; `changes` replace config fields or Stage fields."""
    config = worker.config(num_steps)
    stage = worker.stage(num_steps, dp.mesh)
    for name, value in changes.items():
        if name in config:
            config[name] = value
        else:
            stage = dataclasses.replace(stage, **{name: value})
    return runner.run(config, str(workdir), dp, stage)


def test_saves_every_period_and_at_the_end_only(dp, tmp_path):
    results = run(dp, tmp_path, 7, checkpoint_every_steps=3, keep_checkpoints=5)
    assert results["step"] == 7 and "preempted_at_step" not in results
    assert checkpoint.CheckpointManager(tmp_path).all_steps() == [3, 6, 7]
    assert json.loads((tmp_path / metrics.RESULTS_FILE).read_text())["step"] == 7


def test_a_stop_request_ends_the_run_after_its_step_with_a_checkpoint(dp, tmp_path):
    stage = worker.stage(10, dp.mesh)

    def batch_for_step(step: int):
        if step == 2:  # arrives during step 2: step 3 is the last
            os.kill(os.getpid(), signal.SIGTERM)
        return stage.batch_for_step(step)

    before = signal.getsignal(signal.SIGTERM)
    results = run(dp, tmp_path, 10, batch_for_step=batch_for_step)
    assert results["step"] == results["preempted_at_step"] == 3
    assert checkpoint.CheckpointManager(tmp_path).all_steps() == [3]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the caller's again
    assert run(dp, tmp_path, 10)["step"] == 10  # the rerun resumes and finishes


def test_the_steady_state_allows_no_implicit_transfer(dp, tmp_path):
    """After the compiling step the loop runs under jax.transfer_guard('disallow'): a batch left
    on the host (an implicit transfer into the step) fails; device batches run."""
    stage = worker.stage(3, dp.mesh)
    host_batches = lambda step: jax.device_get(stage.batch_for_step(step))  # noqa: E731
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        run(dp, tmp_path / "host", 3, batch_for_step=host_batches)
    assert run(dp, tmp_path / "device", 3)["step"] == 3


def test_a_failing_run_still_closes_its_checkpoints_and_writers(dp, tmp_path, monkeypatch):
    closed = []
    for name in ("wait", "close"):
        original = getattr(checkpoint.CheckpointManager, name)
        monkeypatch.setattr(
            checkpoint.CheckpointManager,
            name,
            lambda self, _o=original, _n=name: (closed.append(_n), _o(self))[1],
        )
    create_writer = metrics.create_writer

    def recording_writer(*args, **kwargs):
        writer = create_writer(*args, **kwargs)
        close = writer.close
        writer.close = lambda: (closed.append("writer"), close())[1]
        return writer

    monkeypatch.setattr(metrics, "create_writer", recording_writer)
    stage = worker.stage(5, dp.mesh)

    def nan_step(state, batch):
        new_state, aux = stage.step(state, batch)
        return new_state, dict(aux, loss=aux["loss"] * jnp.nan)

    with pytest.raises(loop.NonFiniteLossError, match="NaN/inf at step 1"):
        run(dp, tmp_path, 5, step=nan_step)
    assert closed == ["writer", "wait", "close"]
