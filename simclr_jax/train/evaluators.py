"""A run's evaluators: exact evaluation and the kNN monitor, built once and called on any state.

Each evaluator maps its predict step across devices when it is built, so every evaluation of a
run reuses one compiled program (nothing is traced again). They take the replicated train state
(anything with .params and .batch_stats) or a variables dict, and return named metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax.data import augment
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.train import collapse, scoring

Evaluator = Callable[[Any], dict[str, float]]


def make_predict_step(model: Any, image_size: int, *, output: str = "logits", precropped=False):
    """Per-replica `output` ('logits', 'features', ...) of uint8 evaluation images, BN inference.

    Centre crop and resize (augment.eval_preprocess); precropped: the host already took the crop
    at image_size (streamed datasets), so only the scaling to [0, 1] remains.
    """

    def predict(variables: Any, images: jax.Array) -> jax.Array:
        if precropped:
            x = augment.to_float(images)
        else:
            x = augment.eval_preprocess(images, out_size=image_size)
        return model.apply(variables, x, train=False)[output]

    return predict


def model_variables(state: Any) -> Mapping[str, Any]:
    """{'params', 'batch_stats'} of a train state; a variables dict is returned as it is."""
    if isinstance(state, Mapping):
        return state
    return {"params": state.params, "batch_stats": state.batch_stats}


class ExactEvaluator:
    """Top-1, top-5, loss and count of the classifier over a whole eval split (padded, masked)."""

    def __init__(
        self,
        dp: Any,
        model: Any,
        image_size: int,
        batches: Callable[[], Iterable[Mapping[str, jax.Array]]],
        *,
        precropped: bool = False,
        prefix: str = "eval_",
    ):
        predict = make_predict_step(model, image_size, precropped=precropped)
        self._predict = dp.map(predict, sharded_args=(False, True), sharded_outputs=True)
        self._batches = batches
        self._prefix = prefix

    def __call__(self, state: Any) -> dict[str, float]:
        variables = model_variables(state)
        result = scoring.exact_evaluate(
            lambda images: self._predict(variables, images), self._batches()
        )
        return {f"{self._prefix}{name}": value for name, value in result.items()}


class KnnMonitor:
    """{'knn_top1'}: a temperature-weighted kNN vote on backbone features (cosine similarity).

    Embeds a labelled training set (the bank) and the eval split with the current model (centre
    crop, BN in inference mode), then classifies each eval image by its k most similar bank
    features (scoring.knn_*). Cheap next to a linear probe, and it trains nothing.
    """

    def __init__(
        self,
        dp: Any,
        model: Any,
        image_size: int,
        bank: ImageArrays,
        queries: ImageArrays,
        *,
        batch_size: int,
        k: int = 200,
        temperature: float = 0.1,
    ):
        if bank.labels is None or queries.labels is None:
            raise ValueError("the kNN monitor needs a labelled bank and labelled queries")
        features = make_predict_step(model, image_size, output="features")
        self._features = dp.map(features, sharded_args=(False, True), sharded_outputs=True)
        self._mesh, self._batch_size = dp.mesh, batch_size
        self._bank, self._queries = bank, queries
        self._k, self._temperature = k, temperature

    def __call__(self, state: Any) -> dict[str, float]:
        variables = model_variables(state)
        accuracy = scoring.knn_evaluate(
            self._embed(variables, self._bank),
            self._bank.labels,
            self._embed(variables, self._queries),
            self._queries.labels,
            num_classes=max(self._bank.num_classes, self._queries.num_classes),
            k=self._k,
            temperature=self._temperature,
        )
        return {"knn_top1": accuracy}

    def _embed(self, variables: Any, arrays: ImageArrays) -> np.ndarray:
        """float32 [N, D] features of every image of `arrays`, on the host (every process)."""
        chunks = []
        batches = data_pipeline.eval_batches(arrays, global_batch=self._batch_size, mesh=self._mesh)
        for batch in batches:
            features = self._features(variables, batch["image"])
            chunks.append(multihost_utils.process_allgather(features, tiled=True))
        # Only the last batch is padded, so the first N rows are the real examples.
        return np.concatenate(chunks)[: len(arrays)]


def exact_evaluators(
    dp: Any, model: Any, config: ml_collections.ConfigDict, data: Any, *, prefix: str = "eval_"
) -> list[Evaluator]:
    """[ExactEvaluator] of `data`'s eval split (data/stage_data.StageData), or [] without one."""
    if data.eval_batches is None:
        return []
    size = config.dataset.image_size
    return [
        ExactEvaluator(
            dp, model, size, data.eval_batches, precropped=data.precropped, prefix=prefix
        )
    ]


def classifier_evaluators(
    dp: Any, model: Any, config: ml_collections.ConfigDict, data: Any
) -> list[Evaluator]:
    """Fine-tuning's and distillation's: exact evaluation ('eval_*') of `data`'s eval split, and
    the kNN monitor (config.knn.k > 0, in-memory data) whose bank is the labelled train set."""
    found = exact_evaluators(dp, model, config, data)
    if (
        found
        and config.knn.k > 0
        and data.train_arrays is not None
        and data.eval_arrays is not None
    ):
        found.append(
            KnnMonitor(
                dp,
                model,
                config.dataset.image_size,
                data.train_arrays,
                data.eval_arrays,
                batch_size=config.eval_batch_size,
                k=config.knn.k,
                temperature=config.knn.temperature,
            )  # fmt: skip
        )
    return found


def pretraining_evaluators(
    dp: Any, model: Any, config: ml_collections.ConfigDict, data: Any
) -> list[Evaluator]:
    """Pretraining's: the online probe's exact evaluation ('eval_probe_*') and, for in-memory
    data with config.knn.k > 0, the kNN monitor ('knn_top1') whose bank is a class-balanced
    `knn.bank_size` of the labelled training images (the whole split when 0 or larger)."""
    from simclr_jax.data import sources

    found = exact_evaluators(dp, model, config, data, prefix="eval_probe_")
    monitors = collapse.collapse_monitors(dp, model, config, data)  # 'proj_std', 'effective_rank'
    bank, queries = data.train_arrays, data.eval_arrays
    if not found or config.knn.k <= 0 or bank is None or queries is None:
        return found + monitors
    if 0 < config.knn.bank_size < len(bank):
        bank = sources.take_label_fraction(bank, config.knn.bank_size / len(bank), seed=config.seed)
    monitor = KnnMonitor(
        dp, model, config.dataset.image_size, bank, queries, batch_size=config.eval_batch_size,
        k=config.knn.k, temperature=config.knn.temperature,
    )  # fmt: skip
    return [*found, monitor, *monitors]


def evaluated_once(evaluator: Evaluator, variables: Any, names: Sequence[str]) -> Evaluator:
    """An evaluator of fixed `variables` (a frozen teacher): run once, its `names` remembered."""

    @functools.cache
    def once() -> tuple[tuple[str, float], ...]:
        found = evaluator(variables)
        return tuple((name, found[name]) for name in names)

    return lambda state: dict(once())
