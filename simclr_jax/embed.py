"""Embed every image of a folder, or of a prepared dataset, with any workdir (ours, or a converted
official model).

    python -m simclr_jax.embed --workdir=DIR --images=FOLDER --out=FILE.npz \\
        [--image_size=224] [--batch_size=64] [--projection]
    python -m simclr_jax.embed --workdir=DIR --dataset=NAME --data_dir=OUT [--split=train] ...

or, in a notebook, `embed(workdir, images, out=None, image_size=None, ...)` with the same
arguments (`embed(workdir, dataset=NAME, data_dir=OUT)` for a dataset). Every image file under
FOLDER (recursively; any size; read by data/image_files.py's rules, as `simclr_jax.prepare` reads
them: 16-bit by its high byte, alpha dropped, .npy arrays; then converted to the network's
channels), or every example of a split of a prepared tfds dataset in its order (ArrayRecord files:
`simclr_jax.prepare`'s, or ImageNet's), is preprocessed as the reference evaluates:
for networks above 32 px, the central square keeping 0.875 of the shorter side, resized to
`image_size` with bicubic interpolation without antialiasing (tf.image.resize's semantics, the
official TF2 code); at 32 px and below the whole image is resized (no crop), as the reference.
Files that cannot be decoded are skipped and counted. The `.npz` holds `paths` (relative to
FOLDER; for a dataset, the file names it recorded), `features` (pooled backbone output, float32
[N, D]), `projection` with --projection (the projection head's output [N, P]), `skipped` and
`skipped_reasons`, `root`, `image_size`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from operator import itemgetter

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from simclr_jax import cli, predict, saved_run
from simclr_jax.data import image_files, tfds_source
from simclr_jax.data.augment import CROP_PROPORTION, EVAL_NO_CROP_MAX_SIZE, crop_and_resize
from simclr_jax.models.resnet import total_stride

MIN_CANVAS = 64  # smallest padded canvas (sides are rounded up to a power of two)


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """What embed() computed, in the order of `paths`."""

    root: str
    paths: list[str]  # relative to root
    features: np.ndarray  # float32 [N, D]: the backbone's pooled output
    projection: np.ndarray | None  # float32 [N, P]: the projection head's output, if asked
    skipped: list[tuple[str, str]]  # (path relative to root, why it could not be read)
    image_size: int

    def save(self, out: str) -> str:
        """Write the .npz (adds the suffix when missing); returns the path written."""
        out = out if out.endswith(".npz") else out + ".npz"
        arrays = dict(
            paths=np.asarray(self.paths, dtype=str),
            features=self.features,
            skipped=np.asarray([path for path, _ in self.skipped], dtype=str),
            skipped_reasons=np.asarray([why for _, why in self.skipped], dtype=str),
            root=np.asarray(self.root),
            image_size=np.asarray(self.image_size),
        )
        if self.projection is not None:
            arrays["projection"] = self.projection
        with epath.Path(out).open("wb") as file:
            np.savez(file, **arrays)
        return out


def list_images(root: str) -> list[epath.Path]:
    """Image files under `root` at any depth, sorted by path; hidden files and folders left out."""
    folder = epath.Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images={root!r} is not a folder")
    found = []
    for directory, subfolders, files in folder.walk():
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [directory / name for name in files if image_files.is_image_file(name)]
    hidden = lambda path: any(part.startswith(".") for part in path.relative_to(folder).parts)  # noqa: E731
    return sorted(
        (path for path in found if not hidden(path)), key=lambda p: str(p.relative_to(folder))
    )


def decode(path: epath.Path, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] by data/image_files.py's rules (grayscale repeated, alpha dropped,
    luma for 1)."""
    return image_files.read_pixels(os.fspath(path), channels)


def crop_window(image: np.ndarray, image_size: int) -> np.ndarray:
    """The reference's eval crop: the central square of round(0.875 * shorter side) pixels,
    offsets (side difference + 1) // 2 (data_util.center_crop); none at 32 px and below."""
    if image_size <= EVAL_NO_CROP_MAX_SIZE:
        return image
    height, width = image.shape[:2]
    side = max(1, int(round(CROP_PROPORTION * min(height, width))))  # half to even, as tf.rint
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    return image[top : top + side, left : left + side]


