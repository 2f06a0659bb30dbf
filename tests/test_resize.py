"""Bicubic resizes without antialiasing, as the reference's tf.image.resize (tf2/data_util.py).

The reference resizes a cut-out crop with TF's ResizeBicubic (half_pixel_centers=True), whose
semantics are written down here as an independent NumPy port, loop by loop as TF's kernel
(tensorflow/core/kernels/image/resize_bicubic_op.cc) does it:
  - output pixel i samples the input at p = (i + 0.5) * scale - 0.5, scale = in / out (float32);
  - taps floor(p) - 1 .. floor(p) + 2, weighted by Keys' cubic (a = -0.5) read from a table of
    1024 + 1 entries per unit distance, at the nearest entry: offset = rint(frac(p) * 1024);
  - a tap outside the image gets weight 0 and the others are renormalised to sum to 1;
  - rows first, then columns.
augment.crop_and_resize (traced window) and augment.resize must equal it everywhere, edges
included; the port itself is checked against TensorFlow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.data import augment as A

TABLE_SIZE = 1024


def _coefficient_table() -> np.ndarray:
    """TF's InitCoeffsTable(-0.5): [2 i] the kernel at i / 1024, [2 i + 1] at 1 + i / 1024."""
    a = -0.5
    table = np.zeros((TABLE_SIZE + 1) * 2, np.float32)
    for i in range(TABLE_SIZE + 1):
        x = i / TABLE_SIZE
        table[2 * i] = ((a + 2) * x - (a + 3)) * x * x + 1
        x += 1.0
        table[2 * i + 1] = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return table


