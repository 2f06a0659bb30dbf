"""tensorflow_datasets: fixed-size splits in memory, and a host tf.data pipeline for big images.

tensorflow and tensorflow_datasets are imported inside the functions only, so the rest of simclr_jax
runs where they are not installed (GPU boxes often have JAX without TF). Nothing here downloads: a
dataset missing from `data_dir` fails within seconds with the command that prepares it, instead of
hanging on a download on a machine with no network.

The host pipeline does only what needs the host (decoding, and cropping variable-size images to one
fixed size); colour jitter, flip and blur run on the accelerator (simclr_jax.data.augment).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from simclr_jax.data.arrays import ImageArrays
from simclr_jax.data.augment import ASPECT_RANGE, CROP_ATTEMPTS, MIN_OBJECT_COVERED

CROP_PROPORTION = 0.875  # eval centre crop, the ImageNet standard used by the reference.
_INSTALL_HINT = "install the [tfds] extra: pip install tensorflow-cpu tensorflow-datasets"


def _import_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(f"the tfds source needs tensorflow_datasets: {_INSTALL_HINT}") from err
    # TF must not grab the accelerator that JAX uses; the host pipeline only needs the CPU.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices: nothing more to do.
        pass
    return tf, tfds


def _builder(name: str, data_dir: str):
    _, tfds = _import_tfds()
    try:
        return tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"dataset.name {name!r} is not a tfds dataset (see tfds.list_builders()), nor a local "
            "dataset ('fashion_mnist') nor 'folder'"
        ) from None


def dataset_info(name: str, *, data_dir: str = ""):
    """tfds's DatasetInfo (features, split sizes) without reading or downloading any data."""
    return _builder(name, data_dir).info


def _as_dataset(
    name: str, split, *, data_dir: str, shuffle_files: bool = False, seed: int = 0, decoders=None
):
    """Read a prepared split (never downloads); a missing one raises with the command to build."""
    _, tfds = _import_tfds()
    builder = _builder(name, data_dir)
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    try:
        return builder.as_dataset(
            split=split, shuffle_files=shuffle_files, read_config=read_config, decoders=decoders
        ), builder.info
    except AssertionError as err:  # tfds signals "not prepared" with an AssertionError.
        where = f" --data_dir={data_dir}" if data_dir else ""
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}: run `tfds build {name}"
            f"{where}` on a machine with network access (or copy the prepared directory here). "
            f"({err})"
        ) from None


def _num_classes(info) -> int:
    if "label" not in info.features:
        return 0
    return int(getattr(info.features["label"], "num_classes", 0) or 0)


def load_arrays(name: str, split: str, *, data_dir: str = "") -> ImageArrays:
    """A whole split of a fixed-size tfds dataset (CIFAR-10, STL-10, ...) in memory, uint8."""
    _, tfds = _import_tfds()
    builder = _builder(name, data_dir)
    shape = builder.info.features["image"].shape
    if any(d is None for d in shape):
        raise ValueError(
            f"tfds dataset {name!r} has variable-size images {shape}; it cannot be held in memory "
            "as one array. Stream it with simclr_jax.data.tfds_source.host_pipeline."
        )
    ds, info = _as_dataset(name, split, data_dir=data_dir)
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(4096)):
        images.append(batch["image"])
        if "label" in batch:
            labels.append(batch["label"])
    images = np.concatenate(images) if images else np.zeros((0, *shape), np.uint8)
    labels = np.concatenate(labels).astype(np.int32) if labels else None
    return ImageArrays(images, labels, _num_classes(info))


# ----------------------------------------------------------------------------------- host pipeline


