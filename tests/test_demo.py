"""`make demo` end to end at the tiny size (real Fashion-MNIST slices, through the command line):
every number of the summary is produced, the table and the figures are written, a rerun reuses
the finished stages, and a machine without the data files is told how to install them."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from devices import fit_pipeline_env

from simclr_jax.data import fashion_mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain_fashion_mnist.py"
TRAIN_IMAGES, TEST_IMAGES = 2000, 500
ACCURACIES = (
    "linear_simclr_all", "linear_simclr_1pct", "linear_pixels_all", "linear_pixels_1pct",
    "finetune_1pct", "scratch_1pct", "distill_1pct", "knn_simclr", "probe_final",
)  # fmt: skip
needs_data = pytest.mark.skipif(
    not fashion_mnist.available(), reason="needs the Fashion-MNIST files (dataset-fashion-mnist)"
)


# The demo's processes compile at -O1: most of the tiny demo's time is its linear fits.
DEMO_ENV = fit_pipeline_env()


def run_demo(workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "simclr_jax.demo", "--size=tiny", f"--workdir={workdir}",
        f"--config={CONFIG}:tiny", f"--config.dataset.train_split=train[:{TRAIN_IMAGES}]",
        f"--config.dataset.eval_split=test[:{TEST_IMAGES}]", *flags,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=DEMO_ENV
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = run_demo(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result.stdout


@needs_data
def test_the_demo_reports_every_number_of_its_summary(demo):
    from simclr_jax.demo import SUMMARY_KEYS

    workdir, stdout = demo
    summary = json.loads((workdir / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS
    for key in ACCURACIES:
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    # Ten classes: anything trained at all is above chance on 500 test images.
    assert summary["linear_pixels_all"] > 0.5 and summary["linear_simclr_all"] > 0.2
    assert 0 < summary["pretrain_minutes"] < summary["total_minutes"]
    assert summary["seed"] == 0
    for stage in ("pretrain", "finetune_20", "scratch_20", "distill"):
        results = json.loads((workdir / stage / "results.json").read_text())
        assert results["step"] > 0, stage
    # The figures are real PNG files, and the printed table carries the summary's numbers.
    for figure in ("curves.png", "label_efficiency.png", "neighbors.png", "map.png"):
        assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert "| raw pixels | 784 |" in stdout and f"test accuracy on {TEST_IMAGES} images" in stdout
    assert f"{100 * summary['linear_pixels_1pct']:.2f}%" in stdout
    assert f"{100 * summary['distill_1pct']:.2f}%" in stdout
    assert f"mAP@R {100 * summary['map_at_r']:.2f}%" in stdout
    assert summary["recall_at_1"] <= summary["recall_at_5"] <= summary["recall_at_10"]
    assert 0 < summary["embedding_seconds"] < 60 * summary["total_minutes"]
    # The pretraining logged the collapse monitor, and curves.png has its panels.
    records = (workdir / "pretrain" / "metrics.jsonl").read_text()
    assert '"proj_std"' in records and '"effective_rank"' in records


def training_features(workdir: pathlib.Path, out: pathlib.Path) -> np.ndarray:
    """The training images' features, computed as the demo does, in a process compiled as the
    demo's was (so they are the demo's to the last bit); kept in the .npy file `out`."""
    code = (
        "import sys, numpy as np\n"
        "from simclr_jax import demo\n"
        "from simclr_jax.data import fashion_mnist\n"
        "images, _ = fashion_mnist.load('train')\n"
        "np.save(sys.argv[2], demo.embed(sys.argv[1], images[:int(sys.argv[3])]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "pretrain"), str(out), str(TRAIN_IMAGES)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=DEMO_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


@needs_data
def test_the_demo_retrieval_numbers_are_the_brute_force_ones(demo, tmp_path):
    """retrieval.json is what simclr_jax.neighbors computes on the demo's features (recomputed
    as the demo does), and on a subset neighbors' recall@K and mAP@R equal an independent
    brute-force NumPy computation exactly (float64 similarities, so no rounding tie decides)."""
    from retrieval_reference import brute_force_scores

    from simclr_jax import neighbors

    workdir, _ = demo
    reported = json.loads((workdir / "retrieval.json").read_text())
    _, train_labels = fashion_mnist.load("train")
    stored = np.load(workdir / "embeddings_test.npz")
    test_x, test_labels = stored["features"], stored["labels"]
    assert len(test_x) == TEST_IMAGES and stored["thumbnails"].shape == (TEST_IMAGES, 28, 28, 1)
    train_x = training_features(workdir, tmp_path / "train_features.npy")
    again = neighbors.retrieval_scores(train_x, train_labels[:TRAIN_IMAGES], test_x, test_labels)
    assert {k: reported[k] for k in again} == again
    subset = slice(0, 200)
    found = neighbors.retrieval_scores(
        train_x.astype(np.float64), train_labels[:TRAIN_IMAGES],
        test_x[subset].astype(np.float64), test_labels[subset],
    )  # fmt: skip
    expected = brute_force_scores(
        train_x, train_labels[:TRAIN_IMAGES], test_x[subset], test_labels[subset]
    )
    for key in ("recall@1", "recall@5", "recall@10"):
        assert found[key] == expected[key], key
    assert found["map@r"] == pytest.approx(expected["map@r"], abs=1e-12)


@needs_data
def test_a_rerun_reuses_the_finished_stages_and_the_pixel_fits(demo):
    workdir, _ = demo
    before = json.loads((workdir / "summary.json").read_text())
    steps = {
        stage: (workdir / stage / "metrics.jsonl").read_text()
        for stage in ("pretrain", "finetune_20", "scratch_20", "distill")
    }
    result = run_demo(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    after = json.loads((workdir / "summary.json").read_text())
    # No stage trained again (their metrics are untouched) and every accuracy is the same.
    for stage, metrics in steps.items():
        assert (workdir / stage / "metrics.jsonl").read_text() == metrics, stage
    assert {k: after[k] for k in ACCURACIES} == {k: before[k] for k in ACCURACIES}


def test_missing_data_files_fail_fast_with_the_install_command(tmp_path):
    result = run_demo(tmp_path / "out", f"--config.dataset.data_dir={tmp_path / 'nothing'}")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "dataset-fashion-mnist" in last_line and "make data" in last_line
    assert "--config.dataset.data_dir=FOLDER" in last_line  # the way without apt
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "pretrain").exists()


def test_every_stage_follows_the_pretraining_data_seed_and_tensorboard_switch():
    from simclr_jax.configs import (
        distill_fashion_mnist,
        finetune_fashion_mnist,
        pretrain_fashion_mnist,
    )
    from simclr_jax.demo import follow_pretraining

    pretraining = pretrain_fashion_mnist.get_config("demo")
    pretraining.dataset.train_split, pretraining.dataset.eval_split = "train[:100]", "test[:50]"
    pretraining.seed, pretraining.tensorboard = 7, False
    stages = [
        finetune_fashion_mnist.get_config("recipe=semi,fraction=0.01,size=demo"),
        distill_fashion_mnist.get_config("size=demo"),
    ]
    for stage in stages:
        assert stage.tensorboard and stage.seed != 7  # the presets' own values differ
        follow_pretraining(stage, pretraining)
        assert (stage.dataset.train_split, stage.dataset.eval_split) == ("train[:100]", "test[:50]")
        assert (stage.seed, stage.label_seed, stage.tensorboard) == (7, 7, False)


def test_a_stopped_stage_stops_the_demo(tmp_path):
    """SIGTERM or Ctrl-C ends a stage early with a checkpoint; the demo must not go on to the
    next stage from it (nor report its numbers)."""
    from simclr_jax import demo

    def stopped(config, workdir, *, accept_config_changes):
        return {"step": 7, "preempted_at_step": 7}

    def finished(config, workdir, *, accept_config_changes):
        return {"step": 9}

    with pytest.raises(RuntimeError, match="stopped during the pretrain stage at step 7"):
        demo.run_stage("pretrain", stopped, None, str(tmp_path), accept_config_changes=False)
    results, minutes = demo.run_stage(
        "pretrain", finished, None, str(tmp_path), accept_config_changes=False
    )
    assert results == {"step": 9} and minutes >= 0
