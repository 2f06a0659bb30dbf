"""The kNN monitor: how well frozen backbone features separate the classes, with no training.

Every stage can call it (pretraining, fine-tuning, distillation): embed a labelled training set and
the evaluation split with the current model (centre crop, BN in inference mode), then classify each
evaluation image by a temperature-weighted vote of its k most cosine-similar training features
(train/evaluate.knn_*). Cheap compared with a linear probe and needs no labels during training.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.data import augment
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.train import evaluate

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


def make_feature_step(model: Any, image_size: int):
    """Per-replica backbone features of uint8 evaluation images (centre crop, BN inference)."""

    def features(state: Any, images: jax.Array) -> jax.Array:
        x = augment.eval_preprocess(images, out_size=image_size)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model.apply(variables, x, train=False)["features"]

    return features


def embed(dp: Any, feature_fn: Any, state: Any, arrays: ImageArrays, batch_size: int) -> np.ndarray:
    """float32 [N, D] features of every image of `arrays`, on the host (every process)."""
    chunks = []
    for batch in data_pipeline.eval_batches(arrays, global_batch=batch_size, mesh=dp.mesh):
        chunks.append(
            multihost_utils.process_allgather(feature_fn(state, batch["image"]), tiled=True)
        )
    # Only the last batch is padded, so the first N rows are the real examples.
    return np.concatenate(chunks)[: len(arrays)]


def knn_monitor(
    dp: Any,
    model: Any,
    state: Any,
    train_arrays: ImageArrays,
    eval_arrays: ImageArrays,
    config: Any,
) -> dict[str, float]:
    """{'knn_top1': accuracy} of the weighted kNN classifier on `eval_arrays`' backbone features.

    `state` has .params and .batch_stats, replicated as `dp` (parallel.DataParallel) lays them out.
    `config` provides dataset.image_size and eval_batch_size, and optionally knn.k and
    knn.temperature (defaults 200 and 0.1, the InstDisc monitor's). Both splits need labels.
    """
    if train_arrays.labels is None or eval_arrays.labels is None:
        raise ValueError("knn_monitor needs labelled train_arrays and eval_arrays")
    knn_config = config.get("knn") or {}
    k = int(knn_config.get("k", DEFAULT_K))
    temperature = float(knn_config.get("temperature", DEFAULT_TEMPERATURE))
    feature_fn = dp.map(
        make_feature_step(model, config.dataset.image_size),
        sharded_args=(False, True),
        sharded_outputs=True,
    )
    bank = embed(dp, feature_fn, state, train_arrays, config.eval_batch_size)
    queries = embed(dp, feature_fn, state, eval_arrays, config.eval_batch_size)
    accuracy = evaluate.knn_evaluate(
        bank,
        train_arrays.labels,
        queries,
        eval_arrays.labels,
        num_classes=max(train_arrays.num_classes, eval_arrays.num_classes),
        k=k,
        temperature=temperature,
    )
    return {"knn_top1": accuracy}
