"""scikit-learn's 8x8 handwritten digits, upsampled to 28x28: a real, offline transfer target.

`sklearn.datasets.load_digits` ships 1,797 images (10 classes, ink values 0..16) inside the
scikit-learn package, so a Fashion-MNIST-pretrained network can be transferred to a second real
dataset with no download. The images are scaled to uint8 0..255 and upsampled once on the host
(bilinear, Pillow) to Fashion-MNIST's 28x28 and single channel, so the pretrained network sees the
input shape it was trained on.

The package has no split; ours is fixed: a class-stratified 500 test images drawn with seed 0
(`label_fraction.stratified_subset`, 48-51 per class) and the other 1,297 for training, each split
in the package's order. It is a pure function of the package's data, the same on every host.
"""

from __future__ import annotations

import functools

import numpy as np

from simclr_jax.data.label_fraction import stratified_subset

NUM_CLASSES = 10
NATIVE_SIZE = 8
IMAGE_SIZE = 28  # Fashion-MNIST's side: what the pretrained demo network expects.
MAX_VALUE = 16  # the package's ink scale (0..16)
NUM_EXAMPLES = 1797
TEST_SIZE = 500
SPLIT_SEED = 0
SPLIT_SIZES = {"train": NUM_EXAMPLES - TEST_SIZE, "test": TEST_SIZE}
_MISSING_HINT = (
    "the sklearn_digits dataset ships with scikit-learn: `pip install scikit-learn` "
    "(or `pip install simclr_jax[transfer]`)"
)


def available(data_dir: str = "") -> bool:
    """Always True: the data lives inside scikit-learn, not in files; `load` says how to get it."""
    del data_dir
    return True


def _load_package_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(f"scikit-learn is not installed: {_MISSING_HINT}") from err
    digits = load_digits()
    return digits.images, digits.target


def upsample(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [N, h, w] -> uint8 [N, size, size], bilinear (pixel-area aligned, edges clamped).

    Done in float and rounded once, so a stroke keeps its intensity; bilinear never overshoots.
    """
    from PIL import Image  # a core dependency; imported here so `sources` stays light

    out = np.empty((len(images), size, size), np.uint8)
    for i, image in enumerate(images):
        resized = Image.fromarray(image.astype(np.float32)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        out[i] = np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=1)
def _all_examples() -> tuple[np.ndarray, np.ndarray]:
    """Every image (uint8 [1797, 28, 28, 1], read-only) and label (int32), computed once."""
    raw, labels = _load_package_digits()
    if raw.shape != (NUM_EXAMPLES, NATIVE_SIZE, NATIVE_SIZE):
        raise ValueError(
            f"sklearn digits: expected images of shape {(NUM_EXAMPLES, NATIVE_SIZE, NATIVE_SIZE)}, "
            f"got {raw.shape} (an unexpected scikit-learn version?)"
        )
    scaled = np.round(raw * (255.0 / MAX_VALUE)).astype(np.uint8)
    images = upsample(scaled)[..., None]
    labels = np.asarray(labels, np.int32)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _check_split(split: str) -> None:
    if split not in SPLIT_SIZES:
        raise ValueError(
            f"sklearn_digits split {split!r} unknown; choose from {sorted(SPLIT_SIZES)}"
        )


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of 'train' (1,297) or 'test' (500, class-stratified, seed 0)."""
    _check_split(split)
    test = stratified_subset(labels, TEST_SIZE / len(labels), seed=SPLIT_SEED)
    if split == "test":
        return test
    return np.setdiff1d(np.arange(len(labels)), test)


def load(split: str, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28, 1] and labels int32 [N] of 'train' (1,297) or 'test' (500)."""
    del data_dir  # the data comes from the scikit-learn package
    _check_split(split)
    images, labels = _all_examples()
    keep = split_indices(labels, split)
    return images[keep], labels[keep]
