"""A prepared folder streams through every stage: pretraining (killed with SIGKILL and resumed,
bit-identical to an uninterrupted run), fine-tuning, distillation, the evaluation job and embed."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from simclr_jax import distill, embed, evaluate, finetune, pretrain
from simclr_jax.configs import distill_fashion_mnist, finetune_fashion_mnist, pretrain_fashion_mnist
from simclr_jax.data import prepared

tfds = pytest.importorskip("tensorflow_datasets")  # the [tfds] extra; make test installs it

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
# The pretraining command line, with each step's batch logged (a digest of its images and labels)
# and, when KILL_AT_STEP is set, a SIGKILL of the process as it fetches that step's batch.
LAUNCH = """
import hashlib, json, os, runpy, signal, sys
from simclr_jax.data import step_stream
fetch = step_stream.StepStream.batch
def logged(self, step):
    batch = fetch(self, step)
    digest = hashlib.sha256(batch["image"].tobytes() + batch["label"].tobytes()).hexdigest()
    with open(os.environ["BATCH_LOG"], "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "step": step, "digest": digest}) + "\\n")
    if step == int(os.environ.get("KILL_AT_STEP", "-1")):
        os.kill(os.getpid(), signal.SIGKILL)
    return batch
step_stream.StepStream.batch = logged
sys.argv = sys.argv[1:]
runpy.run_module("simclr_jax.pretrain", run_name="__main__", alter_sys=True)
"""
# A small network that compiles in seconds; fine-tuning and distillation inherit it.
SMALL = {"backbone": "convnet", "depth": 4, "base_width": 4, "proj_out_dim": 16}


def image_folder(root, *, classes=("ant", "bee", "cat"), per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(12, 60, 2)
            pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.jpg")
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A labelled folder prepared once: (data_dir, record, folder)."""
    root = tmp_path_factory.mktemp("prepared")
    folder = image_folder(root / "pets")
    record = prepared.prepare_folder(
        str(folder), str(root / "data"), workers=1, progress=False,
        settings=prepared.Settings(val_fraction=0.25, images_per_shard=8),
    )  # fmt: skip
    return root / "data", record, folder


def pretrain_args(data_dir, workdir):
    return [
        "--config=configs/pretrain_fashion_mnist.py:tiny", f"--workdir={workdir}",
        "--config.dataset.name=pets", f"--config.dataset.data_dir={data_dir}",
        "--config.dataset.eval_split=", "--config.dataset.image_size=16",
        "--config.probe.clean_every=0", "--config.batch_size=8", f"--config.num_steps={STEPS}",
        "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
        *(f"--config.model.{k}={v}" for k, v in SMALL.items()),
    ]  # fmt: skip


def launch(data_dir, workdir, log, kill_at=None):
    env = dict(os.environ, BATCH_LOG=str(log))
    if kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, "pretrain", *pretrain_args(data_dir, workdir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def batch_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}/"))
        return out
    if isinstance(tree, list | tuple):
        return flat(dict(enumerate(tree)), prefix)
    return {prefix: np.asarray(tree)}


def final_state(workdir):
    return flat(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state"))


def test_kill_9_mid_run_then_resume_sees_the_same_batches_and_ends_bit_identical(dataset, tmp_path):
    data_dir, _, _ = dataset
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = launch(data_dir, straight, tmp_path / "straight.jsonl")
    assert reference.returncode == 0, reference.stderr[-3000:]
    first = launch(data_dir, killed, tmp_path / "killed.jsonl", kill_at=6)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = launch(data_dir, killed, tmp_path / "killed.jsonl")
    assert second.returncode == 0, second.stderr[-3000:]

    expected = {row["step"]: row["digest"] for row in batch_log(tmp_path / "straight.jsonl")}
    assert sorted(expected) == list(range(STEPS))
    rows = batch_log(tmp_path / "killed.jsonl")
    runs = sorted({row["pid"] for row in rows}, key=[row["pid"] for row in rows].index)
    assert len(runs) == 2
    resumed_steps = [row["step"] for row in rows if row["pid"] == runs[1]]
    assert 0 < resumed_steps[0] <= 6  # it resumed from a checkpoint, not from the start
    for row in rows:  # every batch either process fetched is the uninterrupted run's
        assert row["digest"] == expected[row["step"]], row
    assert {row["step"] for row in rows} == set(expected)
    assert losses(killed) == losses(straight)
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def small_config(module, preset, data_dir, **fields):
    config = module.get_config(preset)
    config.dataset.name = "pets"
    config.dataset.data_dir = str(data_dir)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.image_size = 16
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_steps = 2
    config.checkpoint_every_steps = 2
    for key, value in fields.items():
        target, name = config, key.split(".")
        for part in name[:-1]:
            target = target[part]
        target[name[-1]] = value
    return config


def test_every_stage_reads_the_prepared_folder(dataset, tmp_path):
    data_dir, record, folder = dataset
    num_validation = record["splits"]["validation"]["examples"]
    pre = small_config(pretrain_fashion_mnist, "tiny", data_dir, **{"probe.clean_every": 0})
    pre.model.update(SMALL)
    results = pretrain.train_and_evaluate(pre, str(tmp_path / "pre"))
    assert results["eval_probe_count"] == num_validation

    tune = small_config(
        finetune_fashion_mnist, "tiny", data_dir, label_fraction=1.0,
        init_checkpoint=str(tmp_path / "pre"),
    )  # fmt: skip
    tuned = finetune.train_and_evaluate(tune, str(tmp_path / "tune"))
    assert tuned["eval_count"] == num_validation
    assert tuned["num_labeled"] == record["splits"]["train"]["examples"]

    student = small_config(
        distill_fashion_mnist, "tiny", data_dir, label_fraction=1.0, alpha=0.5,
        labeled_batch_size=8, teacher_checkpoint=str(tmp_path / "tune"),
    )  # fmt: skip
    distilled = distill.train_and_evaluate(student, str(tmp_path / "student"))
    assert distilled["eval_count"] == num_validation and "labeled_loss" in distilled

    # The evaluation job reads the same split and reports what training reported.
    job = evaluate.evaluate_workdir(str(tmp_path / "tune"), poll_s=0.1, timeout_s=60)
    for name in ("eval_top1", "eval_count", "eval_loss"):
        assert job[name] == pytest.approx(tuned[name], rel=1e-6), name

    # embed reads the dataset (named by its files) as it reads the folder itself.
    from_dataset = embed.embed(
        str(tmp_path / "tune"), dataset="pets", data_dir=str(data_dir), split="validation",
        progress=False,
    )  # fmt: skip
    assert len(from_dataset.paths) == num_validation
    from_folder = embed.embed(str(tmp_path / "tune"), str(folder), progress=False)
    assert [path for path, _ in from_folder.skipped] == ["train/ant/broken.jpg"]
    row = {path: i for i, path in enumerate(from_folder.paths)}
    np.testing.assert_array_equal(
        from_dataset.features, from_folder.features[[row[p] for p in from_dataset.paths]]
    )


def test_a_flat_folder_pretrains_without_labels_and_fine_tuning_asks_for_them(tmp_path):
    rng = np.random.default_rng(4)
    flat_folder = tmp_path / "scans"
    flat_folder.mkdir()
    for i in range(12):
        pixels = rng.integers(0, 65536, (20 + i, 24), np.uint16)  # 16-bit grayscale PNGs
        Image.fromarray(pixels).save(flat_folder / f"{i:02d}.png")
    record = prepared.prepare_folder(
        str(flat_folder), str(tmp_path / "data"), workers=1, progress=False
    )
    assert record["channels"] == 1 and record["classes"] == []
    config = small_config(
        pretrain_fashion_mnist, "tiny", tmp_path / "data", **{"probe.clean_every": 0}
    )
    config.dataset.name, config.dataset.eval_split = "scans", ""
    config.model.update(SMALL)
    results = pretrain.train_and_evaluate(config, str(tmp_path / "pre"))
    assert np.isfinite(results["contrastive_loss"])
    assert results["probe_loss"] == 0.0 and results["probe_acc"] == 0.0  # nothing to learn
    config.dataset.eval_split = "validation"
    with pytest.raises(ValueError, match="has no labels to evaluate with"):
        pretrain.train_and_evaluate(config, str(tmp_path / "pre2"))
    tune = small_config(
        finetune_fashion_mnist, "tiny", tmp_path / "data", label_fraction=1.0,
        init_checkpoint=str(tmp_path / "pre"),
    )  # fmt: skip
    tune.dataset.name = "scans"
    with pytest.raises(ValueError, match="fine-tuning needs labels, but 'scans' has none"):
        finetune.train_and_evaluate(tune, str(tmp_path / "tune"))
