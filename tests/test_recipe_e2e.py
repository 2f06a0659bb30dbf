"""The SimCLRv2 recipe end to end on the real Fashion-MNIST files, through the command lines:
pretrain -> fine-tune on 1% of the labels -> distil, then load_encoder on every workdir."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_finetune import CONFIGS, load_config

import simclr_jax
from simclr_jax import distill, finetune, saved_run
from simclr_jax.data import fashion_mnist, sources, stage_data
from simclr_jax.train.checkpoint import CheckpointMismatchError
from simclr_jax.train.linear_fit import fit_within_budget

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not fashion_mnist.available(), reason="needs the Fashion-MNIST files (dataset-fashion-mnist)"
)


def run_cli(module: str, config: str, workdir: pathlib.Path, *overrides: str) -> dict:
    """Runs a stage's command line; its results.json."""
    command = [
        sys.executable, "-m", module, f"--config={CONFIGS / config}",
        f"--workdir={workdir}", *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    workdirs = {stage: root / stage for stage in ("pretrain", "finetune", "distill")}
    results = {}
    # The same flags as tests/test_pretrain.py's CLI test: the compilation cache serves both.
    results["pretrain"] = run_cli(
        "simclr_jax.pretrain", "pretrain_fashion_mnist.py:tiny", workdirs["pretrain"],
        "--config.num_steps=3", "--config.dataset.train_split=train[:1024]",
        "--config.dataset.eval_split=test[:300]",
    )  # fmt: skip
    # 1% of the labels, from the first head layer; stages up to block_group2 frozen, so the
    # test below can see frozen and trained parameters side by side.
    results["finetune"] = run_cli(
        "simclr_jax.finetune", "finetune_fashion_mnist.py:tiny", workdirs["finetune"],
        f"--config.init_checkpoint={workdirs['pretrain']}",
        "--config.model.fine_tune_after_block=2",
    )  # fmt: skip
    # The student starts from the pretraining weights (its architecture comes from there too).
    results["distill"] = run_cli(
        "simclr_jax.distill", "distill_fashion_mnist.py:tiny", workdirs["distill"],
        f"--config.teacher_checkpoint={workdirs['finetune']}",
        f"--config.init_checkpoint={workdirs['pretrain']}",
    )  # fmt: skip
    return workdirs, results


def test_every_stage_leaves_results_and_config(recipe):
    workdirs, results = recipe
    assert results["pretrain"]["step"] == 3
    finetuned = results["finetune"]
    assert finetuned["step"] == 3 and finetuned["num_labeled"] == 20  # 1% of 2,000, 2 per class
    assert finetuned["eval_count"] == 200 and 0.0 <= finetuned["eval_top1"] <= 1.0
    assert 0.0 <= finetuned["knn_top1"] <= 1.0 and np.isfinite(finetuned["loss"])
    distilled = results["distill"]
    assert distilled["step"] == 3 and distilled["eval_count"] == 200
    assert np.isfinite(distilled["distill_loss"]) and "labeled_loss" not in distilled
    assert {"teacher_top1", "knn_top1", "teacher_agreement"} <= set(distilled)
    # The resolved configs name the architecture they inherited, so each workdir stands alone.
    saved = json.loads((workdirs["finetune"] / "config.json").read_text())
    assert (saved["model"]["base_width"], saved["model"]["num_proj_layers"]) == (2, 2)
    saved = json.loads((workdirs["distill"] / "config.json").read_text())
    assert saved["student"]["model"]["base_width"] == 2


def test_load_encoder_on_every_workdir(recipe):
    workdirs, _ = recipe
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    for stage, workdir in workdirs.items():
        apply_fn, variables = simclr_jax.load_encoder(str(workdir))
        out = apply_fn(variables, images)
        assert out["features"].shape == (5, 32), stage  # the convnet: base width 2 x 16 channels
        assert out["logits"].shape == (5, 10), stage
        floats = apply_fn(variables, images.astype(np.float32) / 255.0)
        np.testing.assert_allclose(floats["features"], out["features"], atol=1e-4)


def test_fine_tuning_moves_only_what_it_trains(recipe):
    """Frozen stages (up to block_group2) and the unused second head layer are bit-identical to
    the pretrained weights and statistics; block_group3 and the first head layer moved."""
    workdirs, _ = recipe
    runs = {s: saved_run.read_run(str(workdirs[s])) for s in ("pretrain", "finetune")}
    pretrained, finetuned = (
        saved_run.restore_variables(run, saved_run.build_from_run(run)) for run in runs.values()
    )

    def named(tree):  # the probe ('classifier', its input norm) is not carried over
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        named_leaves = {"/".join(str(k.key) for k in path): x for path, x in flat}
        return {n: x for n, x in named_leaves.items() if not n.startswith("classifier")}

    for collection in ("params", "batch_stats"):
        before_by_name, after_by_name = named(pretrained[collection]), named(finetuned[collection])
        assert before_by_name.keys() == after_by_name.keys()
        for name, before in before_by_name.items():
            after = after_by_name[name]
            frozen = name.startswith(
                ("backbone/stem", "backbone/block_group1", "backbone/block_group2", "head/dense2",
                 "head/bn2")
            )  # fmt: skip
            if frozen:
                np.testing.assert_array_equal(before, after, err_msg=name)
    moved = lambda prefix: any(  # noqa: E731
        not np.array_equal(a, b)
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(pretrained["params"])[0],
            jax.tree.leaves(finetuned["params"]),
            strict=True,
        )
        if "/".join(str(k.key) for k in path).startswith(prefix)
    )
    assert moved("backbone/block_group3") and moved("head/dense1")


