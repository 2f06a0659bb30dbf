"""Collapse monitor: does pretraining still spread the images out, or map them all to one point?

Two numbers per evaluation, on up to MAX_IMAGES evaluation images (centre crop, BN inference):
  proj_std        the standard deviation over images of the L2-normalised projection, averaged
                  over its d dimensions (lightly's std_of_l2_normalized): about 1/sqrt(d) when
                  the projections spread over the sphere, 0 when they all coincide;
  effective_rank  exp of the entropy of the normalised singular values of the [N, D] backbone
                  features (Roy & Vetterli 2007; RankMe): 1 for a constant or rank-one output,
                  up to min(N, D).
A warning is logged once per run when proj_std falls below COLLAPSED_FRACTION / sqrt(d).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from simclr_jax import predict
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data.arrays import ImageArrays

MAX_IMAGES = 2048  # evaluation images the monitor embeds (the first ones of the split)
COLLAPSED_FRACTION = 0.1  # proj_std below this fraction of 1/sqrt(d) counts as collapsed


def l2_normalized_std(projections: np.ndarray) -> float:
    """Mean over dimensions of the std over rows of the L2-normalised rows of [N, d]."""
    x = np.asarray(projections, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.std(x, axis=0)))


def effective_rank(features: np.ndarray) -> float:
    """exp(entropy of s / sum(s)) over the singular values s of [N, D] (0 for an all-zero input)."""
    singular = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def is_collapsed(proj_std: float, dims: int) -> bool:
    return proj_std < COLLAPSED_FRACTION / math.sqrt(dims)


class CollapseMonitor:
    """{'proj_std', 'effective_rank'} of the current model; warns once when collapsed."""

    def __init__(
        self, dp: Any, model: Any, image_size: int, arrays: ImageArrays, *, batch_size: int
    ):
        outputs = predict.predict_fn(model, image_size=image_size)

        def projection_and_features(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
            found = outputs(variables, images)
            return {"projection": found["projection"], "features": found["features"]}

        self._predict = dp.map(
            projection_and_features, sharded_args=(False, True), sharded_outputs=True
        )
        self._mesh, self._batch_size = dp.mesh, batch_size
        self._arrays = ImageArrays(arrays.images[:MAX_IMAGES], None, arrays.num_classes)
        self.warned = False

    def __call__(self, state: Any) -> dict[str, float]:
        variables = predict.model_variables(state)
        chunks = {"projection": [], "features": []}
        batches = data_pipeline.eval_batches(
            self._arrays, global_batch=self._batch_size, mesh=self._mesh
        )
        for batch in batches:
            for name, value in self._predict(variables, batch["image"]).items():
                chunks[name].append(multihost_utils.process_allgather(value, tiled=True))
        count = len(self._arrays)  # only the last batch is padded
        projection = np.concatenate(chunks["projection"])[:count]
        features = np.concatenate(chunks["features"])[:count]
        found = {
            "proj_std": l2_normalized_std(projection),
            "effective_rank": effective_rank(features),
        }
        dims = projection.shape[1]
        if not self.warned and is_collapsed(found["proj_std"], dims):
            self.warned = True
            logging.warning(
                "Representation collapse: the L2-normalised projections' std is %.3g, under %g "
                "of the 1/sqrt(%d) = %.3g of spread-out projections; effective rank of the "
                "features %.2f. Check the learning rate, temperature and augmentation.",
                found["proj_std"], COLLAPSED_FRACTION, dims, 1 / math.sqrt(dims),
                found["effective_rank"],
            )  # fmt: skip
        return found


def build(
    dp: Any, model: Any, image_size: int, data: Any, *, batch_size: int
) -> tuple[CollapseMonitor | None, str | None]:
    """(monitor, None), or (None, why it cannot run on `data`): the shape of an evaluator kind's
    builder (train/evaluators.py)."""
    if data.eval_arrays is None:
        return None, "the collapse monitor needs the eval split in memory"
    return CollapseMonitor(dp, model, image_size, data.eval_arrays, batch_size=batch_size), None
