"""Faults of long real runs, end to end (issue 15): each test fails on the code before the fix.

Tiny pretraining runs on 256 real Fashion-MNIST images: corrupt checkpoints, a changed config on
resume, two runs on one workdir, a streamed run resumed, metric names, a finished run rerun, a
pretraining workdir given as a teacher, and a full disk.
"""

import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_checkpoint import corrupt_silently, largest_file

from simclr_jax import distill, pretrain
from simclr_jax.configs import distill_fashion_mnist, pretrain_fashion_mnist
from simclr_jax.train import checkpoint, config_history
from simclr_jax.train.workdir_lock import WorkdirLockedError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/pretrain_fashion_mnist.py:tiny"
NO_TF = "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; " + (
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def tiny(num_steps=6, **fields):
    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.train_split = "train[:256]"
    config.dataset.eval_split = ""
    config.num_steps = num_steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    for dotted, value in fields.items():
        *parents, leaf = dotted.split("__")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def rows(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(workdir):
    found = [(row["step"], row["loss"]) for row in rows(workdir) if "loss" in row]
    assert len(found) == len(dict(found)), "a step was logged twice"
    return dict(found)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run: the reference every interrupted run must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    results = pretrain.train_and_evaluate(tiny(), str(workdir))
    return workdir, results


def test_corrupt_newest_checkpoint_is_set_aside_and_the_run_goes_on(tmp_path, straight, caplog):
    pretrain.train_and_evaluate(tiny(), str(tmp_path), stop_at_step=4)
    # The largest array data file (TensorStore's, under .../d/; a tiny model's metadata is larger).
    data_file = largest_file(
        tmp_path / "checkpoints" / "4" / "state", lambda p: p.parent.name == "d"
    )
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    results = pretrain.train_and_evaluate(tiny(), str(tmp_path))
    assert results["step"] == 6
    assert (tmp_path / "corrupt_checkpoints" / "4" / "state").is_dir()
    # One line naming the step, the cause (TensorStore's innermost error, not its repr of the
    # whole store) with paths inside the checkpoints folder shortened, and where the step went.
    [warning] = [r.getMessage() for r in caplog.records if "moved to" in r.getMessage()]
    aside = tmp_path / "corrupt_checkpoints" / "4"
    cause = re.fullmatch(
        rf"checkpoint step 4 is unreadable or corrupt \((.+)\); moved to {re.escape(str(aside))}; "
        "trying an older one",
        warning,
    ).group(1)
    assert "\n" not in warning and len(cause) < 250, cause
    assert "4/state" in cause and str(tmp_path) not in cause, cause
    assert not re.search(r"pybind11|TensorStore\(|<bound method| at 0x", cause), cause
    # Steps 3 and 4 were trained again from step 2 and saved again; the run ends as it should.
    expected = losses(straight[0])
    assert losses(tmp_path) == expected
    # And the next rerun does not crash either (no StepAlreadyExistsError loop).
    assert pretrain.train_and_evaluate(tiny(), str(tmp_path))["step"] == 6


def test_silently_corrupted_checkpoint_is_never_trained_on(tmp_path, straight):
    pretrain.train_and_evaluate(tiny(), str(tmp_path), stop_at_step=4)
    step_dir = tmp_path / "checkpoints" / "4"
    corrupt_silently(step_dir, ocp.StandardCheckpointer().restore(step_dir / "state"))
    pretrain.train_and_evaluate(tiny(), str(tmp_path))
    expected, got = losses(straight[0]), losses(tmp_path)
    np.testing.assert_array_equal([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)])


def test_streamed_run_resumes_with_the_batches_of_an_uninterrupted_one(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")  # the [tfds] extra; make test installs it

    def config():
        c = tiny(num_steps=4, dataset__name="imagenet2012", dataset__source="tfds")
        c.dataset.train_split = "train"
        c.dataset.image_size = 32  # the ImageNet stem needs 32 px at least
        c.batch_size = 8
        c.probe.clean_every = 0  # the host streams crops: the probe trains on them (as ImageNet's)
        return c

    with tfds.testing.mock_data(num_examples=20):
        pretrain.train_and_evaluate(config(), str(tmp_path / "straight"))
        pretrain.train_and_evaluate(config(), str(tmp_path / "resumed"), stop_at_step=2)
        pretrain.train_and_evaluate(config(), str(tmp_path / "resumed"))
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_array_equal([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)])


def test_changed_config_is_refused_naming_the_fields_until_accepted(tmp_path, caplog):
    pretrain.train_and_evaluate(tiny(), str(tmp_path), stop_at_step=2)
    saved = (tmp_path / "config.json").read_text()
    changed = tiny(batch_size=64, seed=3)
    with pytest.raises(config_history.ConfigChangedError) as error:
        pretrain.train_and_evaluate(changed, str(tmp_path))
    message = str(error.value)
    assert "batch_size 32 -> 64" in message and "seed 0 -> 3" in message
    assert "--accept_config_changes" in message
    assert (tmp_path / "config.json").read_text() == saved  # not overwritten
    assert checkpoint.CheckpointManager(str(tmp_path)).latest_step() == 2
    # A change that does not alter the run passes; one accepted on purpose is recorded. Each
    # is said in one line when the run resumes.
    caplog.set_level(logging.INFO)
    pretrain.train_and_evaluate(tiny(log_every_steps=2), str(tmp_path), stop_at_step=4)
    results = pretrain.train_and_evaluate(changed, str(tmp_path), accept_config_changes=True)
    assert results["step"] == 6
    history_file = tmp_path / config_history.HISTORY_FILE
    said = [r for r in caplog.records if r.getMessage().startswith("resuming ")]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        (
            "INFO",
            f"resuming {tmp_path} at step 2 with changes that leave the run as it was: "
            f"log_every_steps 1 -> 2 (recorded in {history_file})",
        ),
        (
            "WARNING",
            f"resuming {tmp_path} at step 4 with config changes accepted by "
            f"--accept_config_changes: batch_size 32 -> 64; seed 0 -> 3 (recorded in "
            f"{history_file})",
        ),
        (
            "INFO",
            f"resuming {tmp_path} at step 4 with changes that leave the run as it was: "
            f"log_every_steps 2 -> 1 (recorded in {history_file})",
        ),
    ]
    history = config_history.read_history(tmp_path)
    assert [h["accepted"] for h in history] == [[], ["batch_size", "seed"]]
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 64


