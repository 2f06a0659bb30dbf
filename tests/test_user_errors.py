"""A newcomer's first mistakes stop at once with one line that says what to do: fine-tuning with no
checkpoint to start from, an evaluation job on a workdir that does not exist, a preset or config
file that does not exist; and libraries the user did not ask for print no banners."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import time

import forked_commands
import pytest

from simclr_jax import cli, evaluate, saved_run
from simclr_jax.configs import (
    finetune_cifar10,
    finetune_fashion_mnist,
    finetune_imagenet,
    pretrain_imagenet,
    transfer_digits,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, pathlib.Path, float]]:
    """This file's `python -m` runs, side by side in children forked from one interpreter
    (tests/forked_commands.py): name -> (result, its workdir, seconds for all of them)."""
    root = tmp_path_factory.mktemp("user_errors")
    (root / "empty").mkdir()
    commands = {
        "no init": ("simclr_jax.finetune", "--config=finetune_fashion_mnist:tiny", root / "empty"),
        "no workdir": ("simclr_jax.evaluate", None, root / "typo"),
        "bad preset": ("simclr_jax.pretrain", "--config=pretrain_imagenet:r50_1x_sk9", root / "p"),
        "bad path": ("simclr_jax.finetune", "--config=configs/finetune_fashon_mnist.py:tiny",
                     root / "c"),
    }  # fmt: skip
    start = time.monotonic()
    done = forked_commands.run(
        [
            [module, *([config] if config else []), f"--workdir={workdir}"]
            for module, config, workdir in commands.values()
        ],
        cwd=ROOT,
    )
    seconds = time.monotonic() - start
    return {
        name: (result, workdir, seconds)
        for (name, (_, _, workdir)), result in zip(commands.items(), done, strict=True)
    }


def one_line_error(result: subprocess.CompletedProcess, program: str) -> str:
    """The error's text: exit status 1, no traceback, the last stderr line `<program>: error: `."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: "), result.stderr[-3000:]
    return last.removeprefix(f"{program}: error: ")


def test_fine_tuning_without_init_checkpoint_fails_in_one_line(runs):
    result, workdir, _ = runs["no init"]
    assert one_line_error(result, "simclr_jax.finetune") == (
        "config.init_checkpoint is not set: name the pretraining workdir to start from "
        "(--config.init_checkpoint=DIR), or --config.init_checkpoint=none to train from random "
        "weights (as the supervised recipes do)"
    )
    assert list(workdir.iterdir()) == []  # failed before anything was written


def test_only_the_supervised_recipes_start_from_random_weights_unasked():
    configs = {
        module: {p: module.get_config(p) for p in module.ARGUMENTS.presets}
        for module in (finetune_fashion_mnist, finetune_imagenet, transfer_digits)
    }
    for module, presets in configs.items():
        for preset, config in presets.items():
            scratch = module.ARGUMENTS.parse(preset).recipe == "supervised"
            assert config.init_checkpoint == ("none" if scratch else ""), (module, preset)
    assert saved_run.read_start("none", field="f", required=True) is None
    assert saved_run.read_start("", field="f", required=False) is None  # distillation's student
    with pytest.raises(ValueError, match="f is not set"):
        saved_run.read_start("", field="f", required=True)


def test_evaluating_a_workdir_that_does_not_exist_fails_within_30_s(runs):
    result, workdir, seconds = runs["no workdir"]
    assert seconds < 30  # this file's command-line runs, all of them
    assert one_line_error(result, "simclr_jax.evaluate") == (
        f"--workdir='{workdir}' does not exist: name the workdir of a training run "
        "(started or finished)"
    )


def test_the_evaluation_job_says_once_what_it_waits_for(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(saved_run.NoCheckpointYetError, match="holds no checkpoints"):
        evaluate.wait_for_run(str(tmp_path), poll_s=0.02, timeout_s=0.3)
    waiting = [r for r in caplog.records if "Waiting for the first checkpoint" in r.getMessage()]
    assert len(waiting) == 1 and str(tmp_path) in waiting[0].getMessage()


def test_a_bad_preset_lists_every_preset(runs):
    message = one_line_error(runs["bad preset"][0], "simclr_jax.pretrain")
    assert "'r50_1x_sk9' in 'r50_1x_sk9' is neither a preset nor key=value" in message
    presets = list(pretrain_imagenet.ARGUMENTS.presets)
    assert len(presets) == 25 and f"presets: {', '.join(presets)} " in message


def test_a_bad_config_path_lists_the_config_files(runs):
    message = one_line_error(runs["bad path"][0], "simclr_jax.finetune")
    assert message.startswith("--config: no config file 'configs/finetune_fashon_mnist.py'")
    assert f"({', '.join(cli.config_names())})" in message and "finetune_fashion_mnist" in message


def test_a_stage_lists_the_presets_of_its_own_configs():
    finetune = cli.config_help("Fine-tuning config", "finetune").splitlines()
    assert finetune[1:] == [
        f"{m.__name__.rsplit('.', 1)[1]}: {', '.join(m.ARGUMENTS.presets)}"
        for m in (finetune_cifar10, finetune_fashion_mnist, finetune_imagenet, transfer_digits)
    ]
    pretrain = cli.config_help("Pretraining config", "pretrain")
    assert "pretrain_imagenet: v1, r50_1x_sk0," in pretrain and "finetune_" not in pretrain


QUIET = """
import sys
if sys.argv[1] == "cli":
    import simclr_jax.cli
import tensorflow as tf
tf.constant(1.0) + 1.0
"""


@pytest.mark.parametrize("first", ["cli", "nothing"])
def test_no_tensorflow_banner_once_our_cli_is_imported(first):
    """The control imports TensorFlow without simclr_jax.cli: the banners are there, so their
    absence is the switches' doing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    result = subprocess.run(
        [sys.executable, "-c", QUIET, first], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for banner in ("oneDNN custom operations", "cpu_feature_guard"):
        assert (banner in result.stderr) == (first == "nothing"), (banner, result.stderr[-3000:])


def test_matplotlibs_font_cache_notice_is_dropped_and_nothing_else(caplog):
    """matplotlib announces a font cache it builds on a fresh install (when that takes over 5 s:
    not reproducible on demand, so its logger is fed the records here)."""
    caplog.set_level(logging.INFO)
    fonts = logging.getLogger("matplotlib.font_manager")
    fonts.warning("Matplotlib is building the font cache; this may take a moment.")
    fonts.warning("findfont: Font family 'Nope' not found.")
    assert [r.getMessage() for r in caplog.records if r.name == fonts.name] == [
        "findfont: Font family 'Nope' not found."
    ]
