"""A stage's data: its training batches (a function of the step) and its exact-evaluation batches.

Fixed-size datasets live on the devices (pipeline.DeviceResidentData). Variable-size tfds datasets
(ImageNet, a folder prepared by `simclr_jax.prepare`) stream through the host, which decodes and
crops: training examples are read by index (step_stream.StepStream), evaluation in one pass
(step_stream.eval_batches). Either way a step's batch is a function of (seed, step), so a resumed
run sees exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax.data import augment, catalog, sources, splits, streaming, tfds_source
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.data.step_stream import StepStream, eval_batches

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StageData:
    """Where a run's batches come from, whichever path serves them."""

    num_examples: int | None  # training examples; None: a streamed split of unknown size
    num_classes: int
    channels: int
    batch_for_step: Callable[[int], Batch]  # the global batch of a step
    eval_batches: Callable[[], Iterable[Batch]] | None  # a fresh pass, padded and masked
    precropped: bool  # the host took the crops (streamed, variable-size images)
    train_arrays: ImageArrays | None = None  # the labelled in-memory train set (kNN's bank)
    eval_arrays: ImageArrays | None = None
    # The global batch's shapes and dtypes, what the step is compiled for (the planner's input).
    batch_shapes: Mapping[str, jax.ShapeDtypeStruct] = dataclasses.field(default_factory=dict)


def pretraining_data(config: ml_collections.ConfigDict, mesh: Any) -> StageData:
    """Pretraining: the labelled train split (the online probe reads its labels)."""
    if streaming.is_streamed(config.dataset):
        return _streamed(config, mesh, num_crops=2, channels=None, needs_labels=None)
    train = sources.load_split(config.dataset, config.dataset.train_split)
    if train.labels is None:
        raise ValueError("pretraining with the online probe needs a labeled train split")
    return _resident(config, mesh, train)


def labeled_data(
    config: ml_collections.ConfigDict, mesh: Any, channels: int | None = None
) -> StageData:
    """Fine-tuning: the label_fraction subset; `channels` (a checkpoint's) converts the images."""
    if streaming.is_streamed(config.dataset):
        _refuse_label_fraction(config)
        return _streamed(config, mesh, num_crops=1, channels=channels, needs_labels="fine-tuning")
    train = sources.load_split(config.dataset, config.dataset.train_split)
    train = labeled_subset(train, config.label_fraction, config.label_seed)
    return _resident(config, mesh, match_channels(train, channels), channels)


def distillation_data(
    config: ml_collections.ConfigDict, mesh: Any, num_classes: int, channels: int | None = None
) -> StageData:
    """Distillation: step -> {'image'} unlabelled, plus {'labeled_image', 'label'} when alpha > 0.

    The unlabelled pool loses its labels here, so they can never reach the step; the labelled
    subset (label_fraction of the same split) feeds the labelled loss and the kNN monitor.
    `channels` (the teacher's) converts the images, as for fine-tuning: an RGB teacher (an
    official model) labels grayscale data, and the student reads the same images.
    """
    if streaming.is_streamed(config.dataset):
        return _streamed_distillation(config, mesh, num_classes, channels)
    train = match_channels(sources.load_split(config.dataset, config.dataset.train_split), channels)
    labeled = None
    if train.labels is not None and (config.alpha > 0 or config.evals.knn.k > 0):
        labeled = labeled_subset(train, config.label_fraction, config.label_seed)
    elif config.alpha > 0:
        raise ValueError("alpha > 0 needs a labelled dataset.train_split")
    if labeled is not None and labeled.num_classes != num_classes:
        raise ValueError(
            f"the teacher predicts {num_classes} classes but {config.dataset.name!r} has "
            f"{labeled.num_classes}"
        )
    pool = _resident(config, mesh, ImageArrays(train.images, None, train.num_classes), channels)
    extra = None
    if config.alpha > 0:
        extra = data_pipeline.DeviceResidentData(
            labeled, global_batch=config.labeled_batch_size, seed=config.seed + 1, mesh=mesh
        ).batch
    batch_for_step = functools.partial(_distillation_batch, pool.batch_for_step, extra)
    shapes = _distillation_batch_shapes(config, pool.batch_shapes["image"].shape[1:])
    return dataclasses.replace(
        pool,
        num_classes=num_classes,
        batch_for_step=batch_for_step,
        train_arrays=labeled,
        batch_shapes=shapes,
    )