def test_another_architecture_is_an_error_naming_the_parameters(recipe, tmp_path):
    workdirs, _ = recipe
    config = load_config(
        "finetune_fashion_mnist.py", "tiny", f"--config.init_checkpoint={workdirs['pretrain']}",
        "--config.model.base_width=8",
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="block_group1/conv1/kernel"):
        finetune.train_and_evaluate(config, str(tmp_path / "ft"))
    config = load_config(
        "distill_fashion_mnist.py", "tiny", f"--config.teacher_checkpoint={workdirs['finetune']}",
        f"--config.init_checkpoint={workdirs['pretrain']}", "--config.student.model.depth=5",
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="block_group3/conv2"):
        distill.train_and_evaluate(config, str(tmp_path / "ds"))


def test_a_classifier_initialised_by_a_linear_fit_predicts_as_that_fit(recipe, tmp_path):
    """LP-FT (init_classifier_by_linear_fit): with the whole network frozen in inference mode and
    a vanishing learning rate, fine-tuning's test accuracy is that of a logistic regression fitted
    outside the trainer on load_encoder's head-layer-1 features of the same labelled examples."""
    workdirs, _ = recipe
    splits = ("--config.dataset.train_split=train[:1024]", "--config.dataset.eval_split=test[:300]")
    config = load_config(
        "finetune_fashion_mnist.py", "tiny_linear_eval", *splits,
        f"--config.init_checkpoint={workdirs['pretrain']}", "--config.label_fraction=0.5",
        "--config.init_classifier_by_linear_fit=True", "--config.model.ft_proj_selector=1",
        "--config.model.freeze_head_in_linear_eval=True", "--config.optim.base_lr=1e-12",
        "--config.num_steps=1", "--config.evals.knn.k=0",
    )  # fmt: skip
    results = finetune.train_and_evaluate(config, str(tmp_path / "lpft"))

    apply_fn, variables = saved_run.load_encoder(str(workdirs["pretrain"]))
    train = stage_data.labeled_subset(
        sources.load_split(config.dataset, "train[:1024]"), 0.5, config.label_seed
    )
    test = sources.load_split(config.dataset, "test[:300]")
    head_1 = lambda images: np.asarray(apply_fn(variables, images)["head_1"])  # noqa: E731
    fitted = fit_within_budget(head_1(train.images), train.labels, num_classes=10, seed=0)
    expected = fitted.accuracy(head_1(test.images), test.labels)
    assert expected > 0.3  # a real classifier (a zero one scores 0.1 here)
    assert results["eval_top1"] == pytest.approx(expected, abs=1 / 300 + 1e-9)  # one near-tie


def test_a_linear_fit_classifier_needs_a_checkpoint(tmp_path):
    config = load_config(
        "finetune_fashion_mnist.py",
        "tiny_supervised",
        "--config.init_classifier_by_linear_fit=True",
    )
    with pytest.raises(ValueError, match="init_classifier_by_linear_fit"):
        finetune.train_and_evaluate(config, str(tmp_path / "ft"))
