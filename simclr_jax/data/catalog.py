"""What a dataset is without reading it: split sizes, classes and the stored image shape.

The planner (simclr_jax.plan) shapes a run's batches for hardware this machine does not have, from
data this machine may not have either. These are the datasets the presets name, as their builders
publish them; any other prepared tfds dataset is read from its metadata (no image is decoded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from simclr_jax.data import digits, fashion_mnist, splits


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    split_sizes: Mapping[str, int]  # examples per base split ('train', 'test', ...)
    num_classes: int
    image_shape: tuple[int | None, int | None, int]  # stored (H, W, C); H, W None: they vary

    @property
    def streamed(self) -> bool:
        """Variable-size images stream from the host (data/streaming.py), cropped there."""
        return self.image_shape[0] is None

    def num_examples(self, split: str) -> int:
        """Examples in `split`, tfds-style slices included ('train[:10%]')."""
        base, _, _ = splits.parse_split(split)
        if base not in self.split_sizes:
            raise ValueError(f"split {split!r} is not one of {sorted(self.split_sizes)}")
        size = self.split_sizes[base]
        return len(range(size)[splits.slice_for(split, size)])


_IMAGENET_SPLITS = {"validation": 50_000}
_VARIABLE_RGB = (None, None, 3)
KNOWN: dict[str, DatasetFacts] = {
    "fashion_mnist": DatasetFacts(
        {"train": 60_000, "test": 10_000}, fashion_mnist.NUM_CLASSES, (28, 28, 1)
    ),
    "sklearn_digits": DatasetFacts(
        digits.SPLIT_SIZES, digits.NUM_CLASSES, (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1)
    ),
    "cifar10": DatasetFacts({"train": 50_000, "test": 10_000}, 10, (32, 32, 3)),
    "cifar100": DatasetFacts({"train": 50_000, "test": 10_000}, 100, (32, 32, 3)),
    "stl10": DatasetFacts({"train": 5_000, "test": 8_000, "unlabelled": 100_000}, 10, (96, 96, 3)),
    "imagenet2012": DatasetFacts({"train": 1_281_167, **_IMAGENET_SPLITS}, 1000, _VARIABLE_RGB),
    "imagenet2012_subset/1pct": DatasetFacts(
        {"train": 12_811, **_IMAGENET_SPLITS}, 1000, _VARIABLE_RGB
    ),
    "imagenet2012_subset/10pct": DatasetFacts(
        {"train": 128_116, **_IMAGENET_SPLITS}, 1000, _VARIABLE_RGB
    ),
}


def facts(dataset: ml_collections.ConfigDict) -> DatasetFacts:
    """The facts of config.dataset: the table above, else a prepared tfds dataset's metadata."""
    folder = dataset.source == "folder" or dataset.name == "folder"
    if dataset.name in KNOWN and not folder:
        return KNOWN[dataset.name]
    if not folder:
        from simclr_jax.data import tfds_source  # tensorflow: only for datasets not listed

        try:
            info = tfds_source.dataset_info(dataset.name, data_dir=dataset.data_dir)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(
                f"planning needs the size of {dataset.name!r}, which is neither one of "
                f"{sorted(KNOWN)} nor prepared here ({' '.join(str(error).split())})"
            ) from None
        height, width, channels = info.features["image"].shape
        return DatasetFacts(
            {name: split.num_examples for name, split in info.splits.items()},
            int(info.features["label"].num_classes) if "label" in info.features else 0,
            (height, width, channels or 3),
        )
    raise ValueError(
        f"planning cannot size dataset {dataset.name!r} (source {dataset.source!r}) without "
        f"reading it: prepare it as a tfds dataset (python -m simclr_jax.prepare) or plan with "
        f"one of {sorted(KNOWN)}"
    )
