"""Streamed training batches addressed by step: the order is a pure function of (seed, step).

A tf.data stream with a shuffle buffer cannot be resumed: after an interruption it starts over in
another order, so a resumed run trains on other data than an uninterrupted one. Here the examples
are read by index from tfds's random-access data source (`builder.as_data_source`, ArrayRecord
files): step s of epoch e takes positions [s * B, (s + 1) * B) of the permutation fixed by
(seed, e), the same permutation the device-resident path uses (pipeline.epoch_permutation). Each
process reads only its own rows of the global batch, so the global batch does not depend on the
process count, and the random crops are seeded by (seed, global position) for the same reason.

Decoding and cropping still run in tf.data (parallel, deterministic), a few steps ahead of the
trainer. `batch(step)` serves consecutive steps from that stream and restarts it at any other step.
Streams still open when Python exits are closed first (atexit): a tf.data thread caught inside
the reading function during interpreter shutdown would hang the process.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from collections.abc import Iterator

import numpy as np

from simclr_jax.data import tfds_source
from simclr_jax.data.pipeline import epoch_permutation

_ENDLESS = 2**62  # the stream's last step: never reached
_OPEN: weakref.WeakSet = weakref.WeakSet()  # the iterators of every stream, closed at exit


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN):
        stream.close()


def open_data_source(name: str, split: str, *, data_dir: str = ""):
    """(random-access data source with undecoded images, DatasetInfo); a clear error if none."""
    _, tfds = tfds_source._import_tfds()
    builder = tfds_source._builder(name, data_dir)
    decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        source = builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError:
        raise ValueError(
            f"streamed training reads {name!r} by index (so a resumed run sees the batches an "
            f"uninterrupted one would), which needs ArrayRecord files, but {builder.data_dir} "
            f"holds {builder.info.file_format}: convert it once with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record` (or "
            f"build it with `tfds build {name} --file_format=array_record`)"
        ) from None
    except (AssertionError, FileNotFoundError, ValueError) as error:
        raise FileNotFoundError(
            f"tfds dataset {name!r} split {split!r} is not prepared in {builder.data_dir}: run "
            f"`tfds build {name} --file_format=array_record` ({' '.join(str(error).split())})"
        ) from None
    return source, builder.info


def _read(source, keys: list[int]) -> list[dict]:
    try:
        return source.__getitems__(keys)  # batched reads where the source has them
    except TypeError:  # tfds's mock data source reads one key at a time
        return [source[key] for key in keys]


class StepStream:
    """This process's uint8 training crops of a tfds split, for any step.

    `batch(step)` -> {'image': uint8 [b, S, S, C] (or [b, num_crops, S, S, C] when num_crops > 1),
    'label': int32 [b] (-1 without labels)}, b = global_batch / process_count: rows
    [process_index * b, (process_index + 1) * b) of the global batch. Every epoch visits a fresh
    permutation; its last N % global_batch examples are dropped (every step has a full batch).
    """

    def __init__(
        self,
        name: str,
        split: str,
        *,
        global_batch: int,
        image_size: int,
        seed: int,
        data_dir: str = "",
        num_crops: int = 1,
        crop_min_area: float = 0.08,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
    ):
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"batch_size={global_batch} must be a positive multiple of the process count "
                f"({process_count})"
            )
        self._source, info = open_data_source(name, split, data_dir=data_dir)
        self.num_examples = len(self._source)
        if global_batch > self.num_examples:
            raise ValueError(
                f"batch_size={global_batch} exceeds the {self.num_examples} examples of "
                f"{name}:{split}"
            )
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.steps_per_epoch = self.num_examples // global_batch
        self.seed = seed
        self.image_size = image_size
        self.num_crops = num_crops
        self.crop_min_area = crop_min_area
        self.process_index = process_index
        self.channels = info.features["image"].shape[-1] or 3
        self.has_label = "label" in info.features
        self.prefetch = prefetch
        self._stream: Iterator[dict[str, np.ndarray]] | None = None
        self._next_step = -1

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs at most, freed with the stream
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.seed, epoch, self.num_examples)

    def first_row(self, step: int) -> int:
        """Global position of this process's first row at `step` (the crops' seed)."""
        return step * self.global_batch + self.process_index * self.local_batch

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices int [b] of this process's rows at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + self.process_index * self.local_batch
        return self._order(epoch)[start : start + self.local_batch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`."""
        if self._stream is None or step != self._next_step:
            self._stream = self.batches(step)
        self._next_step = step + 1
        return next(self._stream)

    def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of steps start_step, start_step + 1, ... (decoded a few steps ahead)."""
        tf, tfds = tfds_source._import_tfds()

        def fetch(step):
            step = int(step)
            records = _read(self._source, [int(i) for i in self.indices(step)])
            images = np.array([record["image"] for record in records], dtype=object)
            labels = np.array(
                [int(record["label"]) if self.has_label else -1 for record in records], np.int32
            )
            first = self.first_row(step)
            return images, labels, np.arange(first, first + self.local_batch, dtype=np.int64)

        def load(step):
            images, labels, positions = tf.numpy_function(
                fetch, [step], (tf.string, tf.int32, tf.int64), stateful=False
            )
            for tensor in (images, labels, positions):
                tensor.set_shape([self.local_batch])
            return images, labels, positions

        def prepare(encoded, label, position):
            image = tfds_source._decode(tf, encoded, self.channels)
            key = tf.stack([tf.constant(self.seed, tf.int64), position])
            seeds = tf.random.experimental.stateless_split(key, self.num_crops)
            crops = [
                tfds_source.random_crop_uint8(
                    tf, image, self.image_size, seeds[i], min_area=self.crop_min_area
                )
                for i in range(self.num_crops)
            ]
            image = crops[0] if self.num_crops == 1 else tf.stack(crops)
            return {"image": image, "label": label}

        ds = tf.data.Dataset.range(start_step, _ENDLESS)
        ds = ds.map(load, num_parallel_calls=1, deterministic=True)  # reads in order
        ds = ds.unbatch().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(self.prefetch)
        stream = iter(tfds.as_numpy(ds))
        _OPEN.add(stream)
        return stream
