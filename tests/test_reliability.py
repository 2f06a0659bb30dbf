"""Reliability: preemption by a real SIGTERM, non-finite losses, and bad input failing fast and clearly."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from devices import xla_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simclr_jax import pretrain, validation
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.models import build_model
from simclr_jax.train import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{pretrain_fashion_mnist.__file__}:tiny"
SMALL_SPLITS = ["--config.dataset.train_split=train[:1024]", "--config.dataset.eval_split="]


def tiny_config():
    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.train_split = "train[:1024]"
    config.dataset.eval_split = ""
    return config


def losses_by_step(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def pretrain_command(workdir, *overrides):
    return [
        sys.executable, "-m", "simclr_jax.pretrain", f"--config={TINY}", f"--workdir={workdir}",
        "--config.num_steps=30", "--config.log_every_steps=1", "--config.checkpoint_every_steps=100",
        *SMALL_SPLITS, *overrides,
    ]  # fmt: skip


def test_sigterm_saves_exits_cleanly_and_resumes_to_the_same_losses(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reference = subprocess.run(
        pretrain_command(straight), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    process = subprocess.Popen(
        pretrain_command(interrupted),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    metrics_file = interrupted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics_file.exists() and len(losses_by_step(interrupted)) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped_at = checkpoint.CheckpointManager(str(interrupted)).latest_step()
    assert stopped_at is not None and 3 <= stopped_at < 30, stopped_at
    line = (
        f"Stopped by signal 15 (SIGTERM) after step {stopped_at} with a checkpoint; rerun the "
        "same command to resume."
    )
    assert sum(line in row for row in stderr.splitlines()) == 1, stderr[-2000:]

    resumed = subprocess.run(
        pretrain_command(interrupted), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from step {stopped_at}" in resumed.stderr
    expected, got = losses_by_step(straight), losses_by_step(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    # Data order and augmentation derive from (seed, step) and the optimizer state is restored
    # exactly, so the same program on the same CPU reproduces the losses bit for bit.
    np.testing.assert_array_equal(
        [got[s] for s in range(1, 31)], [expected[s] for s in range(1, 31)]
    )


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config()
    config.num_steps = 6
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    config.optim.name = "momentum"
    config.optim.base_lr = 1e30  # the updates blow the parameters up within a few steps
    with pytest.raises(loop.NonFiniteLossError, match=r"NaN/inf at step (\d+)") as error:
        pretrain.train_and_evaluate(config, str(tmp_path))
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert "--config.nonfinite=skip" in str(error.value)
    # Checkpoints were saved every step up to, and never including, the bad one.
    latest = checkpoint.CheckpointManager(str(tmp_path)).latest_step()
    assert latest == bad_step - 1 or (latest is None and bad_step == 1)


def test_nonfinite_steps_can_be_skipped(tmp_path):
    config = tiny_config()
    config.num_steps = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    config.optim.name = "momentum"
    config.optim.base_lr = 1e30
    config.nonfinite = "skip"
    results = pretrain.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flags = [row["nonfinite"] for row in rows if "nonfinite" in row]
    assert len(flags) == 3 and sum(flags) >= 1
    # The bad updates were dropped: the saved parameters are all finite.
    model = build_model(config.model, num_classes=10, image_size=28)
    images = jax.numpy.zeros((1, 28, 28, 1))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    saved = checkpoint.restore_weights(str(tmp_path), {"params": abstract["params"]})
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved))


BAD_VALUES = [
    ("batch_size", 0, "batch_size must be positive"),
    ("batch_size", -8, "batch_size must be positive"),
    ("optim.base_lr", 0.0, "optim.base_lr must be positive"),
    ("optim.base_lr", -0.1, "optim.base_lr must be positive"),
    ("optim.name", "sgdd", "optim.name must be one of"),
    ("optim.lr_scaling", "cubic", "optim.lr_scaling must be one of"),
    ("loss.temperature", 0.0, "loss.temperature must be positive"),
    ("model.depth", 3, "model.depth must be the number of 3x3 convs of the convnet"),
    ("model.backbone", "vgg", "model.backbone must be one of"),
    ("model.sk_ratio", -0.5, "model.sk_ratio must be"),
    ("model.ft_proj_selector", 5, "model.ft_proj_selector must be an integer in -1..2"),
    ("model.proj_head_mode", "deep", "model.proj_head_mode must be one of"),
    ("dataset.image_size", 4, "image_size must be an integer >= 8"),
    ("dataset.source", "ftp", "dataset.source must be one of"),
    ("dataset.train_split", "train[::2]", "dataset.train_split"),
    ("dtype", "float16", "dtype must be one of"),
    ("parallel.backend", "xmap", "parallel.backend must be one of"),
    ("nonfinite", "ignore", "nonfinite must be one of"),
    ("augment.crop_min_area", 1.5, "augment.crop_min_area must be in (0, 1]"),
    ("augment.brightness", "additve", "augment.brightness must be one of"),
]


def set_field(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    with node.unlocked():
        node[leaf] = value


RESNET_BAD_VALUES = [  # on the tiny config with a ResNet backbone instead of its convnet
    ("model.depth", 19, "model.depth must be one of"),
    ("model.depth", 4, "model.depth must be one of"),
]


@pytest.mark.parametrize(
    "backbone,field,value,message",
    [("convnet", *case) for case in BAD_VALUES] + [("resnet", *case) for case in RESNET_BAD_VALUES],
)
def test_bad_values_fail_before_anything_is_loaded(tmp_path, backbone, field, value, message):
    config = tiny_config()
    set_field(config, "model.backbone", backbone)
    set_field(config, field, value)
    start = time.time()
    with pytest.raises(ValueError) as error:
        pretrain.train_and_evaluate(config, str(tmp_path))
    assert message in str(error.value)
    assert time.time() - start < 5  # no data loading, no compilation
    assert not (tmp_path / "checkpoints").exists()


def test_batch_that_does_not_divide_the_devices(tmp_path):
    script = (
        "from simclr_jax.configs import pretrain_fashion_mnist as p;"
        "from simclr_jax import pretrain; c = p.get_config('tiny'); c.batch_size = 12;"
        f"pretrain.train_and_evaluate(c, {str(tmp_path)!r})"
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "batch_size=12 does not divide over 8 devices" in result.stderr


def test_unknown_dataset_and_split_are_named(tmp_path):
    config = tiny_config()
    config.dataset.source = "local"
    config.dataset.name = "mnist_fashion"
    with pytest.raises(ValueError, match="mnist_fashion"):
        pretrain.train_and_evaluate(config, str(tmp_path / "a"))
    config = tiny_config()
    config.dataset.train_split = "validation"
    with pytest.raises(ValueError, match="validation"):
        pretrain.train_and_evaluate(config, str(tmp_path / "b"))


def test_missing_tfds_dataset_fails_fast_offline(tmp_path):
    config = tiny_config()
    config.dataset.source = "tfds"
    config.dataset.name = "cifar10"
    config.dataset.data_dir = str(tmp_path / "empty_tfds")
    (tmp_path / "empty_tfds").mkdir()  # a tfds folder without the dataset (a missing one: test_cli)
    start = time.time()
    with pytest.raises((ValueError, FileNotFoundError), match="cifar10"):
        pretrain.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.time() - start < 60


def test_checkpoint_of_another_architecture_names_the_paths(tmp_path):
    config = tiny_config()
    config.num_steps = 1
    pretrain.train_and_evaluate(config, str(tmp_path))
    wider = tiny_config()
    wider.num_steps = 2
    wider.model.base_width = 8
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=re.escape(
            "params/backbone/block_group1/conv1/kernel "
            "(checkpoint (3, 3, 2, 4), model (3, 3, 8, 16))"
        ),
    ):  # (accepted: without the flag the config check refuses first, naming model.base_width)
        pretrain.train_and_evaluate(wider, str(tmp_path), accept_config_changes=True)


def test_unreadable_images_are_skipped_or_fatal(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "train" / "dogs" / "broken.png").write_bytes(b"not a png")
    config = tiny_config()
    config.dataset.name = "folder"
    config.dataset.source = "folder"
    config.dataset.data_dir = str(tmp_path)
    config.dataset.train_split = "train"
    config.dataset.image_size = 8
    from simclr_jax.data import sources

    arrays = sources.load_split(config.dataset, "train")
    assert arrays.images.shape == (4, 8, 8, 3)
    config.dataset.bad_images = "error"
    with pytest.raises(ValueError, match="broken.png"):
        sources.load_split(config.dataset, "train")


# Every invalid value of a field is reported by our validation, naming the field, before jax runs.
INVALID = {
    "batch_size": st.integers(max_value=0),
    "eval_batch_size": st.integers(max_value=0),
    "num_steps": st.integers(max_value=-1),
    "log_every_steps": st.integers(max_value=0),
    "optim.base_lr": st.floats(max_value=0.0, allow_nan=False),
    "optim.weight_decay": st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False),
    "optim.momentum": st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
    "optim.name": st.text(min_size=1, max_size=8).filter(
        lambda s: s not in validation.optim.OPTIMIZERS
    ),
    "loss.temperature": st.floats(max_value=0.0, allow_nan=False),
    "model.depth": st.integers(max_value=3),  # the tiny config's convnet (ResNet depths: above)
    "model.width_multiplier": st.integers(max_value=0),
    "model.sk_ratio": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
    "model.num_proj_layers": st.integers(max_value=0),
    "model.ft_proj_selector": st.integers().filter(lambda k: not 0 <= k <= 2),
    "model.fine_tune_after_block": st.integers().filter(lambda k: not -1 <= k <= 4),
    "dataset.image_size": st.integers(max_value=7),
    "augment.crop_min_area": st.floats(min_value=1.0001, allow_nan=False, allow_infinity=False),
    "dtype": st.text(max_size=10).filter(lambda s: s not in validation.DTYPES),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_invalid_override_gets_our_message(data):
    field = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(INVALID[field])
    config = tiny_config()
    set_field(config, field, value)
    with pytest.raises(ValueError) as error:
        validation.validate_pretrain(config)
    leaf = field.split(".")[-1]
    assert leaf in str(error.value), (field, value, str(error.value))
    # Raised by our checks, not from inside jax/flax/optax.
    assert "site-packages" not in error.traceback[-1].path.as_posix()
