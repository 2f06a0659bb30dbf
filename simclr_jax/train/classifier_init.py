"""Start fine-tuning's classifier at a linear probe's solution (LP-FT, Kumar et al., ICLR 2022).

While a fresh (zero or random) classifier is far from fitting, fine-tuning bends the pretrained
features to suit it; a logistic regression fitted on the frozen features instead starts the network
at the linear-evaluation accuracy, so that fine-tuning only has to improve on it. The fit is
train/linear_fit's: standardised features, L-BFGS, the L2 penalty chosen on held-out folds of the
labelled examples (never the test set); the standardisation is folded into the dense layer.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import predict
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.models import SimCLRModel
from simclr_jax.models.heads import num_head_layers, selected_layer
from simclr_jax.train.linear_fit import fit_within_budget


def classifier_input_features(
    model: SimCLRModel,
    variables: dict[str, Any],
    images: np.ndarray,
    *,
    image_size: int,
    batch_size: int = 1000,
) -> np.ndarray:
    """What the classifier reads (head_<ft_proj_selector>) for uint8 images: evaluation
    preprocessing, the network in inference mode."""
    if model.classifier_input_norm:
        raise ValueError("a classifier behind classifier_input_norm cannot be fitted here")
    layer = selected_layer(
        model.ft_proj_selector, num_head_layers(model.proj_head_mode, model.num_proj_layers)
    )

    # The variables are an argument, not a closed-over constant baked into the program.
    features = jax.jit(predict.predict_fn(model, image_size=image_size, output=f"head_{layer}"))

    chunks = [
        np.asarray(features(variables, jnp.asarray(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def linear_fit_classifier(
    model: SimCLRModel,
    variables: dict[str, Any],
    train: ImageArrays,
    *,
    image_size: int,
    seed: int,
) -> dict[str, jax.Array]:
    """The classifier's {'kernel', 'bias'}: logistic regression on the labelled `train` set's
    classifier-input features (the same fit as the demo's linear evaluation)."""
    features = classifier_input_features(model, variables, train.images, image_size=image_size)
    classifier = fit_within_budget(features, train.labels, num_classes=model.num_classes, seed=seed)
    kernel, bias = classifier.as_dense()
    logging.info(
        "Classifier initialised by a linear fit on %d labelled examples (%d features): "
        "training accuracy %.4f",
        len(features), features.shape[1], classifier.accuracy(features, train.labels),
    )  # fmt: skip
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
