"""Distillation: the step's loss against NumPy, labels that never reach it, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from test_finetune import load_config

from simclr_jax import distill, losses, parallel, validation
from simclr_jax.data import augment, stage_data
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.train.state import TrainState


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_objective(student, teacher, temperature, alpha, labeled=None, labels=None) -> dict:
    teacher_probs = np.exp(log_softmax(teacher / temperature))
    distill_loss = np.mean(-(teacher_probs * log_softmax(student / temperature)).sum(-1))
    if labeled is None:
        return {"distill_loss": distill_loss, "loss": distill_loss}
    labeled_loss = np.mean(-log_softmax(labeled)[np.arange(len(labels)), labels])
    loss = (1 - alpha) * distill_loss + alpha * labeled_loss
    return {"distill_loss": distill_loss, "labeled_loss": labeled_loss, "loss": loss}


def test_objective_matches_numpy():
    rng = np.random.default_rng(0)
    student, teacher, labeled = (rng.normal(size=(n, 5)) * 3 for n in (6, 6, 4))
    labels = rng.integers(0, 5, 4)
    _, pure = losses.distillation_objective(
        jnp.asarray(student), jnp.asarray(teacher), temperature=2.0
    )
    expected = numpy_objective(student, teacher, 2.0, 0.0)
    assert float(pure["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    _, mixed = losses.distillation_objective(
        jnp.asarray(student), jnp.asarray(teacher), temperature=2.0, alpha=0.25,
        labeled_logits=jnp.asarray(labeled), labels=jnp.asarray(labels),
    )  # fmt: skip
    expected = numpy_objective(student, teacher, 2.0, 0.25, labeled, labels)
    for key in ("distill_loss", "labeled_loss", "loss"):
        assert float(mixed[key]) == pytest.approx(expected[key], rel=1e-5), key


class TinyNet(nn.Module):
    """A conv + BatchNorm + dense classifier: the step treats it as it treats a SimCLRModel, and it
    compiles in a fraction of the time."""

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = nn.Conv(4, (3, 3), strides=2)(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return {"logits": nn.Dense(10)(nn.relu(x).mean((1, 2)))}


def test_distill_step_loss_matches_numpy_from_teacher_and_student_logits():
    """One step on a batch: its reported losses equal NumPy's on the logits of the same views
    (teacher in inference mode, student in training mode; alpha mixes in the labelled batch)."""
    config = load_config(
        "distill_fashion_mnist.py", "tiny", "--config.alpha=0.3", "--config.temperature=2.0"
    )
    teacher, student = TinyNet(), TinyNet()
    dummy = jnp.zeros((1, 28, 28, 1))
    teacher_variables = teacher.init(jax.random.key(1), dummy, train=False)
    # A confident teacher with non-trivial BN statistics, so its soft labels carry information
    # and inference mode differs from training mode.
    teacher_variables = jax.tree.map(lambda x: x * 30.0 + 0.1, teacher_variables)
    student_variables = student.init(jax.random.key(2), dummy, train=False)
    state = TrainState.create(
        params=student_variables["params"],
        batch_stats=student_variables["batch_stats"],
        tx=optax.sgd(0.1),
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)),
        "labeled_image": jnp.asarray(rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, 4, dtype=np.int32)),
    }
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    step = dp.map(
        distill.make_train_step(student, teacher, config, with_labels=True),
        sharded_args=(False, False, True),
        sharded_outputs=False,
    )
    new_state, aux = step(state, teacher_variables, batch)

    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    view_args = dict(out_size=28, crop_min_area=config.augment.crop_min_area, flip=True)
    view = augment.finetune_views(key, batch["image"], jnp.arange(8), **view_args)
    labeled_view = augment.finetune_views(
        jax.random.fold_in(key, distill.LABELED_STREAM),
        batch["labeled_image"],
        jnp.arange(4),
        **view_args,
    )
    teacher_logits = np.asarray(teacher.apply(teacher_variables, view, train=False)["logits"])
    out, updates = student.apply(
        student_variables,
        jnp.concatenate([view, labeled_view]),
        train=True,
        mutable=["batch_stats"],
    )
    student_logits = np.asarray(out["logits"], np.float64)
    expected = numpy_objective(
        student_logits[:8],
        teacher_logits.astype(np.float64),
        2.0,
        0.3,
        student_logits[8:],
        np.asarray(batch["label"]),
    )
    assert np.std(teacher_logits) > 0.5  # far from uniform soft labels
    for name in ("distill_loss", "labeled_loss", "loss"):
        assert float(aux[name]) == pytest.approx(expected[name], rel=1e-5), name
    # The student's BN statistics are those of its training-mode pass over both batches.
    for new, ref in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(updates["batch_stats"]), strict=True
    ):
        np.testing.assert_allclose(new, ref, rtol=1e-6)


def test_unlabelled_batches_carry_no_labels(monkeypatch):
    """The unlabelled pool's labels are dropped at loading: poisoning them changes nothing, and the
    step's batch has no label field unless alpha > 0 adds the labelled subset."""
    config = load_config(
        "distill_fashion_mnist.py", "tiny", "--config.dataset.eval_split=", "--config.evals.knn.k=0"
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    mesh = parallel.make_mesh(jax.devices()[:1])

    def data_with(these: np.ndarray):
        arrays = ImageArrays(images, these, 10)
        monkeypatch.setattr(stage_data.sources, "load_split", lambda dataset, split: arrays)
        return stage_data.distillation_data(config, mesh, 10)

    batches = {}
    for name, these in (("clean", labels), ("poisoned", np.roll(labels, 7))):
        batches[name] = [data_with(these).batch_for_step(step) for step in range(4)]
    for clean, bad in zip(batches["clean"], batches["poisoned"], strict=True):
        assert set(clean) == set(bad) == {"image"}
        np.testing.assert_array_equal(clean["image"], bad["image"])
    config.alpha, config.label_fraction, config.labeled_batch_size = 0.5, 0.25, 4
    batch = data_with(labels).batch_for_step(0)
    assert set(batch) == {"image", "labeled_image", "label"}
    subset = stage_data.labeled_subset(ImageArrays(images, labels, 10), 0.25, config.label_seed)
    chosen = zip(subset.images, subset.labels, strict=True)
    pairs = {(image.tobytes(), int(label)) for image, label in chosen}
    assert len(subset) < len(images)
    got = zip(np.asarray(batch["labeled_image"]), np.asarray(batch["label"]), strict=True)
    assert all((image.tobytes(), int(label)) in pairs for image, label in got)


def test_an_rgb_teacher_gets_grayscale_data_as_rgb(monkeypatch):
    """A teacher with 3 input channels (an official model) on 1-channel data: every image the
    step and the evaluation see is the grayscale repeated, as fine-tuning converts it."""
    config = load_config("distill_fashion_mnist.py", "tiny", "--config.evals.knn.k=0")
    config.alpha, config.label_fraction, config.labeled_batch_size = 0.5, 0.25, 4
    rng = np.random.default_rng(0)
    arrays = ImageArrays(rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8),
                         rng.integers(0, 10, 40).astype(np.int32), 10)  # fmt: skip
    monkeypatch.setattr(stage_data.sources, "load_split", lambda dataset, split: arrays)
    data = stage_data.distillation_data(config, parallel.make_mesh(jax.devices()[:1]), 10, 3)
    assert data.channels == 3
    batch = data.batch_for_step(0)
    evaluated = next(iter(data.eval_batches()))
    for images in (batch["image"], batch["labeled_image"], evaluated["image"]):
        images = np.asarray(images)
        assert images.shape[-1] == 3
        np.testing.assert_array_equal(images, np.repeat(images[..., :1], 3, axis=-1))
    rows = {image.tobytes() for image in arrays.images}
    assert all(image[..., :1].tobytes() in rows for image in np.asarray(batch["image"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.alpha=1.5", "alpha"),
        ("--config.temperature=0.0", "temperature"),
        ("--config.teacher_checkpoint=", "teacher_checkpoint"),
        ("--config.label_fraction=0.0", "label_fraction"),
    ],
)
def test_bad_values_name_their_field(override, message):
    overrides = ["--config.teacher_checkpoint=/somewhere"]
    if not override.startswith("--config.teacher_checkpoint"):
        overrides.append(override)
    else:
        overrides = [override]
    with pytest.raises(ValueError, match=message):
        validation.validate_distill(load_config("distill_fashion_mnist.py", "tiny", *overrides))
