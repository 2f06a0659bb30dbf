"""Your own images from a folder: one subfolder per class (labelled) or a flat folder (unlabelled).

Meant for small data that fits in memory: every image is read by data/image_files.py's rules (the
same as `simclr_jax.prepare`'s: 16-bit by its high byte, alpha dropped, .npy arrays), resized so
its shorter side is `image_size` and centre-cropped to a square. Files that cannot be read are
counted and reported; they are skipped unless `strict=True`, so one corrupt JPEG among thousands
does not stop a run. Larger collections: prepare them once and stream (simclr_jax.prepare).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from etils import epath

from simclr_jax.data.image_files import UnreadableImage, is_image_file, read_pixels


@dataclasses.dataclass(frozen=True)
class FolderContents:
    """Decoded images with labels (None for a flat folder), class names and the files skipped."""

    images: np.ndarray  # uint8 [N, S, S, C]
    labels: np.ndarray | None  # int32 [N]
    class_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, reason)


def list_files(root: str) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """(path, label) pairs, labels from sorted subfolder names; label -1 for a flat folder.

    Paths go through etils.epath, so `root` may also be a bucket (gs://...).
    """
    directory = epath.Path(root)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    entries = sorted(directory.iterdir(), key=lambda p: p.name)
    class_names = tuple(e.name for e in entries if e.is_dir())
    if class_names:
        files = []
        for label, name in enumerate(class_names):
            for dirpath, dirnames, filenames in (directory / name).walk():
                dirnames.sort()
                names = [f for f in sorted(filenames) if is_image_file(f)]
                files += [(str(dirpath / f), label) for f in names]
        return files, class_names
    return [(str(e), -1) for e in entries if is_image_file(e.name)], ()


def decode_square(path: str, image_size: int, channels: int) -> np.ndarray:
    """Decode one file to uint8 [S, S, C]: shorter side resized to S (bicubic), centre crop."""
    from PIL import Image  # PIL is only needed for image folders.

    pixels = read_pixels(path, channels)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    width, height = img.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    array = np.asarray(img.crop((left, top, left + image_size, top + image_size)), np.uint8)
    return array.reshape(image_size, image_size, channels)


def load_folder(
    root: str, *, image_size: int, channels: int = 3, strict: bool = False
) -> FolderContents:
    """Decode every image under `root`; unreadable files are skipped and reported, or fatal."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    files, class_names = list_files(root)
    images, labels, skipped = [], [], []
    for path, label in files:
        try:
            images.append(decode_square(path, image_size, channels))
        except Exception as err:  # PIL raises many types for bad files; all mean "unreadable".
            if strict:
                raise ValueError(f"cannot decode image {path}: {err}") from err
            reason = (
                str(err) if isinstance(err, UnreadableImage) else f"{type(err).__name__}: {err}"
            )
            skipped.append((path, reason))
            continue
        labels.append(label)
    if skipped:
        logging.warning(
            "image folder %s: skipped %d unreadable file(s), e.g. %s",
            root, len(skipped), skipped[0],
        )  # fmt: skip
    if not images:
        raise ValueError(f"image folder {root!r} holds no readable images ({len(skipped)} skipped)")
    return FolderContents(
        images=np.stack(images),
        labels=np.asarray(labels, np.int32) if class_names else None,
        class_names=class_names,
        skipped=tuple(skipped),
    )
