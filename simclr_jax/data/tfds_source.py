"""tensorflow_datasets: fixed-size splits in memory, random access to prepared splits, host crops.

tensorflow and tensorflow_datasets are imported inside the functions only, so the rest of simclr_jax
runs where they are not installed (GPU boxes often have JAX without TF). Nothing here downloads: a
dataset missing from `data_dir` fails within seconds with the command that prepares it, instead of
hanging on a download on a machine with no network.

Variable-size datasets (ImageNet, a folder prepared by `simclr_jax.prepare`) are read by index from
tfds's random-access data source (ArrayRecord files); step_stream.py builds the batches. The TF ops
here are what the host does to them: decoding, and cropping to one fixed size. Colour jitter, flip
and blur run on the accelerator (simclr_jax.data.augment).
"""

from __future__ import annotations

import numpy as np

from simclr_jax.data.arrays import ImageArrays
from simclr_jax.data.augment import (
    ASPECT_RANGE,
    CROP_ATTEMPTS,
    CROP_PROPORTION,
    EVAL_NO_CROP_MAX_SIZE,
    MIN_OBJECT_COVERED,
)

_INSTALL_HINT = "install the [tfds] extra: pip install tensorflow-cpu tensorflow-datasets"


def import_tfds():
    """(tensorflow, tensorflow_datasets), with TF kept off the accelerator JAX uses."""
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


def import_tfds_library():
    """tensorflow_datasets alone, for writing and naming files: that needs no TensorFlow, whose
    import costs seconds in every process that writes."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(f"preparing datasets needs tensorflow_datasets: {_INSTALL_HINT}") from err
    return tfds


def builder(name: str, data_dir: str):
    """tfds's builder of `name`: a registered dataset, or one prepared in `data_dir`."""
    _, tfds = import_tfds()
    try:
        return tfds.builder(name, data_dir=data_dir or None, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        where = f" nor prepared in {data_dir}" if data_dir else ""
        raise ValueError(
            f"dataset.name {name!r} is not a tfds dataset (see tfds.list_builders()){where}, nor "
            "a local dataset ('fashion_mnist') nor 'folder'"
        ) from None


def dataset_info(name: str, *, data_dir: str = ""):
    """tfds's DatasetInfo (features, split sizes) without reading or downloading any data."""
    return builder(name, data_dir).info


def _as_dataset(name: str, split, *, data_dir: str):
    """(tf.data of a prepared split, DatasetInfo); never downloads: a missing split raises with
    the command that prepares it."""
    _, tfds = import_tfds()
    found = builder(name, data_dir)
    read_config = tfds.ReadConfig(try_autocache=False)
    try:
        ds = found.as_dataset(split=split, shuffle_files=False, read_config=read_config)
        return ds, found.info
    except AssertionError as err:  # tfds signals "not prepared" with an AssertionError.
        where = f" --data_dir={data_dir}" if data_dir else ""
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {found.data_dir}: run `tfds build {name}"
            f"{where}` on a machine with network access (or copy the prepared directory here). "
            f"({err})"
        ) from None


def num_classes(info) -> int:
    """Classes of a dataset's 'label' feature; 0 without labels."""
    if "label" not in info.features:
        return 0
    return int(getattr(info.features["label"], "num_classes", 0) or 0)


def load_arrays(name: str, split: str, *, data_dir: str = "") -> ImageArrays:
    """A whole split of a fixed-size tfds dataset (CIFAR-10, STL-10, ...) in memory, uint8."""
    _, tfds = import_tfds()
    shape = dataset_info(name, data_dir=data_dir).features["image"].shape
    if any(d is None for d in shape):
        raise ValueError(
            f"tfds dataset {name!r} has variable-size images {shape}; it cannot be held in memory "
            "as one array: it streams (simclr_jax.data.step_stream)"
        )
    ds, info = _as_dataset(name, split, data_dir=data_dir)
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(4096)):
        images.append(batch["image"])
        if "label" in batch:
            labels.append(batch["label"])
    images = np.concatenate(images) if images else np.zeros((0, *shape), np.uint8)
    labels = np.concatenate(labels).astype(np.int32) if labels else None
    return ImageArrays(images, labels, num_classes(info))


# ------------------------------------------------------------------------ random-access data source


def open_data_source(name: str, split: str, *, data_dir: str = ""):
    """(random-access data source with undecoded images, DatasetInfo); a clear error if none."""
    _, tfds = import_tfds()
    found = builder(name, data_dir)
    decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        source = found.as_data_source(split=split, decoders=decoders)
    except NotImplementedError:
        raise ValueError(
            f"streamed datasets are read by index (so a resumed run sees the batches an "
            f"uninterrupted one would), which needs ArrayRecord files, but {found.data_dir} "
            f"holds {found.info.file_format}: convert it once with `tfds convert_format "
            f"--dataset_version_dir={found.data_dir} --out_file_format=array_record` (or "
            f"build it with `tfds build {name} --file_format=array_record`)"
        ) from None
    except (AssertionError, FileNotFoundError, ValueError) as error:
        reason = " ".join(str(error).split())
        if _prepared_splits(found) & {split, split.split("[")[0]}:  # prepared: a bad slice
            raise ValueError(f"split {split!r} of {name!r}: {reason}") from None
        raise FileNotFoundError(
            f"tfds dataset {name!r} split {split!r} is not prepared in {found.data_dir}: run "
            f"`tfds build {name} --file_format=array_record` ({reason})"
        ) from None
    return source, found.info


def _prepared_splits(found) -> set[str]:
    try:
        return set(found.info.splits.keys()) if found.is_prepared() else set()
    except Exception:  # noqa: BLE001 - only to choose the message; tfds raises several types
        return set()


def read_records(source, keys: list[int]) -> list[dict]:
    """The records at `keys`, in that order."""
    try:
        return source.__getitems__(keys)  # batched reads where the source has them
    except TypeError:  # tfds's mock data source reads one key at a time
        return [source[key] for key in keys]


# ------------------------------------------------------------------------------ host TF operations


def decode(tf, encoded, channels: int):
    """JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, channels] (grayscale repeated, alpha dropped)."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def resize_uint8(tf, image, size: int):
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
    return resize_uint8(tf, tf.slice(image, begin, crop_size), size)


def eval_crop_uint8(tf, image, size: int, crop_proportion: float = CROP_PROPORTION):
    """The reference's eval input: for networks above 32 px the central square keeping
    `crop_proportion` of the shorter side; at 32 px and below the whole image; resized to size^2."""
    if size <= EVAL_NO_CROP_MAX_SIZE:
        return resize_uint8(tf, image, size)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(
        tf.math.rint(crop_proportion * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
    )
    side = tf.maximum(side, 1)
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    return resize_uint8(tf, image[top : top + side, left : left + side], size)
