"""TrainState updates, metric writers (with and without TensorFlow), Progress, result files."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from simclr_jax.train import metrics
from simclr_jax.train.state import TrainState
from simclr_jax.train.task_progress import TaskProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def test_train_state_applies_optax_updates_and_replaces_batch_stats():
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    stats = {"bn": {"mean": jnp.zeros(3)}}
    tx = optax.sgd(0.5, momentum=0.9)
    state = TrainState.create(params, stats, tx)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert tx not in jax.tree.leaves(state)  # static: jit and orbax see only arrays

    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    new_stats = {"bn": {"mean": jnp.full(3, 7.0)}}
    stepped = jax.jit(TrainState.apply_gradients)(state, grads, new_stats)
    stepped = stepped.apply_gradients(grads, new_stats)

    # Two momentum-SGD steps by hand: v1 = g, v2 = 0.9 g + g; p -= lr * v.
    expected_kernel = np.arange(6.0).reshape(2, 3) - 0.5 * (2.0 + 3.8)
    np.testing.assert_allclose(stepped.params["dense"]["kernel"], expected_kernel, rtol=1e-6)
    np.testing.assert_allclose(stepped.params["dense"]["bias"], 1 - 0.5 * 5.8, rtol=1e-6)
    np.testing.assert_array_equal(stepped.batch_stats["bn"]["mean"], 7.0)
    assert int(stepped.step) == 2 and stepped.step.dtype == jnp.int32


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(not HAVE_TF, reason="tensorflow not installed")
def test_writer_with_tensorflow_writes_jsonl_and_tensorboard_events(tmp_path):
    writer = metrics.create_writer(tmp_path)
    writer.write_hparams({"lr": 0.1, "arch": "r18"})
    writer.write_scalars(3, {"loss": jnp.float32(1.25), "top1": np.float64(0.5)})
    writer.write_scalars(4, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"hparams": {"lr": 0.1, "arch": "r18"}},
        {"step": 3, "loss": 1.25, "top1": 0.5},
        {"step": 4, "loss": 1.0},
    ]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_writer_without_tensorboard_writes_jsonl_only(tmp_path):
    writer = metrics.create_writer(tmp_path, tensorboard=False)
    writer.write_scalars(3, {"loss": jnp.float32(1.25)})
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 3, "loss": 1.25}]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_non_main_process_writes_no_files(tmp_path):
    writer = metrics.create_writer(tmp_path, is_main=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == []


NO_TF_SCRIPT = """
import json, os, sys
sys.modules['tensorflow'] = None  # as on a machine without TensorFlow
from simclr_jax.train import metrics
writer = metrics.create_writer({workdir!r})
writer.write_hparams({{'seed': 1}})
writer.write_scalars(7, {{'loss': 2.5}})
progress = metrics.Progress(2, writer=writer, every_steps=1, batch_size=4)
progress(1)
writer.close()
assert metrics.clu_metric_writers() is None
assert 'clu.metric_writers' not in sys.modules
lines = [json.loads(line) for line in open(os.path.join({workdir!r}, 'metrics.jsonl'))]
assert lines[:2] == [{{'hparams': {{'seed': 1}}}}, {{'step': 7, 'loss': 2.5}}], lines
assert lines[2]['step'] == 1 and lines[2]['images_per_sec'] > 0, lines
assert os.listdir({workdir!r}) == ['metrics.jsonl']
print('OK')
"""


def test_writer_without_tensorflow_still_writes_jsonl(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_TF_SCRIPT.format(workdir=str(tmp_path)))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


class RecordingWriter:
    def __init__(self):
        self.records = []

    def write_scalars(self, step, scalars):
        self.records.append((step, dict(scalars)))


def test_progress_reports_rates_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    writer = RecordingWriter()
    start = time.monotonic()
    progress = metrics.Progress(10, writer=writer, every_steps=5, first_step=0, batch_size=4)
    assert not progress(4, now=start + 8.0)  # not a reporting step
    assert progress(5, now=start + 10.0)
    assert progress(10, now=start + 20.0)

    (step5, first), (step10, second) = writer.records
    assert (step5, step10) == (5, 10)
    assert first["steps_per_sec"] == pytest.approx(0.5, rel=1e-2)
    assert first["eta_sec"] == pytest.approx(10.0, rel=1e-2)
    assert first["images_per_sec"] == pytest.approx(2.0, rel=1e-2)
    assert second["steps_per_sec"] == pytest.approx(0.5)  # 5 steps in the last 10 s
    assert second["eta_sec"] == 0.0
    assert second["elapsed_sec"] == pytest.approx(20.0, rel=1e-2)
    log = caplog.text
    assert "step 5/10 (50.0%): 0.50 steps/s, 2.0 images/s" in log
    assert "ETA 10s" in log and "elapsed 20s" in log


def test_progress_shows_the_intervals_metrics_in_its_one_line(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    writer = RecordingWriter()
    start = time.monotonic()
    progress = metrics.Progress(10, writer=writer, every_steps=5, first_step=0)
    interval = {"loss": 1.234567, "nonfinite": 0.0, "train_top1": 0.5}
    assert progress(5, now=start + 10.0, metrics=interval)
    assert progress(7, now=start + 12.0, metrics={"loss": 0.5, "nonfinite": 1.0})  # a save step
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "step 5/10 (50.0%): loss=1.235, train_top1=0.5; 0.50 steps/s, elapsed 10s, ETA 10s",
        "step 7/10 (70.0%): loss=0.5, nonfinite=1; 1.00 steps/s, elapsed 12s, ETA 3s",
    ]
    assert [step for step, _ in writer.records] == [5, 7]  # the rates; the loop writes metrics
    # A slow first step (compilation) that is not a reporting step is said once, without an ETA.
    caplog.clear()
    progress = metrics.Progress(10, writer=writer, every_steps=5, first_step=0)
    assert not progress(1, now=time.monotonic() + 30.0)
    assert not progress(2, now=time.monotonic() + 31.0)
    assert [r.getMessage() for r in caplog.records] == [
        "step 1/10: the first step (it compiles) took 30s"
    ]


def test_task_progress_reports_at_most_every_interval_with_an_eta(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    slow = TaskProgress("Fitting", 4, unit=" fits", every_s=10.0, clock=lambda: now[0])
    for seconds in (6.0, 6.0, 6.0, 6.0):  # a report at 12 s (2 done), then the end at 24 s
        now[0] += seconds
        slow.advance()
    assert slow.lines == [
        "Fitting: 2/4 fits, elapsed 12s, ETA 12s",
        "Fitting: 4/4 fits in 24s",
    ]
    assert [r.getMessage() for r in caplog.records] == slow.lines
    quick = TaskProgress("Quick", 3, every_s=10.0, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 1.0
        quick.advance()
    assert quick.lines == []  # under 10 s in all: silent
    # The first item compiles: the ETA counts the items after it.
    compiling = TaskProgress("Fitting", 5, unit=" fits", every_s=10.0, clock=lambda: now[0])
    for seconds in (30.0, 2.0, 2.0, 2.0, 2.0):
        now[0] += seconds
        compiling.advance()
    assert compiling.lines == [
        "Fitting: 1/5 fits, elapsed 30s, ETA after the next (the first compiles)",
        "Fitting: 5/5 fits in 38s",
    ]


def test_progress_after_resume_counts_from_first_step():
    writer = RecordingWriter()
    start = time.monotonic()
    progress = metrics.Progress(100, writer=writer, every_steps=10, first_step=80)
    assert progress(90, now=start + 5.0)
    assert writer.records[0][1]["steps_per_sec"] == pytest.approx(2.0, rel=1e-2)
    assert writer.records[0][1]["eta_sec"] == pytest.approx(5.0, rel=1e-2)
    with pytest.raises(ValueError, match="every_steps"):
        metrics.Progress(10, writer=writer, every_steps=0)


def test_results_and_config_files(tmp_path):
    path = metrics.write_results_json(tmp_path, {"top1": jnp.float32(0.75), "count": 10}, step=9)
    assert json.loads(path.read_text()) == {"step": 9, "top1": 0.75, "count": 10}
    metrics.write_results_json(tmp_path, {"top1": 0.8}, step=10)  # replaced, not appended
    assert json.loads((tmp_path / "results.json").read_text()) == {"step": 10, "top1": 0.8}

    config = ml_collections.ConfigDict({"seed": 3, "model": {"depth": 18}, "dtype": jnp.float32})
    metrics.write_config(tmp_path, config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["seed"] == 3 and saved["model"] == {"depth": 18}
    assert sorted(os.listdir(tmp_path)) == ["config.json", "results.json"]  # no temp files left


def test_first_eta_excludes_the_compiling_step():
    # Step 1 compiles (49 s); then steps take 0.1 s. 25 steps remain after step 5: ETA 2.5 s.
    writer = RecordingWriter()
    start = time.monotonic()
    progress = metrics.Progress(30, writer=writer, every_steps=5, first_step=0)
    assert not progress(1, now=start + 49.0)
    for step in (2, 3, 4):
        assert not progress(step, now=start + 49.0 + 0.1 * (step - 1))
    assert progress(5, now=start + 49.4)
    ((step, scalars),) = writer.records
    assert step == 5
    assert scalars["steps_per_sec"] == pytest.approx(10.0, rel=1e-6)
    assert scalars["eta_sec"] == pytest.approx(2.5, rel=1e-6)
    assert scalars["elapsed_sec"] == pytest.approx(49.4, rel=1e-6)
    # Reporting every step after a resume at 80: step 81 compiles, so it shows no ETA yet.
    writer = RecordingWriter()
    progress = metrics.Progress(90, writer=writer, every_steps=1, first_step=80)
    assert progress(81, now=start + 30.0)
    assert progress(82, now=start + 30.5)
    (_, first), (_, second) = writer.records
    assert "eta_sec" not in first
    assert second["eta_sec"] == pytest.approx(4.0, rel=1e-6)  # 8 steps left at 2 steps/s


def test_records_of_redone_steps_are_dropped_on_resume(tmp_path):
    lines = [
        {"hparams": {"seed": 1}},
        *({"step": s, "loss": float(s)} for s in range(1, 8)),
        {"step": 5, "eval_top1": 0.5},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 8, "lo'  # cut short
    (tmp_path / "metrics.jsonl").write_text(text)
    assert metrics.drop_steps_after(tmp_path, 5, is_main=False) == 0  # only process 0 edits
    assert metrics.drop_steps_after(tmp_path, 5, is_main=True) == 3
    kept = read_jsonl(tmp_path / "metrics.jsonl")
    assert kept == [lines[0], *lines[1:6], lines[-1]]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    writer = metrics.JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write_scalars(6, {"loss": 6.5})
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1] == {"step": 6, "loss": 6.5}
