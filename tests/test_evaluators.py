"""Evaluators are built once: a second evaluation traces nothing, and the results are exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from simclr_jax import parallel
from simclr_jax.data import pipeline
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.train import evaluators

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # recorded by jax at every trace


class TinyNet(nn.Module):
    """Conv + BatchNorm + classifier, with 'features' and 'logits' like a SimCLRModel."""

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = nn.Conv(4, (3, 3))(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        features = nn.relu(x).mean((1, 2))
        return {"features": features, "logits": nn.Dense(3)(features)}


class Traces:
    """Counts jax's trace events while open."""

    def __enter__(self) -> Traces:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        self.count += event == TRACE_EVENT


def split(rng, n: int) -> ImageArrays:
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = np.clip(labels[:, None, None, None] * 90 + rng.integers(0, 60, (n, 8, 8, 1)), 0, 255)
    return ImageArrays(images.astype(np.uint8), labels, 3)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    train, test = split(rng, 30), split(rng, 21)  # 21 = 3 batches of 8, the last one padded
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    model = TinyNet()
    states = [
        model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)), train=False) for seed in (1, 2)
    ]
    batches = lambda: pipeline.eval_batches(test, global_batch=8, mesh=dp.mesh)  # noqa: E731
    exact = evaluators.ExactEvaluator(dp, model, 8, batches)
    knn = evaluators.KnnMonitor(dp, model, 8, train, test, batch_size=8, k=5, temperature=0.5)
    return model, states, exact, knn, test


def test_a_second_evaluation_traces_nothing(setup):
    _, (first, second), exact, knn, _ = setup
    for evaluator in (exact, knn):
        with Traces() as traces:
            evaluator(first)
        assert traces.count > 0  # the counter sees the first evaluation's traces
        with Traces() as traces:
            found = evaluator(second)  # other values, same shapes: the same programs
        assert traces.count == 0, evaluator
        assert all(np.isfinite(v) for v in found.values())


def test_exact_evaluation_counts_every_example_once(setup):
    model, (first, _), exact, _, test = setup
    logits = np.asarray(
        model.apply(first, test.images.astype(np.float32) / 255.0, train=False)["logits"]
    )
    found = exact(first)
    assert found["eval_count"] == len(test) == 21
    assert found["eval_top1"] == pytest.approx(np.mean(logits.argmax(1) == test.labels))
    assert found["eval_loss"] == pytest.approx(
        float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, test.labels))),
        rel=1e-5,
    )
