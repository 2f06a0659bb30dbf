"""`make demo`: the SimCLRv2 recipe on real Fashion-MNIST, sized for a CPU.

    python -m simclr_jax.demo [--workdir=demo_out] [--config.num_epochs=3 ...]

1. Pretrain the demo preset of simclr_jax/configs/pretrain_fashion_mnist.py (overridable with
   --config.*).
2. Linear evaluation: the same logistic regression on the frozen features and on raw pixels, with all
   60,000 labels and with a stratified 1% (600).
3. Fine-tune from the first projection-head layer on the 1% labels, against the same network trained
   from scratch on the same labels for the same number of steps.
4. Distill the fine-tuned network into a student on the unlabeled training images.

Each stage writes its own workdir under --workdir; rerunning resumes or skips finished stages. One table
is printed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from simclr_jax import cli, distill, finetune, pretrain
from simclr_jax.configs import distill_fashion_mnist, finetune_fashion_mnist, pretrain_fashion_mnist
from simclr_jax.data import sources
from simclr_jax.data.label_fraction import stratified_subset
from simclr_jax.encoder import load_encoder
from simclr_jax.train.linear_fit import fit_linear_classifier


def embed(workdir: str, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Backbone features of uint8 images from a run's checkpoint (BN in inference mode)."""
    apply_fn, variables = load_encoder(workdir)
    chunks = [
        apply_fn(variables, jnp.asarray(images[i : i + batch]))["features"]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(jax.device_get(chunks))


def linear_evaluation(config, workdir: str, fraction: float) -> list[tuple[str, int, float, float]]:
    """Test accuracy of logistic regression on SimCLR features and on raw pixels (all / few labels)."""
    train = sources.load_split(config.dataset, config.dataset.train_split)
    test = sources.load_split(config.dataset, config.dataset.eval_split)
    few = stratified_subset(train.labels, fraction, seed=config.seed)
    pixels = lambda images: images.reshape(len(images), -1)
    rows = []
    for name, train_x, test_x in [
        ("SimCLR features", embed(workdir, train.images), embed(workdir, test.images)),
        ("raw pixels", pixels(train.images), pixels(test.images)),
    ]:
        accuracies = []
        for indices in (np.arange(len(train.labels)), few):
            classifier = fit_linear_classifier(
                train_x[indices], train.labels[indices], num_classes=train.num_classes
            )
            accuracies.append(classifier.accuracy(test_x, test.labels))
        rows.append((name, train_x.shape[1], *accuracies))
    return rows


def run_stage(name: str, train_and_evaluate, config, workdir: str) -> tuple[dict[str, Any], float]:
    """Run (or resume, or find finished) a stage; its results.json, and the minutes this call took."""
    start = time.time()
    logging.info("Demo stage: %s (%s)", name, workdir)
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "results.json")) as file:
        return json.load(file), (time.time() - start) / 60


FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    root = FLAGS.workdir
    config = FLAGS.config
    pretrain_dir = os.path.join(root, "pretrain")
    pretrained, pretrain_minutes = run_stage(
        "pretrain", pretrain.train_and_evaluate, config, pretrain_dir
    )
    start = time.time()
    rows = linear_evaluation(config, pretrain_dir, FLAGS.label_fraction)
    linear_minutes = (time.time() - start) / 60

    fine_tune = finetune_fashion_mnist.get_config("demo_1pct")
    fine_tune.init_checkpoint = pretrain_dir
    tuned, tune_minutes = run_stage(
        "fine-tune 1%", finetune.train_and_evaluate, fine_tune, os.path.join(root, "finetune_1pct")
    )
    scratch = finetune_fashion_mnist.get_config("demo_supervised_1pct")
    supervised, supervised_minutes = run_stage(
        "supervised 1%",
        finetune.train_and_evaluate,
        scratch,
        os.path.join(root, "supervised_1pct"),
    )
    student_config = distill_fashion_mnist.get_config("demo")
    student_config.teacher_checkpoint = os.path.join(root, "finetune_1pct")
    student_config.init_checkpoint = pretrain_dir  # the student starts from the SimCLR weights
    student, distill_minutes = run_stage(
        "distill", distill.train_and_evaluate, student_config, os.path.join(root, "distill")
    )

    device = f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)"
    print(f"\nSimCLRv2 recipe on Fashion-MNIST ({device}); test accuracy (10,000 images)\n")
    print(f"Pretraining: {pretrained['step']} steps in {pretrain_minutes:.1f} min")
    print("\n| linear classifier on | dims | all 60,000 labels | 600 labels (1%) |")
    print("|---|---|---|---|")
    for name, dims, full, few in rows:
        print(f"| {name} | {dims} | {100 * full:.2f}% | {100 * few:.2f}% |")
    print(f"(fits: {linear_minutes:.1f} min)")
    print("\n| with 600 labels (1%) | steps | test top-1 | minutes |")
    print("|---|---|---|---|")
    for name, result, minutes in [
        ("SimCLR, fine-tuned from head layer 1", tuned, tune_minutes),
        ("supervised from scratch, same budget", supervised, supervised_minutes),
        ("student distilled from the fine-tuned net", student, distill_minutes),
    ]:
        print(f"| {name} | {result['step']} | {100 * result['eval_top1']:.2f}% | {minutes:.1f} |")


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config",
        pretrain_fashion_mnist.__file__,
        "Pretraining config of the demo.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", "demo_out", "Each stage's workdir goes under this folder.")
    flags.DEFINE_float("label_fraction", 0.01, "Fraction of labels for the few-label rows.")
    cli.run(main)
