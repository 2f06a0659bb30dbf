"""The in-memory form every fixed-size source returns."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """A whole split in memory: uint8 images [N, H, W, C], int32 labels [N] (None if unlabelled)."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels is not None:
            if self.labels.shape != (self.images.shape[0],):
                raise ValueError(
                    f"labels must have shape [{self.images.shape[0]}], got {self.labels.shape}"
                )
            labels = self.labels
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"labels must lie in [0, num_classes={self.num_classes}), found "
                    f"[{self.labels.min()}, {self.labels.max()}]"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, index) -> ImageArrays:
        """A subset by slice or index array (labels follow)."""
        labels = None if self.labels is None else self.labels[index]
        return ImageArrays(self.images[index], labels, self.num_classes)


def from_arrays(images, labels=None, num_classes: int | None = None) -> ImageArrays:
    """Wrap in-memory arrays: [N,H,W] or [N,H,W,C] uint8 images (floats in [0,1] are scaled)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating):
            images = np.round(np.clip(images, 0.0, 1.0) * 255.0)
        elif images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"integer images must lie in [0, 255], got dtype {images.dtype}")
        images = images.astype(np.uint8)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.size else 0
    return ImageArrays(images, labels, int(num_classes or 0))
