"""Bicubic resizes without antialiasing, as the reference's tf.image.resize (tf2/data_util.py).

TF's kernel repeats the edge pixel at the border while jax.image renormalises the weights over the
taps inside the image, so the two agree on the interior only: output pixels whose 4 taps all fall
inside the source. That is where these tests compare them. TF's ResizeBicubic also reads its tap
weights from a 1024-entry table (nearest entry), so it equals the exact Keys kernel to 1e-4 only
where the sample positions fall on that table's grid (scales like 30 -> 16, 10 -> 20); elsewhere
it is off by its table's rounding (a few 1e-4), and jax.image.resize is the 1e-4 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.data import augment as A


def _image(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = 0.5 + 0.4 * np.sin(x[..., None] / 3.0 + y[..., None] / 5.0 + np.arange(channels))
    return np.clip(smooth + 0.05 * rng.standard_normal(smooth.shape), 0, 1).astype(np.float32)


def _interior(in_size, out_size):
    """Output indices whose bicubic taps (half-pixel centres, 4 taps) lie inside 0..in_size-1."""
    x = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    return np.flatnonzero((np.floor(x) - 1 >= 0) & (np.floor(x) + 2 <= in_size - 1))


def _on_table_grid(in_size, out_size):
    """Whether every sample position's fraction is a multiple of 1/1024 (TF's weight table)."""
    x = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    return bool(np.all((x * 1024) % 1 == 0))


def _tf_resize(image, size, antialias=False):
    import tensorflow as tf

    out = tf.image.resize(image, [size, size], method="bicubic", antialias=antialias)
    return out.numpy()


def test_crop_and_resize_equals_bicubic_of_the_cut_out_crop():
    image = _image(48, 40)
    crop = jax.jit(A.crop_and_resize, static_argnums=2)
    cases = [(5, 3, 30, 24, 16), (20, 10, 10, 10, 20), (0, 0, 48, 40, 32), (7, 2, 37, 29, 24)]
    for top, left, h, w, out in cases:
        ours = np.asarray(crop(jnp.asarray(image), jnp.array([top, left, h, w]), out))
        window = image[top : top + h, left : left + w]
        exact = np.asarray(jax.image.resize(window, (out, out, 3), "cubic", antialias=False))
        tf_ref = _tf_resize(window, out)
        inner = np.ix_(_interior(h, out), _interior(w, out))
        assert ours[inner].size > 3 * (out // 2) ** 2
        np.testing.assert_allclose(ours[inner], exact[inner], atol=1e-4)
        on_table_grid = _on_table_grid(h, out) and _on_table_grid(w, out)
        assert on_table_grid == (h != 37)
        np.testing.assert_allclose(ours[inner], tf_ref[inner], atol=1e-4 if on_table_grid else 1e-3)
    # The test can tell: the antialiased downscale differs by far more than the tolerance.
    smooth = _tf_resize(image[5:35, 3:27], 16, antialias=True)
    ours = np.asarray(crop(jnp.asarray(image), jnp.array([5, 3, 30, 24]), 16))
    inner = np.ix_(_interior(30, 16), _interior(24, 16))
    assert np.abs(ours - smooth)[inner].max() > 1e-2


def test_eval_preprocess_equals_reference_centre_crop_and_resize():
    images = (_image(64, 80) * 255).round().astype(np.uint8)[None]
    ours = np.asarray(A.eval_preprocess(jnp.asarray(images), out_size=24))[0]
    # Reference center_crop: side rint(0.875 * min(H, W)) = 56, offset (H - side + 1) // 2.
    side = 56
    top, left = (64 - side + 1) // 2, (80 - side + 1) // 2
    crop = images[0, top : top + side, left : left + side].astype(np.float32) / 255.0
    # jax.image.resize without antialiasing, edges included; TF (56 -> 24 is off its weight
    # table's grid) on the interior.
    expected = jax.image.resize(jnp.asarray(crop), (24, 24, 3), "cubic", antialias=False)
    np.testing.assert_allclose(ours, np.clip(expected, 0.0, 1.0), atol=1e-4)
    ref = np.clip(_tf_resize(crop, 24), 0.0, 1.0)
    inner = np.ix_(_interior(side, 24), _interior(side, 24))
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-3)


def test_host_resize_is_not_antialiased():
    import tensorflow as tf

    from simclr_jax.data import tfds_source

    image = (_image(50, 60) * 255).round().astype(np.uint8)
    ours = tfds_source.resize_uint8(tf, tf.constant(image), 20).numpy().astype(np.float32)
    expected = jax.image.resize(jnp.asarray(image, jnp.float32), (20, 20, 3), "cubic", False)
    rows, cols = _interior(50, 20), _interior(60, 20)
    diff = np.abs(ours - np.clip(np.round(np.asarray(expected)), 0, 255))[np.ix_(rows, cols)]
    assert diff.max() <= 1  # uint8 rounding of values equal to 1e-4 / 255
    assert diff.mean() < 0.05
    smooth = np.round(_tf_resize(image.astype(np.float32), 20, antialias=True))
    assert np.abs(ours - smooth)[np.ix_(rows, cols)].max() > 5  # the test can tell antialiasing
