"""Fashion-MNIST from the idx files of Debian's `dataset-fashion-mnist` (offline, real data).

The files are the original gzipped idx files; we check their magic numbers and sizes so a truncated
or mislabelled file fails loudly rather than training on garbage.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_FILE_PREFIX = {"train": "train", "test": "t10k"}
SPLIT_SIZES = {"train": 60000, "test": 10000}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_MISSING_HINT = (
    "install the local files with `apt-get install dataset-fashion-mnist`, or put the four "
    "files in a folder and set --config.dataset.data_dir=FOLDER (or, with tfds's fashion_mnist "
    "prepared, --config.dataset.source=tfds)"
)


def file_paths(split: str, data_dir: str = "") -> tuple[str, str]:
    """(images, labels) idx.gz paths of a split ('train' or 'test')."""
    if split not in _FILE_PREFIX:
        raise ValueError(
            f"fashion_mnist split {split!r} unknown; choose from {sorted(_FILE_PREFIX)}"
        )
    root = data_dir or DEFAULT_DIR
    prefix = _FILE_PREFIX[split]
    return (
        os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"),
        os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"),
    )


def available(data_dir: str = "") -> bool:
    """Whether every local file of both splits exists."""
    return all(os.path.isfile(p) for s in _FILE_PREFIX for p in file_paths(s, data_dir))


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Fashion-MNIST file {path} not found: {_MISSING_HINT}")
    with gzip.open(path, "rb") as f:
        data = f.read()
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: file too short for an idx header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - header_size != expected:
        raise ValueError(
            f"{path}: header says {dims} ({expected} bytes) but the file holds "
            f"{len(data) - header_size} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def load(split: str, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28, 1] and labels int32 [N] of 'train' (60000) or 'test' (10000)."""
    images_path, labels_path = file_paths(split, data_dir)
    images = _read_idx(images_path, _IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} >= {NUM_CLASSES}")
    return images[..., None], labels.astype(np.int32)
