"""Prepare a folder of your own images, once, as a dataset that every stage streams.

    python -m simclr_jax.prepare --images=DIR --data_dir=OUT [--name=NAME] [--val_fraction=0.01]
        [--bad_images=skip|error] [--workers=0] [--images_per_shard=1000]

DIR/train/<class>/... is labelled, a flat DIR (or DIR/train/) unlabelled; DIR/val/ (or
validation/) and DIR/test/ are kept (data/folder_layout.py). Any image size; 1, 3 or 4 channels,
16-bit PNG and .npy arrays are converted by the rules of data/image_files.py. The result is a tfds
dataset in ArrayRecord files, OUT/NAME/1.0.0/, which any stage then streams:

    --config.dataset.name=NAME --config.dataset.data_dir=OUT [--config.dataset.eval_split=validation]

Every core works (--workers); a progress bar shows the rate and the time left. Interrupted, the same
command goes on where it stopped (data/prepared.py). Unreadable files are counted, listed and
skipped (--bad_images=error stops at the first). OUT/NAME/1.0.0/prepare.json records what was done.
"""

from __future__ import annotations

import logging

from absl import flags

from simclr_jax import cli
from simclr_jax.data import prepared


def summary(record: dict, data_dir: str) -> str:
    """A few lines on what was prepared, and how to train on it."""
    splits = ", ".join(f"{split} {c['examples']:,}" for split, c in record["splits"].items())
    classes = f"{len(record['classes'])} classes" if record["classes"] else "unlabelled"
    skipped = record["skipped"]
    example = f", e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
    return "\n".join([
        f"{record['name']}: {splits} ({classes}, {record['channels']} channel(s)) in "
        f"{data_dir}/{record['name']}/{record['version']}",
        f"{len(skipped)} unreadable file(s) skipped{example}; all listed in {prepared.RECORD}",
        f"train with: {record['use']}",
    ])  # fmt: skip


def main() -> None:
    """The command line (flags are defined here only, so importing this module defines none)."""
    flags.DEFINE_string("images", None, "The image folder (see this module's docstring).")
    flags.DEFINE_string("data_dir", None, "Where the dataset goes (tfds data_dir).")
    flags.DEFINE_string("name", "", "Dataset name (default: the folder's name in snake case).")
    flags.DEFINE_float(
        "val_fraction", 0.01, "Without val/: this fraction of each class becomes 'validation'."
    )
    flags.DEFINE_enum("bad_images", "skip", list(prepared.BAD_IMAGES), "Unreadable files.")
    flags.DEFINE_integer("workers", 0, "Processes (0: one per core).")
    flags.DEFINE_integer("images_per_shard", 1000, "Images per ArrayRecord file (a work unit).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["images", "data_dir"])

    def run(argv: list[str]) -> None:
        del argv
        logging.getLogger().setLevel(logging.INFO)
        values = flags.FLAGS
        settings = prepared.Settings(
            val_fraction=values.val_fraction,
            images_per_shard=values.images_per_shard,
            bad_images=values.bad_images,
        )
        record = prepared.prepare_folder(
            values.images, values.data_dir, name=values.name, settings=settings,
            workers=values.workers, progress=values.progress,
        )  # fmt: skip
        print(summary(record, values.data_dir))

    cli.run(run)


if __name__ == "__main__":
    main()