def planned_data(
    config: ml_collections.ConfigDict, stage: str, *, channels: int | None = None
) -> StageData:
    """`stage`'s ('pretrain', 'finetune', 'distill') StageData from the dataset's catalog facts:
    sizes and batch shapes, no batches and no evaluation. What the planner compiles for; the
    data itself is never read. `channels`: the checkpoint's, as the real loaders convert to."""
    dataset = config.dataset
    found = catalog.facts(dataset)
    num_examples = found.num_examples(dataset.train_split)
    if stage == "finetune" and not found.streamed:
        num_examples = max(1, round(num_examples * config.label_fraction))
    height, width, have_channels = found.image_shape
    if found.streamed:  # converted only in memory: a mismatch is the real loader's error
        crops = 2 if stage == "pretrain" else 1
        shapes = _streamed_batch_shapes(config.batch_size, crops, dataset.image_size, have_channels)
        image_shape = (dataset.image_size, dataset.image_size, have_channels)
    else:
        have_channels = channels or have_channels
        image_shape = (height, width, have_channels)
        shapes = _resident_batch_shapes(config.batch_size, image_shape)
    if stage == "distill":
        shapes = _distillation_batch_shapes(config, image_shape)
    return StageData(
        num_examples=num_examples,
        num_classes=found.num_classes,
        channels=have_channels,
        batch_for_step=_not_planned,
        eval_batches=None,
        precropped=found.streamed,
        batch_shapes=shapes,
    )


def _not_planned(step: int) -> Batch:
    raise RuntimeError("a planned StageData has no batches: it only shapes the compiled step")


def _spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))


def _resident_batch_shapes(batch: int, image_shape: tuple[int, ...]) -> dict:
    """pipeline.DeviceResidentData.batch: uint8 images, int32 labels and dataset indices."""
    return {
        "image": _spec((batch, *image_shape), jnp.uint8),
        "label": _spec((batch,), jnp.int32),
        "index": _spec((batch,), jnp.int32),
    }


def _streamed_batch_shapes(batch: int, crops: int, size: int, channels: int) -> dict:
    """step_stream.StepStream.batch: host crops, one per view ([B, crops, S, S, C] when > 1)."""
    image = (batch, crops, size, size, channels) if crops > 1 else (batch, size, size, channels)
    return {"image": _spec(image, jnp.uint8), "label": _spec((batch,), jnp.int32)}


def _distillation_batch_shapes(config: ml_collections.ConfigDict, image_shape) -> dict:
    """_distillation_batch: the unlabelled images, and the labelled batch when alpha > 0."""
    shapes = {"image": _spec((config.batch_size, *image_shape), jnp.uint8)}
    if config.alpha > 0:
        shapes["labeled_image"] = _spec((config.labeled_batch_size, *image_shape), jnp.uint8)
        shapes["label"] = _spec((config.labeled_batch_size,), jnp.int32)
    return shapes


def labeled_subset(arrays: ImageArrays, fraction: float, seed: int) -> ImageArrays:
    """The class-stratified `fraction` of a labelled split; a pure function of its arguments, so
    every host (and every rerun) picks the same examples."""
    if arrays.labels is None:
        raise ValueError("dataset.train_split has no labels; fine-tuning needs a labelled split")
    if fraction >= 1.0:
        return arrays
    return sources.take_label_fraction(arrays, fraction, seed=seed)


def match_channels(arrays: ImageArrays, channels: int | None) -> ImageArrays:
    """`arrays` with the channel count the network expects (None: keep the data's own).

    For transfer from a checkpoint: grayscale is repeated to RGB, RGB becomes its luma
    (augment.GRAYSCALE_WEIGHTS). Done once on the host, before the data goes to the devices.
    """
    have = arrays.images.shape[-1]
    if channels is None or channels == have:
        return arrays
    if (have, channels) == (1, 3):
        images = np.repeat(arrays.images, 3, axis=-1)
    elif (have, channels) == (3, 1):
        luma = arrays.images.astype(np.float32) @ np.asarray(augment.GRAYSCALE_WEIGHTS, np.float32)
        images = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    else:
        raise ValueError(f"cannot convert {have}-channel images to {channels} channels (1 or 3)")
    return ImageArrays(images, arrays.labels, arrays.num_classes)


def _distillation_batch(unlabeled: Callable, labeled: Callable | None, step: int) -> Batch:
    batch = {"image": unlabeled(step)["image"]}
    if labeled is not None:
        extra = labeled(step)
        batch.update(labeled_image=extra["image"], label=extra["label"])
    return batch


def _resident(
    config: ml_collections.ConfigDict,
    mesh: Any,
    train: ImageArrays,
    channels: int | None = None,
) -> StageData:
    """Fixed-size data on the devices; the eval split (if any) in `channels` for exact batches."""
    resident = data_pipeline.DeviceResidentData(
        train, global_batch=config.batch_size, seed=config.seed, mesh=mesh
    )
    eval_arrays = eval_batches = None
    if config.dataset.eval_split:
        eval_arrays = sources.load_split(config.dataset, config.dataset.eval_split)
        eval_arrays = match_channels(eval_arrays, channels)
        eval_batches = functools.partial(
            data_pipeline.eval_batches, eval_arrays, global_batch=config.eval_batch_size, mesh=mesh
        )
    return StageData(
        num_examples=len(train),
        num_classes=train.num_classes,
        channels=train.images.shape[-1],
        batch_for_step=resident.batch,
        eval_batches=eval_batches,
        precropped=False,
        train_arrays=train if train.labels is not None else None,
        eval_arrays=eval_arrays,
        batch_shapes=_resident_batch_shapes(config.batch_size, train.images.shape[1:]),
    )


