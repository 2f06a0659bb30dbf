"""Streamed batches read by index from tfds's random-access data source (ArrayRecord files).

Training batches are addressed by step: a tf.data stream with a shuffle buffer cannot be resumed
(after an interruption it starts over in another order, so a resumed run trains on other data than
an uninterrupted one). Here step s of epoch e takes positions [s * B, (s + 1) * B) of the
permutation fixed by (seed, e), the same permutation the device-resident path uses
(pipeline.epoch_permutation). Each process reads only its own rows of the global batch, so the
global batch does not depend on the process count, and the random crops are seeded by (seed, global
position) for the same reason. Evaluation reads a split once, in order, each process its own
contiguous share, padded so that every process yields the same number of batches.

Decoding and cropping run in tf.data (parallel, deterministic), a few steps ahead of the trainer.
`batch(step)` serves consecutive steps from that stream and restarts it at any other step. Streams
still open when Python exits are closed first (atexit): a tf.data thread caught inside the reading
function during interpreter shutdown would hang the process.
"""

from __future__ import annotations

import atexit
import functools
import math
import weakref
from collections.abc import Iterator

import jax
import numpy as np

from simclr_jax.data import tfds_source
from simclr_jax.data.pipeline import epoch_permutation

_ENDLESS = 2**62  # the stream's last step: never reached
_OPEN: weakref.WeakSet = weakref.WeakSet()  # the iterators of every stream, closed at exit


@atexit.register
def close_open_streams() -> None:
    """Closes every stream still open (at exit, and between tests that leave theirs open)."""
    for stream in list(_OPEN):
        stream.close()


def _opened(ds, tfds) -> Iterator:
    stream = iter(tfds.as_numpy(ds))
    _OPEN.add(stream)
    return stream


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
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"batch_size={global_batch} must be a positive multiple of the process count "
                f"({process_count})"
            )
        self._source, info = tfds_source.open_data_source(name, split, data_dir=data_dir)
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
        tf, tfds = tfds_source.import_tfds()

        def fetch(step):
            step = int(step)
            records = tfds_source.read_records(self._source, [int(i) for i in self.indices(step)])
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
            image = tfds_source.decode(tf, encoded, self.channels)
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
        return _opened(ds, tfds)


def eval_batches(
    name: str,
    split: str,
    *,
    local_batch: int,
    image_size: int,
    data_dir: str = "",
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `split` in order: this process's batches of evaluation crops.

    {'image': uint8 [b, S, S, C] (tfds_source.eval_crop_uint8), 'label': int32 [b] (-1 without
    labels), 'mask': float32 [b] (1 real, 0 padding)}, b = local_batch. Process p reads the p-th
    of process_count contiguous shares of the split; every process yields the same number of
    batches (all-padding ones if its share is shorter), so collectives match.
    """
    tf, tfds = tfds_source.import_tfds()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source, info = tfds_source.open_data_source(name, split, data_dir=data_dir)
    share = np.array_split(np.arange(len(source)), process_count)[process_index]
    channels = info.features["image"].shape[-1] or 3
    has_label = "label" in info.features

    def fetch(batch):
        keys = [int(i) for i in share[int(batch) * local_batch : (int(batch) + 1) * local_batch]]
        records = tfds_source.read_records(source, keys)
        images = np.array([record["image"] for record in records], dtype=object)
        labels = [int(record["label"]) if has_label else -1 for record in records]
        return images, np.array(labels, np.int32)

    def load(batch):
        images, labels = tf.numpy_function(fetch, [batch], (tf.string, tf.int32), stateful=False)
        images.set_shape([None])
        labels.set_shape([None])
        return images, labels

    def prepare(encoded, label):
        image = tfds_source.eval_crop_uint8(
            tf, tfds_source.decode(tf, encoded, channels), image_size
        )
        return {"image": image, "label": label}

    ds = tf.data.Dataset.range(math.ceil(len(share) / local_batch))
    ds = ds.map(load, num_parallel_calls=1, deterministic=True).unbatch()
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = _opened(ds.batch(local_batch).prefetch(2), tfds)
    num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch)
    empty = {
        "image": np.zeros((local_batch, image_size, image_size, channels), np.uint8),
        "label": np.zeros((local_batch,), np.int32),
    }
    return _padded(batches, local_batch, num_batches, empty)


def _padded(batches, local_batch: int, num_batches: int, empty: dict[str, np.ndarray]):
    yielded = 0
    for batch in batches:
        real = batch["image"].shape[0]
        out = {k: _pad_rows(v, local_batch) for k, v in batch.items()}
        out["mask"] = (np.arange(local_batch) < real).astype(np.float32)
        yield out
        yielded += 1
    while yielded < num_batches:
        yield {**empty, "mask": np.zeros(local_batch, np.float32)}
        yielded += 1


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])
