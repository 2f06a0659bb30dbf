"""How many images per second one core of this machine decodes and crops for a streamed run.

Streamed datasets (ImageNet) are decoded and cropped on the host (data/step_stream.py), the rest
of the augmentation runs on the accelerator. This times that host work, one thread, on JPEGs the
size of an average ImageNet photo, with the same tf.data crop the training stream uses: one
decode and `crops` random-resized crops per image (2 for pretraining, 1 for fine-tuning). A
measurement of this machine, taken when asked; nothing here is a stored number.
"""

from __future__ import annotations

import io
import time

import numpy as np

IMAGENET_LIKE = (375, 500)  # height, width of a typical ImageNet training JPEG


def synthetic_jpegs(count: int, *, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`count` JPEGs of IMAGENET_LIKE size: smooth colour fields with grain, so they compress
    (and decode) like photographs rather than like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = IMAGENET_LIKE
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    found = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, size=(3, 2))
        freq = rng.uniform(1, 6, size=(3, 2))
        field = [
            np.sin(freq[c, 0] * 2 * np.pi * x + phase[c, 0])
            + np.cos(freq[c, 1] * 2 * np.pi * y + phase[c, 1])
            for c in range(3)
        ]
        image = 127.5 + 60 * np.stack(field, -1) + rng.normal(0, 8, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=quality
        )
        found.append(buffer.getvalue())
    return found


def images_per_second_per_core(
    *, image_size: int = 224, crops: int = 2, count: int = 96, repeats: int = 3
) -> float:
    """Median over `repeats` passes of decode + `crops` crops per image, one thread."""
    import tensorflow as tf

    from simclr_jax.data import tfds_source

    encoded = synthetic_jpegs(count)

    def prepare(index, data):
        image = tf.io.decode_jpeg(data, channels=3)
        key = tf.stack([tf.constant(0, tf.int64), index])
        seeds = tf.random.experimental.stateless_split(key, crops)
        return tf.stack(
            [tfds_source.random_crop_uint8(tf, image, image_size, seeds[i]) for i in range(crops)]
        )

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    dataset = (
        tf.data.Dataset.from_tensor_slices((tf.range(count, dtype=tf.int64), encoded))
        .map(prepare, num_parallel_calls=1)
        .with_options(options)
    )
    for _ in dataset.take(4):  # trace and warm up
        pass
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in dataset:
            pass
        rates.append(count / (time.perf_counter() - start))
    return float(np.median(rates))
