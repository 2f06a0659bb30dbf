"""A run's evaluators, declared in `config.evals`, built once by `from_config`, run by training and
by the evaluation job alike, so both report the same number under the same name.

Each entry of `config.evals` is named by its kind and carries its cadence (`every_steps`: 0 = only
after the last step, < 0 = never) and its own fields (configs/base.py documents them):
- `probe`: the online probe's exact top-1/top-5, loss and count over the eval split ('eval_probe_*');
- `classifier`: the same for a fine-tuned or distilled classifier ('eval_*');
- `teacher`: distillation's teacher, once ('teacher_top1', 'teacher_top5');
- `knn`: a temperature-weighted kNN vote on backbone features ('knn_top1'), its bank a
  class-balanced `bank_size` of the labelled training images (in-memory datasets only);
- `collapse`: the collapse monitor (train/collapse.py: 'proj_std', 'effective_rank'; a warning
  once when the projections collapse), on the eval split's first images (in-memory datasets).

Each evaluator maps its predict step across devices when it is built, so every evaluation reuses
one compiled program. They take the replicated train state (anything with .params and
.batch_stats) or a variables dict, and return named metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import predict
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data import sources
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.train import collapse, scoring
from simclr_jax.train.task_progress import TaskProgress

Metrics = dict[str, float]
KINDS = ("probe", "classifier", "teacher", "knn", "collapse")
_PREFIX = {"probe": "eval_probe_", "classifier": "eval_", "teacher": "teacher_"}


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A named evaluation and when it runs: `due(step, total_steps)`, then `evaluator(state)`."""

    name: str
    every_steps: int
    evaluate: Callable[[Any], Metrics]

    def due(self, step: int, total_steps: int) -> bool:
        if self.every_steps < 0:
            return False
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    def __call__(self, state: Any) -> Metrics:
        return self.evaluate(state)


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
        logits = predict.predict_fn(
            model, image_size=image_size, output="logits",
            preprocess="precropped" if precropped else "eval",
        )  # fmt: skip
        self._predict = dp.map(logits, sharded_args=(False, True), sharded_outputs=True)
        self._batches = batches
        self._prefix = prefix

    def __call__(self, state: Any) -> Metrics:
        variables = predict.model_variables(state)
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
        features = predict.predict_fn(model, image_size=image_size, output="features")
        self._features = dp.map(features, sharded_args=(False, True), sharded_outputs=True)
        self._mesh, self._batch_size = dp.mesh, batch_size
        self._bank, self._queries = bank, queries
        self._k, self._temperature = k, temperature

    def __call__(self, state: Any) -> Metrics:
        variables = predict.model_variables(state)
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
        progress = TaskProgress("kNN monitor, features", len(arrays), unit=" images")
        for index, batch in enumerate(batches):
            features = self._features(variables, batch["image"])
            chunks.append(multihost_utils.process_allgather(features, tiled=True))
            progress.advance(min(self._batch_size, len(arrays) - index * self._batch_size))
        # Only the last batch is padded, so the first N rows are the real examples.
        return np.concatenate(chunks)[: len(arrays)]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """Distillation's frozen teacher: its network and (replicated) variables."""

    model: Any
    variables: Any


def from_config(
    config: ml_collections.ConfigDict,
    dp: Any,
    model: Any,
    data: Any,
    *,
    teacher: Teacher | None = None,
) -> list[Evaluator]:
    """Every evaluator `config.evals` declares that `data` can feed (data/stage_data.StageData),
    built once. One the data cannot feed (no eval split; kNN on a streamed dataset) is left out
    with a log line saying why."""
    built = []
    for name, fields in config.evals.items():
        if name not in KINDS:
            raise ValueError(f"config.evals.{name}: unknown evaluator; kinds: {list(KINDS)}")
        if fields.every_steps < 0:
            continue
        evaluate, missing = _build(name, fields, config, dp, model, data, teacher)
        if evaluate is None:
            logging.info("Evaluator %r left out: %s", name, missing)
            continue
        built.append(Evaluator(name, fields.every_steps, evaluate))
    return built


def _build(name, fields, config, dp, model, data, teacher):
    """(evaluate(state) -> metrics, None), or (None, why it cannot run on this data)."""
    size = config.dataset.image_size
    if data.eval_batches is None:
        return None, "no dataset.eval_split to evaluate on"
    if name in ("probe", "classifier"):
        exact = ExactEvaluator(
            dp, model, size, data.eval_batches, precropped=data.precropped, prefix=_PREFIX[name]
        )
        return exact, None
    if name == "teacher":
        if teacher is None:
            return None, "no teacher in this stage"
        exact = ExactEvaluator(
            dp, teacher.model, size, data.eval_batches, precropped=data.precropped,
            prefix=_PREFIX[name],
        )  # fmt: skip
        return _once(exact, teacher.variables), None
    if name == "collapse":
        return collapse.build(dp, model, size, data, batch_size=config.eval_batch_size)
    if fields.k <= 0:
        return None, "evals.knn.k is 0"
    bank, queries = data.train_arrays, data.eval_arrays
    if bank is None or queries is None:
        return None, "kNN needs the labelled train split and the eval split in memory"
    if 0 < fields.bank_size < len(bank):
        bank = sources.take_label_fraction(bank, fields.bank_size / len(bank), seed=config.seed)
    monitor = KnnMonitor(
        dp, model, size, bank, queries, batch_size=config.eval_batch_size, k=fields.k,
        temperature=fields.temperature,
    )  # fmt: skip
    return monitor, None


def _once(evaluate: Callable[[Any], Metrics], variables: Any) -> Callable[[Any], Metrics]:
    """An evaluator of fixed `variables` (a frozen teacher): computed once, then remembered."""
    found = functools.cache(lambda: evaluate(variables))
    return lambda state: dict(found())
