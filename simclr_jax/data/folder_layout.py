"""Which files of an image folder form which split and class (what `simclr_jax.prepare` reads).

    DIR/train/<class>/...      labelled: a class per subfolder (sorted names are labels 0, 1, ...),
                               its files found at any depth
    DIR/train/*.jpg            unlabelled: a flat folder
    DIR/val/ (or validation/)  kept as the 'validation' split, DIR/test/ as 'test', with the
                               classes of train/ (a subset of them is fine)
    DIR/<class>/..., DIR/*.jpg without a train/ folder, DIR itself is the train split

Without a validation folder, a labelled train split gives `val_fraction` of each class (at least
one image of every class that has two or more) to a 'validation' split, chosen with a fixed seed.
The train split is then put in a fixed random order, so that any slice of it ('train[:10%]') is a
random subset; the other splits stay sorted. Hidden files and folders are left out; files that are
not images (by extension) are listed as ignored. Paths go through etils.epath, so DIR may be a
bucket (gs://...).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from etils import epath

from simclr_jax.data.image_files import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, is_image_file

SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SEED = 0  # the validation carve-out and the train split's order


@dataclasses.dataclass(frozen=True)
class Layout:
    """The folder's splits: split -> ((path relative to the folder, label), ...), label -1 when
    unlabelled."""

    class_names: tuple[str, ...]  # () for an unlabelled folder
    splits: dict[str, tuple[tuple[str, int], ...]]
    ignored: tuple[str, ...]  # files that are not images, relative to the folder

    @property
    def num_files(self) -> int:
        return sum(len(files) for files in self.splits.values())


@dataclasses.dataclass(frozen=True)
class _Split:
    class_names: tuple[str, ...]
    files: list[tuple[str, str]]  # (relative path, class name or '')
    ignored: list[str]


def _visible(path: epath.Path) -> bool:
    return not path.name.startswith(".")


def _relative(path: epath.Path, root: epath.Path) -> str:
    return str(path.relative_to(root))


def _files_under(folder: epath.Path, root: epath.Path) -> tuple[list[str], list[str]]:
    """(image files, other files) at any depth below `folder`, relative to root, sorted."""
    images, others = [], []
    for directory, subfolders, names in folder.walk():
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            (images if is_image_file(name) else others).append(_relative(directory / name, root))
    return images, others


def _scan_split(folder: epath.Path, root: epath.Path) -> _Split:
    children = sorted((c for c in folder.iterdir() if _visible(c)), key=lambda c: c.name)
    classes = [c for c in children if c.is_dir()]
    loose = [_relative(c, root) for c in children if not c.is_dir()]
    if not classes:
        images = [path for path in loose if is_image_file(epath.Path(path).name)]
        return _Split((), [(path, "") for path in images], sorted(set(loose) - set(images)))
    stray = [path for path in loose if is_image_file(epath.Path(path).name)]
    if stray:
        raise ValueError(
            f"{folder} holds class subfolders and also {len(stray)} image file(s) outside them "
            f"(e.g. {stray[0]}): move them into a class folder, or out of {folder}"
        )
    files, ignored = [], list(loose)
    for class_folder in classes:
        images, others = _files_under(class_folder, root)
        files += [(path, class_folder.name) for path in images]
        ignored += others
    return _Split(tuple(c.name for c in classes), files, ignored)


def _split_folders(root: epath.Path) -> tuple[dict[str, epath.Path], list[str]]:
    """({split name: folder}, other files at the top); {'train': root} without split folders."""
    children = [c for c in root.iterdir() if _visible(c)]
    found = {c.name: c for c in children if c.is_dir() and c.name in SPLIT_FOLDERS}
    if not found:
        return {"train": root}, []
    if "train" not in found:
        raise ValueError(f"{root} has {sorted(found)} folder(s) but no train/: add train/")
    if {"val", "validation"} <= found.keys():
        raise ValueError(f"{root} has both val/ and validation/: keep one")
    others = sorted(c.name for c in children if c.name not in SPLIT_FOLDERS)
    if any(c.is_dir() or is_image_file(c.name) for c in children if c.name in others):
        raise ValueError(
            f"{root} holds train/ and also {others}: beside train/ only val/ (or validation/) "
            "and test/ are read; move the rest into train/ or out of the folder"
        )
    return {SPLIT_FOLDERS[name]: folder for name, folder in found.items()}, others


def _labelled(splits: dict[str, _Split]) -> tuple[tuple[str, ...], dict[str, list]]:
    """(class names, split -> [(path, label)]), checking that the splits agree on labels."""
    class_names = splits["train"].class_names
    index = {name: label for label, name in enumerate(class_names)}
    out = {}
    for split, found in splits.items():
        if bool(found.class_names) != bool(class_names):
            kind = "class subfolders" if class_names else "a flat folder"
            raise ValueError(
                f"train/ is {kind} but {split} is not: every split must be labelled "
                "(class subfolders) or every split unlabelled (flat)"
            )
        unknown = sorted(set(found.class_names) - set(class_names))
        if unknown:
            raise ValueError(f"the {split} split has classes that train/ has not: {unknown}")
        out[split] = [(path, index[name] if name else -1) for path, name in found.files]
    return class_names, out


def _carve_validation(files: list, fraction: float) -> tuple[list, list]:
    """(train, validation): `fraction` of each class, at least one of every class of >= 2."""
    rng = np.random.default_rng(SEED)
    labels = np.array([label for _, label in files])
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        chosen.extend(rng.permutation(members)[:count].tolist())
    chosen = set(chosen)
    validation = [f for i, f in enumerate(files) if i in chosen]
    return [f for i, f in enumerate(files) if i not in chosen], validation


def scan(images: str, *, val_fraction: float = 0.0) -> Layout:
    """The splits, classes and files of the folder `images` (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must lie in [0, 1), got {val_fraction}")
    root = epath.Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images={images!r} is not a folder")
    folders, ignored = _split_folders(root)
    found = {split: _scan_split(folder, root) for split, folder in folders.items()}
    class_names, splits = _labelled(found)
    ignored = tuple(sorted(ignored + [path for split in found.values() for path in split.ignored]))
    if not any(splits.values()):
        kinds = ", ".join(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)
        raise ValueError(f"--images={images!r} holds no image files ({kinds})")
    for split, files in splits.items():
        if not files:
            raise ValueError(f"the {split} split of {images!r} holds no image files")
    if class_names and "validation" not in splits and val_fraction > 0:
        splits["train"], validation = _carve_validation(splits["train"], val_fraction)
        if validation:
            splits["validation"] = validation
    order = np.random.default_rng(SEED).permutation(len(splits["train"]))
    splits["train"] = [splits["train"][i] for i in order]
    return Layout(class_names, {k: tuple(v) for k, v in splits.items()}, ignored)