def _refuse_label_fraction(config: ml_collections.ConfigDict) -> None:
    if config.label_fraction < 1.0:
        raise ValueError(
            f"label_fraction={config.label_fraction} needs an in-memory dataset; a streamed one "
            "takes a slice of its split instead: dataset.train_split='train[:10%]' (a prepared "
            "folder's train split is in a fixed random order, so a slice is a random subset; for "
            "ImageNet use dataset.name='imagenet2012_subset/10pct'), with label_fraction=1.0"
        )


def _check_streamed_split(dataset: ml_collections.ConfigDict, info, field: str) -> None:
    """A split the dataset does not have: one line naming the field and the splits it has."""
    base, _, _ = splits.parse_split(dataset[field])
    have = sorted(info.splits.keys())
    if have and base not in have:  # (tfds's mock data records no splits)
        raise ValueError(
            f"dataset.{field}={dataset[field]!r} is not a split of {dataset.name!r} (splits: "
            f"{', '.join(have)}); set --config.dataset.{field}=NAME"
        )


def _streamed(
    config: ml_collections.ConfigDict,
    mesh: Any,
    *,
    num_crops: int,
    channels: int | None,
    needs_labels: str | None,
) -> StageData:
    """Variable-size tfds data: host-cropped batches, `num_crops` per image (2: one per view).

    `needs_labels` names the stage that cannot run without labels (None: pretraining, whose probe
    then has nothing to learn). An eval split always needs them."""
    dataset = config.dataset
    info = tfds_source.dataset_info(dataset.name, data_dir=dataset.data_dir)
    have = info.features["image"].shape[-1] or 3
    if channels is not None and channels != have:
        raise ValueError(
            f"{dataset.name!r} has {have}-channel images but the config.init_checkpoint network "
            f"expects {channels}; channels are converted only for in-memory datasets"
        )
    classes = tfds_source.num_classes(info)
    if not classes and needs_labels:
        raise ValueError(
            f"{needs_labels} needs labels, but {dataset.name!r} has none (prepared from a flat "
            "folder): prepare a folder with one subfolder per class, train/<class>/..."
        )
    if not classes and dataset.eval_split:
        raise ValueError(
            f"dataset.eval_split={dataset.eval_split!r}: {dataset.name!r} has no labels to "
            "evaluate with; set --config.dataset.eval_split=''"
        )
    for field in ("train_split", "eval_split") if dataset.eval_split else ("train_split",):
        _check_streamed_split(dataset, info, field)
    train = _step_stream(config, config.batch_size, config.seed, num_crops)
    processes = jax.process_count()

    def eval_pass() -> Iterable[Batch]:
        batches = eval_batches(
            dataset.name, dataset.eval_split, local_batch=config.eval_batch_size // processes,
            image_size=dataset.image_size, data_dir=dataset.data_dir,
        )  # fmt: skip
        return (data_pipeline.to_global_batch(batch, mesh) for batch in batches)

    return StageData(
        num_examples=train.num_examples,  # the data source's length: known for every split
        num_classes=classes,
        channels=have,
        batch_for_step=functools.partial(_global_batch, train, mesh),
        eval_batches=eval_pass if dataset.eval_split else None,
        precropped=True,
        batch_shapes=_streamed_batch_shapes(config.batch_size, num_crops, dataset.image_size, have),
    )


def _step_stream(
    config: ml_collections.ConfigDict, global_batch: int, seed: int, num_crops: int
) -> StepStream:
    dataset = config.dataset
    return StepStream(
        dataset.name, dataset.train_split, global_batch=global_batch,
        image_size=dataset.image_size, seed=seed, data_dir=dataset.data_dir,
        num_crops=num_crops, crop_min_area=config.augment.crop_min_area,
    )  # fmt: skip


def _global_batch(stream: StepStream, mesh: Any, step: int) -> Batch:
    return data_pipeline.to_global_batch(stream.batch(step), mesh)


def _streamed_distillation(
    config: ml_collections.ConfigDict, mesh: Any, num_classes: int, channels: int | None
) -> StageData:
    """Distillation's streamed data: the unlabelled pool (labels dropped), and with alpha > 0 a
    second stream of labelled batches (labeled_batch_size, its own order: seed + 1)."""
    _refuse_label_fraction(config)
    needs = "distillation with alpha > 0" if config.alpha > 0 else None
    pool = _streamed(config, mesh, num_crops=1, channels=channels, needs_labels=needs)
    if pool.num_classes and pool.num_classes != num_classes:
        raise ValueError(
            f"the teacher predicts {num_classes} classes but {config.dataset.name!r} has "
            f"{pool.num_classes}"
        )
    extra = None
    if config.alpha > 0:
        labeled = _step_stream(config, config.labeled_batch_size, config.seed + 1, 1)
        extra = functools.partial(_global_batch, labeled, mesh)
    batch_for_step = functools.partial(_distillation_batch, pool.batch_for_step, extra)
    shapes = _distillation_batch_shapes(config, pool.batch_shapes["image"].shape[1:])
    return dataclasses.replace(
        pool, num_classes=num_classes, batch_for_step=batch_for_step, batch_shapes=shapes
    )