def canvas_side(n: int) -> int:
    """The padded side for a window side `n`: 4 sizes per octave (64, 80, 96, 112, 128, 160, ...),
    so few compilations serve any folder and padding adds at most 25% per side."""
    if n <= MIN_CANVAS:
        return MIN_CANVAS
    step = 1 << max((n - 1).bit_length() - 3, 0)
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnames="out_size")
def resize_window(canvas: jax.Array, height: jax.Array, width: jax.Array, *, out_size: int):
    """canvas[:height, :width] (uint8, zero padded) -> float32 [out, out, C] in [0, 1].

    tf.image.resize(method='bicubic') of the window (augment.crop_and_resize: nothing outside
    it is read). The window's size is traced, so one compilation serves every image that fits
    the canvas.
    """
    window = jnp.stack([0, 0, height, width])
    return jnp.clip(crop_and_resize(canvas.astype(jnp.float32) / 255.0, window, out_size), 0, 1)


def preprocess(image: np.ndarray, image_size: int) -> jax.Array:
    """One decoded image -> the network's float32 [S, S, C] input (reference eval semantics)."""
    window = crop_window(image, image_size)
    height, width, channels = window.shape
    canvas = np.zeros((canvas_side(height), canvas_side(width), channels), np.uint8)
    canvas[:height, :width] = window
    return resize_window(canvas, height, width, out_size=image_size)


class Progress:
    """One line on stderr: images done, skipped, images/s (rewritten in place on a terminal)."""

    def __init__(self, total: int, enabled: bool, every_s: float = 10.0):
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()
        self.every_s, self.last = (0.0 if self.tty else every_s), 0.0

    def update(self, done: int, skipped: int, *, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < self.every_s):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"embed: {done}/{self.total} images, {skipped} skipped, {rate:.1f} images/s"
        sys.stderr.write(
            ("\r" if self.tty else "") + line + ("\n" if final or not self.tty else "")
        )
        sys.stderr.flush()


Item = tuple[str, "np.ndarray | None", str]  # (name, decoded image or None, why unreadable)


def _folder_items(images: str, channels: int, batch_size: int) -> tuple[int, Iterator[Item]]:
    """(count, items) of every image file under `images`, decoded a batch ahead on 4 threads."""
    files = list_images(images)
    if not files:
        kinds = ", ".join(image_files.IMAGE_EXTENSIONS + image_files.ARRAY_EXTENSIONS)
        raise FileNotFoundError(f"no image files ({kinds}) under {images}")
    root = epath.Path(images)

    def items() -> Iterator[Item]:
        read = functools.partial(_attempt, decode, channels=channels)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(files), batch_size):
                chunk = files[start : start + batch_size]
                for path, (image, error) in zip(chunk, pool.map(read, chunk), strict=True):
                    yield str(path.relative_to(root)), image, error

    return len(files), items()


def _dataset_items(
    dataset: str, data_dir: str, split: str, channels: int, batch_size: int
) -> tuple[int, Iterator[Item]]:
    """(count, items) of every example of a prepared split, in order, named by its file_name."""
    source, _ = tfds_source.open_data_source(dataset, split, data_dir=data_dir)

    def items() -> Iterator[Item]:
        for start in range(0, len(source), batch_size):
            keys = list(range(start, min(start + batch_size, len(source))))
            for key, record in zip(keys, tfds_source.read_records(source, keys), strict=True):
                name = record.get("file_name", f"{split}[{key}]")
                name = name.decode() if isinstance(name, bytes) else str(name)
                image, error = _attempt(image_files.decode_stored, record["image"], channels)
                yield name, image, error

    return len(source), items()


def _attempt(read, what, channels: int) -> tuple[np.ndarray | None, str]:
    try:
        return read(what, channels), ""
    except Exception as error:  # noqa: BLE001 - PIL raises many types; all mean "unreadable"
        return None, f"{type(error).__name__}: {error}"


