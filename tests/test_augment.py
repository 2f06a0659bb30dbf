"""SimCLR augmentations: each op alone against NumPy references, then the batched views."""

from __future__ import annotations

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.data import augment as A

# One shape per kind for the batched tests, so they share compilations.
RGB_SHAPE = (8, 40, 40, 3)
GRAY_SHAPE = (8, 16, 16, 1)
GRAY_KWARGS = dict(out_size=16, color_strength=0.5, use_blur=False)


def _uint8_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth_rgb(size=24, seed=0):
    """A float RGB image with structure (gradients + noise) in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([x, y, 0.5 + 0.3 * np.sin(6 * x)], -1)
    image += 0.1 * rng.standard_normal(image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def _views(images, ids, key=0, **overrides):
    kwargs = dict(out_size=32, color_strength=1.0, use_blur=True, crop_min_area=0.08, flip=True)
    kwargs.update(overrides)
    return A.simclr_views(jax.random.key(key), jnp.asarray(images), jnp.asarray(ids), **kwargs)


# ------------------------------------------------------------------------------------- geometry


def test_crop_and_resize_is_exact_at_scale_one():
    image = jnp.asarray(_smooth_rgb(40))
    crop = jax.jit(A.crop_and_resize, static_argnums=2)
    whole = crop(image, jnp.array([0, 0, 40, 40]), 40)
    np.testing.assert_allclose(whole, image, atol=1e-5)
    window = crop(image, jnp.array([3, 5, 16, 16]), 16)
    np.testing.assert_allclose(window, image[3:19, 5:21], atol=1e-5)


def test_crop_and_resize_upsamples_window_content():
    # Left half 0, right half 1; a window inside the right half must come out all ones.
    image = jnp.zeros((32, 32, 1)).at[:, 16:].set(1.0)
    out = jax.jit(A.crop_and_resize, static_argnums=2)(image, jnp.array([4, 20, 8, 8]), 24)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)
    assert out.shape == (24, 24, 1)


def test_flip_mirrors_and_is_random_half_the_time():
    image = jnp.asarray(_smooth_rgb(12))
    np.testing.assert_array_equal(A.flip_left_right(image, True), image[:, ::-1])
    np.testing.assert_array_equal(A.flip_left_right(image, False), image)
    keys = jax.random.split(jax.random.key(1), 400)
    flipped = jax.vmap(lambda k: A.random_flip(k, image))(keys)
    is_flipped = np.asarray(jnp.all(flipped == image[:, ::-1], axis=(1, 2, 3)))
    is_same = np.asarray(jnp.all(flipped == image, axis=(1, 2, 3)))
    assert (is_flipped ^ is_same).all()
    assert 0.4 < is_flipped.mean() < 0.6


# ---------------------------------------------------------------------------------------- colour


def test_grayscale_equal_channels_with_luma_weights():
    image = _smooth_rgb()
    gray = np.asarray(A.to_grayscale(jnp.asarray(image)))
    expected = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    for c in range(3):
        np.testing.assert_allclose(gray[..., c], expected, atol=1e-6)
    single = jnp.asarray(image[..., :1])
    np.testing.assert_array_equal(A.to_grayscale(single), single)


def test_brightness_and_contrast_move_the_right_statistics():
    image = jnp.asarray(_smooth_rgb()) * 0.5
    np.testing.assert_allclose(A.adjust_brightness(image, 1.5), image * 1.5, rtol=1e-6)
    low = A.adjust_contrast(image, 0.5)
    mean, std = image.mean(axis=(0, 1)), image.std(axis=(0, 1))
    np.testing.assert_allclose(low.mean(axis=(0, 1)), mean, atol=1e-6)  # per-channel mean kept
    np.testing.assert_allclose(low.std(axis=(0, 1)), 0.5 * std, rtol=1e-5)  # spread halved


def test_hsv_matches_colorsys():
    pixels = np.random.default_rng(0).random((200, 3)).astype(np.float32)
    pixels[:3] = [[0.2, 0.2, 0.2], [0, 0, 0], [1, 0, 0]]  # gray, black, pure red
    ours = np.asarray(A.rgb_to_hsv(jnp.asarray(pixels)))
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    back = np.asarray(A.hsv_to_rgb(jnp.asarray(expected, jnp.float32)))
    np.testing.assert_allclose(back, pixels, atol=1e-5)


def test_saturation_and_hue_against_colorsys():
    image = _smooth_rgb(8)
    flat = image.reshape(-1, 3)

    def reference(saturation, hue):
        out = []
        for p in flat:
            h, s, v = colorsys.rgb_to_hsv(*p)
            out.append(colorsys.hsv_to_rgb((h + hue) % 1.0, min(1.0, s * saturation), v))
        return np.array(out).reshape(image.shape)

    hsv = jax.jit(A.adjust_hsv)
    np.testing.assert_allclose(hsv(image, 1.6, 0.0), reference(1.6, 0.0), atol=1e-5)
    np.testing.assert_allclose(hsv(image, 1.0, 0.15), reference(1.0, 0.15), atol=1e-5)
    # Saturation 0 leaves no colour: max == min in every pixel; pure red + 1/3 turn is pure green.
    desaturated = np.asarray(hsv(image, 0.0, 0.0))
    np.testing.assert_allclose(desaturated.max(-1), desaturated.min(-1), atol=1e-6)
    red, green = np.zeros((2, 2, 3)), np.zeros((2, 2, 3))
    red[..., 0], green[..., 1] = 1.0, 1.0
    np.testing.assert_allclose(A.adjust_hue(jnp.asarray(red), 1 / 3), green, atol=1e-5)


def test_colour_ops_are_identity_on_one_channel():
    image = jnp.asarray(_smooth_rgb()[..., :1])
    np.testing.assert_array_equal(A.adjust_saturation(image, 0.1), image)
    np.testing.assert_array_equal(A.adjust_hue(image, 0.3), image)


def _numpy_jitter(u, image, strength, brightness="multiplicative"):
    """Independent reference of the jitter: ops in argsort(u[:4]) order, clipped after each.

    brightness 'additive' is the reference's simclrv1 mode: x + U[-0.8s, 0.8s].
    """
    b = 0.8 * strength
    factors = [max(1 - b, 0) + (1 + b - max(1 - b, 0)) * u[4 + i] for i in range(3)]
    shift = -b + 2 * b * u[4]
    hue = -0.2 * strength + 0.4 * strength * u[7]
    x = image.astype(np.float64)
    for op in np.argsort(u[:4]):
        if op == 0:
            x = x + shift if brightness == "additive" else x * factors[0]
        elif op == 1:
            m = x.mean(axis=(0, 1), keepdims=True)
            x = (x - m) * factors[1] + m
        elif x.shape[-1] == 3:
            flat = []
            for p in x.reshape(-1, 3):
                h, s, v = colorsys.rgb_to_hsv(*p)
                if op == 2:
                    s = min(1.0, s * factors[2])
                else:
                    h = (h + hue) % 1.0
                flat.append(colorsys.hsv_to_rgb(h, s, v))
            x = np.array(flat).reshape(x.shape)
        x = np.clip(x, 0, 1)
    return x


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_reference_in_random_order(channels):
    image = _smooth_rgb(8)[..., :channels]
    rng = np.random.default_rng(channels)
    orders = set()
    jitter = jax.jit(lambda u, x: A._jitter_from_uniforms(u, x, 1.0))
    for _ in range(6):
        u = rng.random(8).astype(np.float32)
        orders.add(tuple(np.argsort(u[:4])))
        ours = jitter(jnp.asarray(u), jnp.asarray(image))
        np.testing.assert_allclose(ours, _numpy_jitter(u, image, 1.0), atol=2e-5)
    assert len(orders) > 1


def test_additive_brightness_jitter_matches_reference():
    image = _smooth_rgb(8)
    rng = np.random.default_rng(7)
    jitter = jax.jit(lambda u, x: A._jitter_from_uniforms(u, x, 0.5, "additive"))
    for _ in range(4):
        u = rng.random(8).astype(np.float32)
        ours = jitter(jnp.asarray(u), jnp.asarray(image))
        np.testing.assert_allclose(ours, _numpy_jitter(u, image, 0.5, "additive"), atol=2e-5)
    np.testing.assert_allclose(A.shift_brightness(jnp.asarray(image), 0.1), image + 0.1, atol=1e-7)
    with pytest.raises(ValueError, match="brightness must be one of"):
        A._jitter_from_uniforms(jnp.asarray(u), jnp.asarray(image), 0.5, "additve")


def test_color_jitter_strength_zero_is_identity():
    image = jnp.asarray(_smooth_rgb())
    np.testing.assert_allclose(A.color_jitter(jax.random.key(0), image, 0.0), image, atol=1e-5)


def test_color_distortion_probabilities():
    image = jnp.asarray(_smooth_rgb(8))
    keys = jax.random.split(jax.random.key(2), 1000)
    out = jax.vmap(lambda k: A.random_color_distortion(k, image, 1.0))(keys)
    gray = np.asarray(jnp.all(jnp.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3)))
    unchanged = np.asarray(jnp.all(jnp.abs(out - image) < 1e-6, axis=(1, 2, 3)))
    assert 0.16 < gray.mean() < 0.24  # p = 0.2
    assert 0.12 < unchanged.mean() < 0.20  # neither jitter (p 0.8) nor gray: 0.2 * 0.8 = 0.16


# ------------------------------------------------------------------------------------------ blur


def _numpy_blur(image, sigma, kernel_size):
    radius = kernel_size // 2
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    weights /= weights.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        out = sum(
            w * np.take(padded, np.arange(i, i + image.shape[axis]), axis=axis)
            for i, w in enumerate(weights)
        )
    return out


def test_blur_matches_reference_lowers_high_frequencies_keeps_mean():
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    blurred = np.asarray(A.gaussian_blur(jnp.asarray(image), 1.5, A.blur_kernel_size(32)))
    np.testing.assert_allclose(blurred, _numpy_blur(image, 1.5, 3), atol=1e-5)

    def high_freq_energy(x):
        return np.sum(np.diff(x, axis=0) ** 2) + np.sum(np.diff(x, axis=1) ** 2)

    assert high_freq_energy(blurred) < 0.5 * high_freq_energy(image)
    np.testing.assert_allclose(blurred.mean(), image.mean(), atol=0.01)
    big = np.random.default_rng(1).random((64, 64, 1)).astype(np.float32)
    np.testing.assert_allclose(
        A.gaussian_blur(jnp.asarray(big), 2.0, 7), _numpy_blur(big, 2.0, 7), atol=1e-5
    )


def test_blur_kernel_size_follows_reference():
    assert [A.blur_kernel_size(s) for s in (224, 96, 32, 28, 19)] == [23, 9, 3, 3, 1]


def test_random_blur_probability_and_sigma_range():
    image = jnp.asarray(np.random.default_rng(0).random((32, 32, 1)).astype(np.float32))
    keys = jax.random.split(jax.random.key(4), 400)
    out = jax.vmap(lambda k: A.random_blur(k, image))(keys)
    changed = np.asarray(jnp.any(out != image, axis=(1, 2, 3)))
    assert 0.4 < changed.mean() < 0.6


# ------------------------------------------------------------------------------- batched views


def test_views_shapes_ranges_determinism():
    images = _uint8_images(RGB_SHAPE)
    ids = np.arange(8)
    a, b = _views(images, ids)
    assert a.shape == b.shape == (8, 32, 32, 3) and a.dtype == jnp.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    a2, b2 = _views(images, ids)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    a3, _ = _views(images, ids, key=1)
    assert float(jnp.abs(a - a3).mean()) > 0.01  # another key, other views
    assert float(jnp.abs(a - b).mean()) > 0.01  # the two views differ
    assert float(jnp.abs(a[0] - a[1]).mean()) > 0.01  # examples get different randomness


def test_views_independent_of_batch_composition():
    # Example i's views depend only on (key, id i, image i): not on its position in the batch nor on
    # the other examples. (Same batch shape, so no recompilation; the 8-device split is checked in
    # test_data's multi-device subprocess, and a batch of one here.)
    images = _uint8_images(RGB_SHAPE, seed=1)
    ids = np.arange(100, 108)
    a, b = _views(images, ids)
    order = np.array([5, 0, 7, 1, 6, 2, 4, 3])
    others = _uint8_images(RGB_SHAPE, seed=2)
    others[3] = images[5]  # example 5 now sits at position 3 among different neighbours
    ids_mixed = np.arange(200, 208)
    ids_mixed[3] = 105
    a_mixed, b_mixed = _views(others, ids_mixed)
    np.testing.assert_allclose(a_mixed[3], a[5], atol=1e-5)
    np.testing.assert_allclose(b_mixed[3], b[5], atol=1e-5)
    a_perm, b_perm = _views(images[order], ids[order])
    np.testing.assert_allclose(a_perm, a[order], atol=1e-5)
    np.testing.assert_allclose(b_perm, b[order], atol=1e-5)


def test_view_alone_equals_view_in_batch():
    images = _uint8_images(GRAY_SHAPE, seed=3)
    a, b = _views(images, np.arange(8), **GRAY_KWARGS)
    a1, b1 = _views(images[6:7], np.arange(6, 7), **GRAY_KWARGS)
    np.testing.assert_allclose(a1[0], a[6], atol=1e-5)
    np.testing.assert_allclose(b1[0], b[6], atol=1e-5)


def test_views_grayscale_images():
    images = _uint8_images(GRAY_SHAPE)
    a, b = _views(images, np.arange(8), **GRAY_KWARGS)
    assert a.shape == b.shape == GRAY_SHAPE and a.dtype == jnp.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert float(jnp.abs(a - b).mean()) > 0.01


def test_precropped_views_use_their_own_crop():
    # Host-cropped pairs [B, 2, S, S, C]; with colour, flip and blur off, view v is crop v exactly.
    crops = _uint8_images((4, 2, 16, 16, 1))
    a, b = _views(crops, np.arange(4), out_size=16, color_strength=0.0, use_blur=False, flip=False)
    np.testing.assert_allclose(a, crops[:, 0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(b, crops[:, 1] / 255.0, atol=1e-6)


def test_finetune_views_crop_and_flip_only():
    images = _uint8_images((4, 20, 20, 3))
    # Min area 1 forces the whole-image box: the output is the image itself, maybe mirrored.
    out = A.finetune_views(
        jax.random.key(0), jnp.asarray(images), jnp.arange(4), out_size=20, crop_min_area=1.0
    )
    for i in range(4):
        x = images[i] / 255.0
        mirrored = x[:, ::-1]
        assert np.allclose(out[i], x, atol=1e-5) or np.allclose(out[i], mirrored, atol=1e-5)


def test_eval_preprocess_small_is_identity_large_is_centre_crop():
    small = _uint8_images((2, 28, 28, 1))
    out = A.eval_preprocess(jnp.asarray(small), out_size=28)
    np.testing.assert_allclose(out, small / 255.0, atol=1e-6)
    # 64 px: the 0.875 crop keeps the central 56 px; a 4 px dark frame must vanish entirely.
    large = np.full((1, 64, 64, 3), 255, np.uint8)
    large[:, :4], large[:, -4:], large[:, :, :4], large[:, :, -4:] = 0, 0, 0, 0
    out = A.eval_preprocess(jnp.asarray(large), out_size=56)
    assert out.shape == (1, 56, 56, 3)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
