"""An embedding .npz as `neighbors` and `plot --embedding` read it (written by `embed` or the demo).

Arrays: `features` float [N, D] (the backbone's), optionally `projection` [N, P], `labels` int [N]
with `label_names` [C], and, for pictures, either `thumbnails` uint8 [N, h, w, c] or the image
files `paths` (relative to `root`) that `embed` records.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

FIELDS = ("features", "projection")
THUMBNAIL_SIDE = 64


@dataclasses.dataclass(frozen=True)
class EmbeddingFile:
    path: str
    vectors: np.ndarray  # [N, D] of the chosen field
    labels: np.ndarray | None  # int [N]
    label_names: list[str] | None
    thumbnails: np.ndarray | None  # uint8 [N, h, w, c]
    paths: list[str] | None
    root: str | None

    def __len__(self) -> int:
        return len(self.vectors)

    def label_name(self, label: int) -> str:
        if self.label_names is not None and 0 <= label < len(self.label_names):
            return self.label_names[label]
        return str(label)

    def thumbnail(self, index: int) -> np.ndarray:
        """uint8 [h, w, c] of row `index`: the stored thumbnail, or its image file shrunk."""
        if self.thumbnails is not None:
            return self.thumbnails[index]
        if self.paths is None:
            raise ValueError(f"{self.path} has neither thumbnails nor image paths to draw")
        from PIL import Image

        with Image.open(os.path.join(self.root or "", self.paths[index])) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            return np.asarray(image)


def read(path: str, field: str = "features", flag: str = "--embeddings") -> EmbeddingFile:
    """The file at `path`; a one-line error names the flag, the file and what is missing."""
    if field not in FIELDS:
        raise ValueError(f"--field={field!r}: allowed: {', '.join(FIELDS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={path!r}: no such file")
    with np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    if field not in arrays:
        hint = " (embed --projection stores it)" if field == "projection" else ""
        raise ValueError(f"{flag}={path!r} has no {field!r} array{hint}; it has {sorted(arrays)}")
    vectors = arrays[field]
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(
            f"{flag}={path!r}: {field!r} must be [N, D] with N >= 1, got {vectors.shape}"
        )
    labels = arrays.get("labels")
    if labels is not None and labels.shape != (len(vectors),):
        raise ValueError(f"{flag}={path!r}: 'labels' must be [{len(vectors)}], got {labels.shape}")
    names = arrays.get("label_names")
    paths = arrays.get("paths")
    root = arrays.get("root")
    return EmbeddingFile(
        path=path,
        vectors=np.asarray(vectors, np.float32),
        labels=None if labels is None else labels.astype(np.int64),
        label_names=None if names is None else [str(n) for n in names],
        thumbnails=arrays.get("thumbnails"),
        paths=None if paths is None else [str(p) for p in paths],
        root=None if root is None else str(root),
    )


def write(path: str, features: np.ndarray, **arrays: np.ndarray | None) -> str:
    """Write an embedding file (None arrays left out); returns its path."""
    kept = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    np.savez(path, features=np.asarray(features, np.float32), **kept)
    return path if path.endswith(".npz") else path + ".npz"