def _decode(tf, encoded, channels: int):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _resize_uint8(tf, image, size: int):
    """Bicubic resize to [size, size] without antialiasing (as the reference), back to uint8."""
    image = tf.image.resize(image, [size, size], method="bicubic", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def random_crop_window(tf, shape, seed, *, min_area: float = 0.08):
    """(begin, size) of a random crop, the reference's call: area [min_area, 1], aspect 3/4-4/3,
    at least 10% of the image covered, whole image after 100 misses (augment.sample_crop_box is the
    same sampler on the accelerator)."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RANGE,
        area_range=(min_area, 1.0),
        max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, crop_size


def random_crop_uint8(tf, image, size: int, seed, *, min_area: float = 0.08):
    """Random-resized crop (random_crop_window), bicubic-resized to size^2."""
    begin, crop_size = random_crop_window(tf, tf.shape(image), seed, min_area=min_area)
    return _resize_uint8(tf, tf.slice(image, begin, crop_size), size)


def center_crop_uint8(tf, image, size: int, crop_proportion: float = CROP_PROPORTION):
    """Central square crop keeping `crop_proportion` of the shorter side, resized to size^2."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(
        tf.math.rint(crop_proportion * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
    )
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    return _resize_uint8(tf, image[top : top + side, left : left + side], size)


def _local_split(tfds, split: str):
    import jax

    return tfds.split_for_jax_process(
        split, process_index=jax.process_index(), process_count=jax.process_count()
    )


def host_pipeline(
    name: str,
    split: str,
    *,
    local_batch: int,
    image_size: int,
    train: bool,
    data_dir: str = "",
    seed: int = 0,
    num_crops: int = 1,
    crop_min_area: float = 0.08,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches of fixed-size uint8 crops of a (variable-size) tfds dataset.

    train=True: the batches of steps start_step, start_step + 1, ... of step_stream.StepStream
    (examples read by index in a (seed, epoch) permutation, so any step can be produced again),
    `num_crops` independent random-resized crops per image ('image' uint8 [b, S, S, C], or
    [b, num_crops, S, S, C] when num_crops > 1: pretraining asks for 2, one per SimCLR view, and
    skips the crop on device). Trainers use StepStream itself (`batch(step)`).
    train=False: one pass, centre crop (0.875) and resize; the last batch is padded with zeros and
    'mask' (1 real, 0 padding) says which rows count. In multi-process runs every process yields
    the same number of batches (all-padding ones if its shard is shorter), so collectives match.
    Each process reads its own rows (training) or shard (evaluation, tfds.split_for_jax_process);
    `local_batch` is the global batch divided by jax.process_count().
    """
    if train:
        import jax

        from simclr_jax.data.step_stream import StepStream

        stream = StepStream(
            name, split, global_batch=local_batch * jax.process_count(), image_size=image_size,
            seed=seed, data_dir=data_dir, num_crops=num_crops, crop_min_area=crop_min_area,
        )  # fmt: skip
        return stream.batches(start_step)
    tf, tfds = _import_tfds()
    if num_crops != 1:
        raise ValueError("num_crops applies to training; evaluation takes one centre crop")
    decoders = {"image": tfds.decode.SkipDecoding()}
    ds, info = _as_dataset(name, _local_split(tfds, split), data_dir=data_dir, decoders=decoders)
    channels = info.features["image"].shape[-1] or 3
    has_label = "label" in info.features

    def prepare(example):
        image = center_crop_uint8(tf, _decode(tf, example["image"], channels), image_size)
        label = tf.cast(example["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
        return {"image": image, "label": label}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = tfds.as_numpy(ds.batch(local_batch).prefetch(tf.data.AUTOTUNE))
    num_batches = _eval_batches_per_process(info, split, local_batch)
    empty = {
        "image": np.zeros((local_batch, image_size, image_size, channels), np.uint8),
        "label": np.zeros((local_batch,), np.int32),
    }
    return _padded(batches, local_batch, num_batches, empty)


def _eval_batches_per_process(info, split: str, local_batch: int) -> int | None:
    """Batches every process yields (from the largest process shard); None if size unknown."""
    import jax

    try:
        total = info.splits[split].num_examples
    except (KeyError, ValueError):
        return None
    if not total:
        return None
    return math.ceil(math.ceil(total / jax.process_count()) / local_batch)


def _padded(batches, local_batch: int, num_batches: int | None, empty: dict[str, np.ndarray]):
    yielded = 0
    for batch in batches:
        real = batch["image"].shape[0]
        out = {k: _pad_rows(v, local_batch) for k, v in batch.items()}
        out["mask"] = (np.arange(local_batch) < real).astype(np.float32)
        yield out
        yielded += 1
    while num_batches is not None and yielded < num_batches:
        yield {**empty, "mask": np.zeros(local_batch, np.float32)}
        yielded += 1


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])