TABLE = _coefficient_table()


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: the 4 input indices and their weights (TF's GetWeightsAndIndices)."""
    scale = np.float32(in_size) / np.float32(out_size)
    indices = np.zeros((out_size, 4), np.int64)
    weights = np.zeros((out_size, 4), np.float32)
    for out in range(out_size):
        position = (np.float32(out) + np.float32(0.5)) * scale - np.float32(0.5)
        base = int(np.floor(position))
        offset = int(np.rint((position - np.float32(base)) * np.float32(TABLE_SIZE)))
        wanted = [base - 1, base, base + 1, base + 2]
        raw = [
            TABLE[offset * 2 + 1],
            TABLE[offset * 2],
            TABLE[(TABLE_SIZE - offset) * 2],
            TABLE[(TABLE_SIZE - offset) * 2 + 1],
        ]
        for k in range(4):
            indices[out, k] = min(max(wanted[k], 0), in_size - 1)
            weights[out, k] = raw[k] if indices[out, k] == wanted[k] else 0.0
        total = np.float32(weights[out].sum())
        if abs(total) >= 1000 * np.finfo(np.float32).tiny:
            weights[out] *= np.float32(1.0) / total
    return indices, weights


def tf_bicubic(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """NumPy port of TF's bicubic resize (half-pixel centres, no antialiasing) of [H, W, C]."""
    image = np.asarray(image, np.float32)
    rows, row_w = _taps(image.shape[0], out_height)
    cols, col_w = _taps(image.shape[1], out_width)
    out = np.zeros((out_height, out_width, image.shape[2]), np.float32)
    for y in range(out_height):
        # Rows first: one value per input column, then the 4 columns of each output pixel.
        column = sum(row_w[y, j] * image[rows[y, j]] for j in range(4))
        out[y] = sum(col_w[:, k, None] * column[cols[:, k]] for k in range(4))
    return out


def _image(height, width, channels=3, seed=0):
    """Smooth content plus noise: sharp pixel-to-pixel changes, where weight errors show most."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = 0.5 + 0.4 * np.sin(x[..., None] / 3.0 + y[..., None] / 5.0 + np.arange(channels))
    return np.clip(smooth + 0.2 * rng.standard_normal(smooth.shape), 0, 1).astype(np.float32)


# (top, left, h, w, out): down and up, off TF's table grid (37 -> 24), odd sizes, the whole
# image, a window on the image's far edge, a 1-pixel-wide window.
BOXES = [
    (5, 3, 30, 24, 16),
    (20, 10, 10, 10, 20),
    (0, 0, 48, 40, 32),
    (7, 2, 37, 29, 24),
    (11, 13, 37, 27, 37),
    (18, 1, 30, 39, 21),
    (3, 30, 45, 1, 8),
]


def test_crop_and_resize_equals_tf_bicubic_of_the_cut_out_crop_everywhere():
    image = _image(48, 40)
    crop = jax.jit(A.crop_and_resize, static_argnums=2)
    for top, left, h, w, out in BOXES:
        ours = np.asarray(crop(jnp.asarray(image), jnp.array([top, left, h, w]), out))
        reference = tf_bicubic(image[top : top + h, left : left + w], out, out)
        np.testing.assert_allclose(ours, reference, atol=1e-5, err_msg=str((top, left, h, w)))


def test_crop_and_resize_reads_nothing_outside_its_window():
    image = _image(48, 40)
    top, left, h, w = 7, 2, 37, 29
    changed = np.full_like(image, 5.0)  # everything outside the window changed
    changed[top : top + h, left : left + w] = image[top : top + h, left : left + w]
    crop = jax.jit(A.crop_and_resize, static_argnums=2)
    box = jnp.array([top, left, h, w])
    np.testing.assert_array_equal(
        crop(jnp.asarray(image), box, 24), crop(jnp.asarray(changed), box, 24)
    )


def test_batched_views_use_each_examples_own_window():
    images = np.stack([_image(32, 32, seed=s) for s in range(3)])
    boxes = np.array([[0, 0, 32, 32], [4, 6, 20, 17], [10, 2, 13, 29]])
    batched = jax.jit(jax.vmap(A.crop_and_resize, in_axes=(0, 0, None)), static_argnums=2)
    ours = np.asarray(batched(jnp.asarray(images), jnp.asarray(boxes), 24))
    for image, (top, left, h, w), got in zip(images, boxes, ours, strict=True):
        reference = tf_bicubic(image[top : top + h, left : left + w], 24, 24)
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_resize_and_eval_preprocess_equal_tf_bicubic():
    image = _image(50, 61)
    np.testing.assert_allclose(
        A.resize(jnp.asarray(image), 24), np.clip(tf_bicubic(image, 24, 24), 0, 1), atol=1e-5
    )
    images = (_image(64, 80) * 255).round().astype(np.uint8)[None]
    ours = np.asarray(A.eval_preprocess(jnp.asarray(images), out_size=24))[0]
    # Reference center_crop: side rint(0.875 * min(H, W)) = 56, offset (H - side + 1) // 2.
    side = 56
    top, left = (64 - side + 1) // 2, (80 - side + 1) // 2
    crop = images[0, top : top + side, left : left + side].astype(np.float32) / 255.0
    np.testing.assert_allclose(ours, np.clip(tf_bicubic(crop, 24, 24), 0.0, 1.0), atol=1e-5)


def test_the_table_and_the_window_matter():
    """The comparisons can tell: the exact kernel (jax.image.resize, no table) misses TF by more
    than the tolerance off the table's grid, and reading past the window's edge (resizing the
    window in place) misses it at the edges by far more."""
    image = _image(48, 40)
    window = image[7:44, 2:31]  # 37 x 29 -> 24: positions off the 1/1024 grid
    reference = tf_bicubic(window, 24, 24)
    exact = np.asarray(jax.image.resize(window, (24, 24, 3), "cubic", antialias=False))
    assert 1e-4 < np.abs(exact - reference).max() < 2e-3
    in_place = jax.image.scale_and_translate(
        jnp.asarray(image), (24, 24, 3), (0, 1), jnp.array([24 / 37, 24 / 29]),
        jnp.array([-7 * 24 / 37, -2 * 24 / 29]), "cubic", antialias=False,
    )  # fmt: skip
    assert np.abs(np.asarray(in_place) - reference).max() > 1e-2


def test_the_numpy_port_is_tensorflows_kernel():
    tf = pytest.importorskip("tensorflow")  # the [tfds] extra; make test installs it
    image = _image(48, 40)
    for top, left, h, w, out in BOXES:
        window = image[top : top + h, left : left + w]
        # The reference's path: crop_to_bounding_box, then resize (tf2/data_util.py).
        cut = tf.image.crop_to_bounding_box(image, top, left, h, w)
        expected = tf.image.resize(cut, [out, out], method="bicubic", antialias=False).numpy()
        np.testing.assert_allclose(tf_bicubic(window, out, out), expected, atol=1e-6)


def test_host_resize_is_not_antialiased():
    tf = pytest.importorskip("tensorflow")

    from simclr_jax.data import tfds_source

    image = (_image(50, 60) * 255).round().astype(np.uint8)
    ours = tfds_source.resize_uint8(tf, tf.constant(image), 20).numpy().astype(np.float32)
    expected = np.clip(np.round(tf_bicubic(image.astype(np.float32), 20, 20)), 0, 255)
    assert np.abs(ours - expected).max() <= 1  # uint8 rounding of values equal to 1e-5
    smooth = tf.image.resize(image.astype(np.float32), [20, 20], "bicubic", antialias=True)
    smooth = np.round(smooth.numpy())
    assert np.abs(ours - smooth).max() > 5  # the test can tell antialiasing
