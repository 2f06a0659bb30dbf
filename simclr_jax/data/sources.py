"""Load a whole split of a fixed-size dataset into memory, whichever source holds it.

`load_split(config.dataset, split)` is the one entry point the trainers use. `source` picks where
images come from: the local Debian Fashion-MNIST files, tfds (fixed-size datasets such as CIFAR-10
or STL-10), or an image folder. Variable-size datasets (ImageNet, a folder prepared by `simclr_jax.prepare`)
do not fit this shape: they stream (data/step_stream.py) instead.
"""

from __future__ import annotations

from etils import epath

from simclr_jax.data import digits, fashion_mnist, folders, splits, tfds_source
from simclr_jax.data.arrays import ImageArrays, from_arrays
from simclr_jax.data.label_fraction import stratified_subset

__all__ = ["ImageArrays", "from_arrays", "load_split", "take_label_fraction", "SOURCES"]

SOURCES = ("auto", "local", "tfds", "folder")
# Datasets with local files: name -> (files_present(data_dir), load(split, data_dir), num_classes).
LOCAL_DATASETS = {
    "fashion_mnist": (fashion_mnist.available, fashion_mnist.load, fashion_mnist.NUM_CLASSES),
    # scikit-learn's 8x8 digits upsampled to 28x28 (the transfer demo's target; data/digits.py).
    "sklearn_digits": (digits.available, digits.load, digits.NUM_CLASSES),
}


def _local(name: str, split: str, data_dir: str) -> ImageArrays:
    if name not in LOCAL_DATASETS:
        raise ValueError(
            f"dataset.name {name!r} has no local files; local datasets: {sorted(LOCAL_DATASETS)} "
            "(use dataset.source='tfds' for others)"
        )
    available, load, num_classes = LOCAL_DATASETS[name]
    # data_dir often names a tfds directory; the local files are read from it only if it holds them.
    base, _, _ = splits.parse_split(split)
    images, labels = load(base, data_dir if data_dir and available(data_dir) else "")
    keep = splits.slice_for(split, images.shape[0])
    return ImageArrays(images[keep], labels[keep], num_classes)


_DATA_DIR_HOLDS = {
    "folder": "the image folder, one subfolder per split",
    "tfds": "the folder of prepared tfds datasets (`tfds build NAME --data_dir=...`)",
}


def check_data_dir(dataset_config) -> None:
    """A data_dir that is set must be a folder: one line naming it, not a library's traceback.

    Bucket paths (gs://...) are left to the reader, which reports them when it reads."""
    data_dir = dataset_config.data_dir
    if data_dir and "://" not in data_dir and not epath.Path(data_dir).is_dir():
        source = dataset_config.source
        holds = _DATA_DIR_HOLDS.get(source, "the dataset's files or prepared tfds datasets")
        raise ValueError(
            f"dataset.data_dir={data_dir!r} is not a folder (dataset.source={source!r}: it must "
            f"name {holds})"
        )


def _folder(dataset_config, split: str) -> ImageArrays:
    root = dataset_config.data_dir
    if not root:
        raise ValueError("dataset.data_dir must name the image folder when dataset.source='folder'")
    check_data_dir(dataset_config)
    base, _, _ = splits.parse_split(split)
    directory = epath.Path(root) / base  # a local folder or a bucket (gs://...)
    if not directory.is_dir():
        present = sorted(e.name for e in epath.Path(root).iterdir() if e.is_dir())
        raise ValueError(
            f"split {base!r} not found in image folder {root!r}: expected a subfolder {base}/ "
            f"(subfolders present: {present})"
        )
    contents = folders.load_folder(
        str(directory),
        image_size=dataset_config.image_size,
        channels=dataset_config.get("channels", 3),
        strict=dataset_config.get("bad_images", "skip") == "error",
    )
    keep = splits.slice_for(split, contents.images.shape[0])
    labels = None if contents.labels is None else contents.labels[keep]
    return ImageArrays(contents.images[keep], labels, len(contents.class_names))


def _tfds(dataset_config, split: str) -> ImageArrays:
    return tfds_source.load_arrays(dataset_config.name, split, data_dir=dataset_config.data_dir)


def resolve_source(dataset_config) -> str:
    """The concrete source ('local', 'tfds' or 'folder') that `source='auto'` stands for."""
    source, name = dataset_config.source, dataset_config.name
    if source not in SOURCES:
        raise ValueError(f"dataset.source {source!r} unknown; choose from {list(SOURCES)}")
    if source != "auto":
        return source
    if name == "folder":
        return "folder"
    if name in LOCAL_DATASETS:
        available = LOCAL_DATASETS[name][0]
        if available("") or (dataset_config.data_dir and available(dataset_config.data_dir)):
            return "local"
    return "tfds"


def load_split(dataset_config, split: str) -> ImageArrays:
    """The whole `split` (tfds slicing syntax allowed) of `dataset_config.name` as ImageArrays."""
    source = resolve_source(dataset_config)
    if source == "local":
        return _local(dataset_config.name, split, dataset_config.data_dir)
    if source == "folder":
        return _folder(dataset_config, split)
    return _tfds(dataset_config, split)


def take_label_fraction(arrays: ImageArrays, fraction: float, *, seed: int) -> ImageArrays:
    """The class-balanced `fraction` of a labelled split (1% / 10% fine-tuning), fixed by `seed`."""
    if arrays.labels is None:
        raise ValueError("take_label_fraction needs labels; this split is unlabelled")
    return arrays.take(stratified_subset(arrays.labels, fraction, seed))
