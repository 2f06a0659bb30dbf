"""Streamed training batches are a pure function of (seed, step): resumable, process-count free."""

import subprocess
import sys

import numpy as np
import pytest

from simclr_jax.data import pipeline
from simclr_jax.data.step_stream import StepStream

tfds = pytest.importorskip("tensorflow_datasets")  # the [tfds] extra; make test installs it


def stream(**kwargs):
    args = dict(global_batch=6, image_size=12, seed=3, num_crops=2)
    return StepStream("imagenet2012", "train", **{**args, **kwargs})


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_resumed_stream_equals_the_uninterrupted_one():
    with tfds.testing.mock_data(num_examples=20):
        straight = stream()
        assert (straight.num_examples, straight.steps_per_epoch) == (20, 3)
        run = [straight.batch(step) for step in range(7)]  # crosses two epoch boundaries
        first = run[0]
        assert first["image"].shape == (6, 2, 12, 12, 3) and first["image"].dtype == np.uint8
        assert not np.array_equal(first["image"][:, 0], first["image"][:, 1])  # two crops
        resumed = stream()  # a new process, started at step 4
        for step in range(4, 7):
            assert_batches_equal(resumed.batch(step), run[step])
        assert_batches_equal(resumed.batch(1), run[1])  # any step, in any order
        assert_batches_equal(stream(seed=3).batch(5), run[5])
        other_seed = stream(seed=4).batch(0)
        assert not np.array_equal(other_seed["image"], first["image"])


def test_epochs_are_permutations_and_processes_split_the_global_batch():
    with tfds.testing.mock_data(num_examples=20):
        single = stream(num_crops=1)
        for epoch in range(2):
            seen = np.concatenate([single.indices(epoch * 3 + s) for s in range(3)])
            np.testing.assert_array_equal(
                seen, pipeline.epoch_permutation(3, epoch, 20)[:18]
            )  # the device-resident path's order; 2 of 20 dropped per epoch
        global_batch = single.batch(4)
        halves = [stream(num_crops=1, process_index=i, process_count=2).batch(4) for i in range(2)]
        assert halves[0]["image"].shape[0] == 3
        for key in global_batch:
            np.testing.assert_array_equal(
                np.concatenate([h[key] for h in halves]), global_batch[key]
            )
        with pytest.raises(ValueError, match="multiple of the process count"):
            stream(global_batch=5, process_index=0, process_count=2)
        with pytest.raises(ValueError, match="exceeds the 20 examples"):
            stream(global_batch=24)


def test_labels_follow_the_indices():
    with tfds.testing.mock_data(num_examples=20):
        data = stream(num_crops=1)
        source = tfds.builder("imagenet2012").as_data_source(split="train")
        expected = [int(source[int(i)]["label"]) for i in data.indices(2)]
        assert data.batch(2)["label"].tolist() == expected


def test_files_without_random_access_get_the_conversion_command():
    def tfrecord_only(*args, **kwargs):  # what tfds raises for a dataset prepared as tfrecord
        raise NotImplementedError("Random access data source for file format tfrecord")

    with tfds.testing.mock_data(num_examples=20, as_data_source_fn=tfrecord_only):
        with pytest.raises(ValueError, match="tfds convert_format --dataset_version_dir=") as error:
            stream()
    assert "array_record" in str(error.value) and "\n" not in str(error.value)


def test_a_stream_left_open_does_not_hang_the_exit():
    # A tf.data thread inside the reading function while Python shuts down used to hang it.
    script = (
        "import tensorflow_datasets as tfds\n"
        "from simclr_jax.data.step_stream import StepStream\n"
        "with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):\n"
        "    stream = StepStream('imagenet2012', 'train', global_batch=8, image_size=16,\n"
        "                        seed=0, num_crops=2).batches(0)\n"
        "    next(stream)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