def _embed_items(items: Iterator[Item], total: int, forward, *, image_size, batch_size, progress):
    """(paths, features, projections, skipped) of the items, batch by batch."""
    paths, features, projections, skipped = [], [], [], []
    meter = Progress(total, progress)
    for chunk in _batches(items, batch_size):
        inputs = []
        for name, image, error in chunk:
            if image is None:
                skipped.append((name, error))
                continue
            paths.append(name)
            inputs.append(preprocess(image, image_size))
        if inputs:
            batch = jnp.stack(inputs + [jnp.zeros_like(inputs[0])] * (batch_size - len(inputs)))
            feats, projs = forward(batch)
            features.append(np.asarray(feats[: len(inputs)]))
            projections.append(np.asarray(projs[: len(inputs)]))
        meter.update(len(paths) + len(skipped), len(skipped))
    meter.update(len(paths) + len(skipped), len(skipped), final=True)
    return paths, features, projections, skipped


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed(
    workdir: str,
    images: str | None = None,
    out: str | None = None,
    *,
    dataset: str = "",
    data_dir: str = "",
    split: str = "train",
    image_size: int | None = None,
    batch_size: int = 64,
    projection: bool = False,
    progress: bool = True,
) -> Embeddings:
    """Embed every image under `images` (or of `dataset`'s `split` in `data_dir`) with
    `workdir`'s network (inference mode); write `out`.

    `image_size` defaults to the size the run trained at (224 for the converted official models).
    For a distillation workdir the network is the student.
    """
    if bool(images) == bool(dataset):
        raise ValueError("give --images (a folder) or --dataset (a prepared dataset), not both")
    run = saved_run.read_run(workdir)
    image_size = run.image_size if image_size is None else image_size
    model = saved_run.build_from_run(run)
    if not isinstance(image_size, int) or image_size < total_stride(model.cifar_stem):
        raise ValueError(
            f"image_size must be an integer >= {total_stride(model.cifar_stem)} for this network, "
            f"got {image_size!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    variables = saved_run.restore_variables(run, model)
    if images:
        root, (total, items) = images, _folder_items(images, run.channels, batch_size)
    else:
        root = f"{os.path.join(data_dir, dataset)}:{split}"
        total, items = _dataset_items(dataset, data_dir, split, run.channels, batch_size)

    outputs = predict.predict_fn(model, image_size=image_size, preprocess="none")
    forward = jax.jit(
        lambda variables, batch: itemgetter("features", "projection")(outputs(variables, batch))
    )

    paths, features, projections, skipped = _embed_items(
        items, total, functools.partial(forward, variables), image_size=image_size,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    if not paths:
        raise ValueError(f"none of the {total} images of {root} could be read")
    result = Embeddings(
        root=str(root),
        paths=paths,
        features=np.concatenate(features),
        projection=np.concatenate(projections) if projection else None,
        skipped=skipped,
        image_size=image_size,
    )
    if out:
        result.save(out)
    return result


def main() -> None:
    """The command line (errors the user can fix in one line: simclr_jax.cli)."""
    flags.DEFINE_string("workdir", None, "Any simclr_jax workdir (or a converted official model).")
    flags.DEFINE_string("images", None, "Folder of images (searched recursively).")
    flags.DEFINE_string("dataset", "", "Or a prepared tfds dataset (simclr_jax.prepare) ...")
    flags.DEFINE_string("data_dir", "", "... in this data_dir ...")
    flags.DEFINE_string("split", "train", "... and this split of it.")
    flags.DEFINE_string("out", None, "Output .npz file.")
    flags.DEFINE_integer("image_size", None, "Input size (default: the run's, 224 if converted).")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
    flags.DEFINE_bool("projection", False, "Also store the projection head's output.")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(argv: list[str]) -> None:
        del argv
        values = flags.FLAGS
        result = embed(
            values.workdir,
            values.images,
            values.out,
            dataset=values.dataset,
            data_dir=values.data_dir,
            split=values.split,
            image_size=values.image_size,
            batch_size=values.batch_size,
            projection=values.projection,
        )
        out = values.out if values.out.endswith(".npz") else values.out + ".npz"
        print(
            f"{len(result.paths)} images -> {out} (features {result.features.shape[1]}"
            + (
                f", projection {result.projection.shape[1]}"
                if result.projection is not None
                else ""
            )
            + f"); {len(result.skipped)} unreadable file(s) skipped"
        )

    cli.run(run)


if __name__ == "__main__":
    main()
