"""End to end on the real Fashion-MNIST files: the CLI, the workdir it leaves, and exact resume."""

import json
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from devices import default_pipeline_env

from simclr_jax import pretrain
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import fashion_mnist
from simclr_jax.saved_run import load_encoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{pretrain_fashion_mnist.__file__}:tiny"


def tiny_config(**overrides):
    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.train_split = "train[:2048]"
    config.dataset.eval_split = "test[:500]"
    for key, value in overrides.items():
        config[key] = value
    return config


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_cli_runs_and_leaves_a_complete_workdir(tmp_path):
    """With XLA's default compile pipeline, as users run it (the other tests compile cheaply)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "simclr_jax.pretrain", f"--config={TINY}",
            f"--workdir={tmp_path}", "--config.num_steps=3",
            "--config.dataset.train_split=train[:1024]", "--config.dataset.eval_split=test[:300]",
            "--config.tensorboard=True",
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=default_pipeline_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == 3
    # One log line per logged interval (steps 2 and 3: metrics and rates together), no line of
    # the metric writers', no TensorFlow banner (TF writes the events), results as a table.
    lines = result.stderr.splitlines()
    interval = [line for line in lines if re.search(r"\] step \d+/3 ", line)]
    assert [re.search(r"step (\d)/3", line)[1] for line in interval] == ["2", "3"], interval
    assert all("loss=" in line and "steps/s" in line for line in interval)
    assert not [line for line in lines if re.search(r"\] \[\d+\] ", line)]
    for banner in ("oneDNN custom operations", "cpu_feature_guard", "font cache"):
        assert banner not in result.stderr
    assert re.search(r"^\| eval_probe_top1 +\| +0\.\d{4} \|$", result.stdout, re.M), result.stdout
    # The tiny preset writes no TensorBoard files; turned on, the real clu writer does.
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert 0.0 <= results["eval_probe_top1"] <= 1.0
    assert (tmp_path / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "3",
    ]
    losses = read_losses(tmp_path)
    assert set(losses) == {2, 3} and all(loss > 0 for loss in losses.values())
    # load_encoder rebuilds the network with the probe's input BatchNorm from the checkpoint: its
    # logits on the eval split give the run's own eval_probe_top1.
    apply_fn, variables = load_encoder(str(tmp_path))
    assert "classifier_norm" in variables["batch_stats"]
    images, labels = fashion_mnist.load("test")
    logits = apply_fn(variables, jnp.asarray(images[:300].reshape(300, 28, 28, 1)))["logits"]
    top1 = float(np.mean(np.argmax(logits, -1) == labels[:300]))
    assert top1 == pytest.approx(results["eval_probe_top1"], abs=1e-6)


def test_resume_continues_with_the_same_losses(tmp_path):
    config = tiny_config(log_every_steps=1, checkpoint_every_steps=2, num_steps=4)
    config.dataset.eval_split = ""
    straight = tmp_path / "straight"
    pretrain.train_and_evaluate(config, str(straight))

    resumed = tmp_path / "resumed"
    first = pretrain.train_and_evaluate(config, str(resumed), stop_at_step=2)
    assert first["step"] == 2
    second = pretrain.train_and_evaluate(config, str(resumed))
    assert second["step"] == 4

    expected, got = read_losses(straight), read_losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [1, 2, 3, 4]
    for step in expected:
        # Same program, same inputs: bit-identical on CPU (data order and augmentation come from
        # (seed, step); the optimizer state is restored exactly).
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_relative_workdir(tmp_path, monkeypatch):
    """orbax needs absolute paths; a relative --workdir is taken relative to the current folder."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(num_steps=1)
    config.dataset.eval_split = ""
    assert pretrain.train_and_evaluate(config, "runs/relative")["step"] == 1
    assert (tmp_path / "runs" / "relative" / "checkpoints" / "1").is_dir()
