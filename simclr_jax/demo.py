"""`make demo`: pretrain on real Fashion-MNIST on a CPU, then test the features with linear classifiers.

    python -m simclr_jax.demo [--workdir=demo_out] [--config.num_epochs=3 ...]

Pretrains the demo preset of configs/pretrain_fashion_mnist.py (resuming if `workdir` already holds it),
embeds the train and test splits with the frozen backbone, and fits the same logistic regression to the
learned features and to raw pixels, with all 60,000 labels and with a stratified 1% (600). Prints one
table; the online probe's accuracy (trained during pretraining) is reported beside it.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from simclr_jax import pretrain
from simclr_jax.data import augment, sources
from simclr_jax.data.label_fraction import stratified_subset
from simclr_jax.models import build_model
from simclr_jax.train import checkpoint
from simclr_jax.train.linear_fit import fit_linear_classifier

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "pretrain_fashion_mnist.py",
)
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Pretraining config.", lock_config=True)
flags.DEFINE_string("workdir", "demo_out", "Where the demo's pretraining run lives.")
flags.DEFINE_float("label_fraction", 0.01, "Fraction of labels for the few-label rows.")


def embed(model, variables, images: np.ndarray, image_size: int, batch: int = 1000) -> np.ndarray:
    """Backbone features of uint8 images (BN in inference mode, no augmentation)."""

    @jax.jit
    def features(x):
        x = augment.eval_preprocess(x, out_size=image_size)
        return model.apply(variables, x, train=False)["features"]

    chunks = [features(jnp.asarray(images[i : i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate(jax.device_get(chunks))


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    config = FLAGS.config
    workdir = os.path.join(FLAGS.workdir, "pretrain")
    start = time.time()
    results = pretrain.train_and_evaluate(config, workdir)
    pretrain_minutes = (time.time() - start) / 60

    train = sources.load_split(config.dataset, config.dataset.train_split)
    test = sources.load_split(config.dataset, config.dataset.eval_split)
    model = build_model(
        config.model, num_classes=train.num_classes, image_size=config.dataset.image_size
    )
    size, channels = config.dataset.image_size, train.images.shape[-1]
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False)
    )
    variables = checkpoint.restore_weights(workdir, abstract)
    train_features = embed(model, variables, train.images, config.dataset.image_size)
    test_features = embed(model, variables, test.images, config.dataset.image_size)
    few = stratified_subset(train.labels, FLAGS.label_fraction, seed=config.seed)

    pixels = lambda images: images.reshape(len(images), -1)
    rows = []
    for name, fit_x, test_x in [
        ("SimCLR features", train_features, test_features),
        ("raw pixels", pixels(train.images), pixels(test.images)),
    ]:
        accuracies = []
        for indices in (np.arange(len(train.labels)), few):
            classifier = fit_linear_classifier(
                fit_x[indices], train.labels[indices], num_classes=train.num_classes
            )
            accuracies.append(classifier.accuracy(test_x, test.labels))
        rows.append((name, fit_x.shape[1], *accuracies))

    print()
    device = f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)"
    print(
        f"Fashion-MNIST linear evaluation (test accuracy), {device}, "
        f"pretraining {results['step']} steps in {pretrain_minutes:.1f} min"
    )
    header = f"| input | dims | all {len(train.labels)} labels | {len(few)} labels (1%) |"
    print(header)
    print("|---|---|---|---|")
    for name, dims, full, subset in rows:
        print(f"| {name} | {dims} | {100 * full:.2f}% | {100 * subset:.2f}% |")
    if "probe_top1" in results:
        print(
            f"Online linear probe (trained during pretraining): {100 * results['probe_top1']:.2f}%"
        )


if __name__ == "__main__":
    app.run(main)
