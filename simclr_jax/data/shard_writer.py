"""The work units of `simclr_jax.prepare`: each writes one ArrayRecord shard of the final dataset.

A shard is a fixed run of a split's files (data/folder_layout.py fixes the order), so the plan is
the same on every rerun. A unit reads its files (data/image_files.py), serializes them with the
dataset's tfds features and writes them with tfds's ArrayRecord adapter, under the file name tfds
reads (`NAME-SPLIT.array_record-00003-of-00040`). It writes into `_shards/` and renames into place,
then writes its summary beside the temporary files: a unit is done exactly when its summary exists,
so a rerun after a kill redoes only the units that were in flight. Units run in any process, in any
order; the same unit always writes the same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from etils import epath

from simclr_jax.data import image_files, tfds_source

VERSION = "1.0.0"  # every prepared dataset's tfds version
WORK_FOLDER = "_shards"  # summaries and temporary files, inside the dataset's folder


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One unit of work: files [(path relative to the image folder, label)] of one shard."""

    split: str
    index: int
    num_shards: int
    files: tuple[tuple[str, int], ...]

    @property
    def key(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.num_shards:05d}"


def plan(splits: dict[str, tuple], images_per_shard: int) -> list[ShardTask]:
    """Each split cut into shards of at most `images_per_shard` files, in the split's order."""
    if images_per_shard < 1:
        raise ValueError(f"--images_per_shard must be >= 1, got {images_per_shard}")
    tasks = []
    for split, files in splits.items():
        count = max(1, -(-len(files) // images_per_shard))
        bounds = [round(i * len(files) / count) for i in range(count + 1)]
        tasks += [
            ShardTask(split, i, count, tuple(files[bounds[i] : bounds[i + 1]]))
            for i in range(count)
        ]
    return tasks


def features(class_names: tuple[str, ...], channels: int):
    """The dataset's tfds features: the image (stored bytes), its label if any, its file name."""
    tfds = tfds_source.import_tfds_library()
    found = {
        "image": tfds.features.Image(shape=(None, None, channels)),
        "file_name": tfds.features.Text(),
    }
    if class_names:
        found["label"] = tfds.features.ClassLabel(names=list(class_names))
    return tfds.features.FeaturesDict(found)


def shard_path(folder: epath.Path, name: str, task: ShardTask) -> epath.Path:
    """Where tfds looks for the shard."""
    tfds = tfds_source.import_tfds_library()
    template = tfds.core.ShardedFileTemplate(
        data_dir=folder, dataset_name=name, split=task.split, filetype_suffix="array_record"
    )
    return template.sharded_filepath(shard_index=task.index, num_shards=task.num_shards)


def summary_path(folder: epath.Path, task: ShardTask) -> epath.Path:
    return folder / WORK_FOLDER / f"{task.key}.json"


def read_summary(folder: epath.Path, task: ShardTask) -> dict | None:
    """The finished unit's summary, or None when it has not finished."""
    path = summary_path(folder, task)
    return json.loads(path.read_text()) if path.exists() else None


def write_shard(
    task: ShardTask,
    *,
    images: str,
    folder: str,
    name: str,
    class_names: tuple[str, ...],
    strict: bool,
    counter=None,
) -> dict:
    """Read, serialize and write the task's files; returns (and saves) its summary.

    Unreadable files are counted and listed in the summary, or with `strict` raise ValueError.
    `counter` (a shared multiprocessing value, or None) counts the files done, for progress."""
    folder = epath.Path(folder)
    serialize = _serializer(class_names)
    records, summary = [], _empty_summary()
    for path, label in task.files:
        try:
            stored = image_files.read_stored(os.fspath(epath.Path(images) / path))
        except image_files.UnreadableImage as error:
            if strict:
                raise ValueError(
                    f"cannot read {path}: {error} (--bad_images=error; 'skip' lists such files "
                    "and goes on)"
                ) from None
            summary["skipped"].append([path, str(error)])
        else:
            example = {"image": stored.data, "file_name": path}
            if class_names:
                example["label"] = label
            records.append(serialize(example))
            _count(summary, stored, label, len(records[-1]))
        if counter is not None:
            with counter.get_lock():
                counter.value += 1
    _write_atomically(shard_path(folder, name, task), records, folder / WORK_FOLDER)
    _save_json(summary_path(folder, task), summary)
    return summary


def _serializer(class_names: tuple[str, ...]):
    """example -> tf.train.Example bytes, by tfds's features and serializer, with the map of
    features in a fixed order (protobuf's default order varies between processes), so that the
    same unit writes the same bytes in any process. The stored bytes do not depend on the channel
    count, which is known only at the end."""
    tfds = tfds_source.import_tfds_library()
    found = features(class_names, 3)
    serializer = tfds.core.example_serializer.ExampleSerializer(found.get_serialized_info())

    def serialize(example: dict) -> bytes:
        proto = serializer.get_tf_example(found.encode_example(example))
        return proto.SerializeToString(deterministic=True)

    return serialize


def _empty_summary() -> dict:
    return {
        "examples": 0, "bytes": 0, "per_class": {}, "skipped": [], "sizes": {}, "channels": {},
        "kinds": {}, "conversions": {},
    }  # fmt: skip


def _count(summary: dict, stored: image_files.StoredImage, label: int, size: int) -> None:
    summary["examples"] += 1
    summary["bytes"] += size
    for field, key in (
        ("per_class", str(label)),
        ("sizes", f"{stored.height}x{stored.width}"),
        ("channels", str(stored.channels)),
        ("kinds", stored.source),
        ("conversions", stored.conversion or "stored as is"),
    ):
        summary[field][key] = summary[field].get(key, 0) + 1


def _write_atomically(path: epath.Path, records: list[bytes], scratch: epath.Path) -> None:
    """tfds's ArrayRecord writer into a private temporary file, then one rename into place."""
    tfds = tfds_source.import_tfds_library()
    temporary = scratch / f"{path.name}.{os.getpid()}.tmp"
    tfds.core.file_adapters.ArrayRecordFileAdapter.write_examples(
        temporary, ((None, record) for record in records)
    )
    temporary.replace(path)


def _save_json(path: epath.Path, value) -> None:
    temporary = path.parent / f"{path.name}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(value))
    temporary.replace(path)


def merge(summaries: list[dict]) -> dict:
    """One summary of many (counts added, lists joined)."""
    total = _empty_summary()
    for summary in summaries:
        total["examples"] += summary["examples"]
        total["bytes"] += summary["bytes"]
        total["skipped"] += summary["skipped"]
        for field in ("per_class", "sizes", "channels", "kinds", "conversions"):
            total[field] = dict(
                collections.Counter(total[field]) + collections.Counter(summary[field])
            )
    return total