def test_second_run_on_a_live_workdir_is_refused_with_host_and_pid(tmp_path):
    command = [
        sys.executable, "-c", NO_TF, "simclr_jax.pretrain", f"--config={TINY}",
        f"--workdir={tmp_path}", "--config.num_steps=100000", "--config.log_every_steps=1",
        "--config.dataset.train_split=train[:256]", "--config.dataset.eval_split=",
    ]  # fmt: skip
    first = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if (tmp_path / "metrics.jsonl").exists() and rows(tmp_path):
                break
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        start = time.time()
        # Read-only: a writing manager would delete the live run's unfinished checkpoint.
        latest = checkpoint.read_only_manager(tmp_path / "checkpoints").latest_step() or 0
        with pytest.raises(WorkdirLockedError) as error:  # (without a lock: 2 steps, no error)
            pretrain.train_and_evaluate(
                tiny(num_steps=100000), str(tmp_path), stop_at_step=latest + 2
            )
        assert time.time() - start < 30  # refused before any data or compilation
        assert f"PID {first.pid}" in str(error.value) and socket.gethostname() in str(error.value)
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-4000:]
    assert not (tmp_path / "lock.json").exists()


def test_finished_run_rerun_returns_its_results_and_metric_names_are_distinct(tmp_path):
    config = tiny(num_steps=2, dataset__eval_split="test[:200]")
    config.eval_batch_size = 100
    first = pretrain.train_and_evaluate(config, str(tmp_path))
    again = pretrain.train_and_evaluate(config, str(tmp_path))
    assert again == first and again["step"] == 2
    # The online probe's training loss and its evaluation loss are two metrics, not one name.
    records = rows(tmp_path)
    train_names = {k for row in records if "loss" in row for k in row} - {"step"}
    eval_names = {k for row in records if any("top1" in k for k in row) for k in row} - {"step"}
    assert eval_names and train_names and not train_names & eval_names
    saved = json.loads((tmp_path / "results.json").read_text())
    assert train_names | eval_names <= set(saved)


def test_pretraining_workdir_as_teacher_is_an_error(straight):
    config = distill_fashion_mnist.get_config("tiny")
    config.teacher_checkpoint = str(straight[0])
    with pytest.raises(ValueError, match="pretraining") as error:
        distill.train_and_evaluate(config, str(straight[0].parent / "student"))
    assert "finetune" in str(error.value) and "\n" not in str(error.value)


def test_full_disk_ends_with_no_space_left_on_device(tmp_path):
    """A real full disk: a 700 KB tmpfs in a private mount namespace (unshare -rm)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f'mount -t tmpfs -o size=700k none {disk} && exec {sys.executable} -c "$0" "$@"'
    command = [
        "unshare", "-rm", "sh", "-c", script, NO_TF, "simclr_jax.pretrain", f"--config={TINY}",
        f"--workdir={disk / 'run'}", "--config.num_steps=40", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2", "--config.dataset.train_split=train[:256]",
        "--config.dataset.eval_split=",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "No space left on device" in lines[-1], result.stderr[-3000:]
    assert len(lines[-1]) < 400, lines[-1]
    # That last line is the only word on it: orbax's write threads each log the error with a
    # traceback, and none of that reaches the user.
    assert sum("No space left" in line or "RESOURCE_EXHAUSTED" in line for line in lines) == 1
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    assert os.path.exists(disk)
