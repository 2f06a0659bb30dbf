"""SimCLR augmentations in JAX, run on the accelerator inside the jitted step.

Semantics follow the reference SimCLR (v2 defaults): random-resized crop with the sampler of TF's
sample_distorted_bounding_box as the reference calls it (area [crop_min_area, 1], aspect uniform in
3/4-4/3, then the height uniform, at least 10% of the image covered, 100 attempts, else the whole
image), bicubic resize without antialiasing, horizontal flip p=0.5, colour jitter p=0.8 with
strength s (brightness x * U[1-0.8s, 1+0.8s], or v1's x + U[-0.8s, 0.8s], contrast and saturation
factors U[1-0.8s, 1+0.8s], hue shift U[-0.2s, 0.2s], in a random order, clipped to [0, 1] after
each), grayscale p=0.2, then Gaussian blur p=0.5 with sigma U[0.1, 2] and a kernel of
image_side // 10 taps (made odd).

Every op works on ONE float image [H, W, C] in [0, 1] and is public so it can be tested alone; the
batch functions vmap them. Each example's randomness comes from fold_in(key, example_id), so a view
does not depend on the batch it was computed in nor on how the batch is split across devices. The
caller folds the step into `key` (different views every step).

Grayscale images (C=1, Fashion-MNIST): saturation, hue and grayscale are the identity; brightness,
contrast, crop, flip and blur apply as for RGB.

Deliberate differences from the reference (README, "Differences from the reference"): the blur
pads by reflection rather than with zeros, so it does not darken the border, and draws its sigma per
image (the reference draws one per batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CROP_PROPORTION = 0.875  # eval centre crop for images larger than 32 px (reference).
# Variable-size images are evaluated with that centre crop only for networks larger than this
# (the reference's test_crop = image_size > 32); smaller networks see the whole image resized.
EVAL_NO_CROP_MAX_SIZE = 32
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
BRIGHTNESS_MODES = ("multiplicative", "additive")  # SimCLRv2 (default), SimCLR v1
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, as tf.image.rgb_to_grayscale.


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.astype(jnp.float32) / 255.0


# Compile time matters (CPU tests, big TPU programs): every jax.random call is a threefry instance
# that XLA compiles separately, so each view draws ALL its random numbers in one uniform call and
# the ops below read their share of that vector. The key-taking public ops are thin wrappers.
CROP_ATTEMPTS = 100  # the reference's max_attempts
MIN_OBJECT_COVERED = 0.1  # the reference's min_object_covered: no crop under 10% of the image
_CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2  # aspect and height per attempt, then top and left
_JITTER_UNIFORMS = 8  # 4 to order the ops (argsort), 4 strengths
_VIEW_LAYOUT = {  # name -> (start, stop) in a view's uniform vector
    "crop": (0, _CROP_UNIFORMS),
    "flip": (_CROP_UNIFORMS, _CROP_UNIFORMS + 1),
    "jitter_apply": (_CROP_UNIFORMS + 1, _CROP_UNIFORMS + 2),
    "jitter": (_CROP_UNIFORMS + 2, _CROP_UNIFORMS + 2 + _JITTER_UNIFORMS),
    "gray": (_CROP_UNIFORMS + 2 + _JITTER_UNIFORMS, _CROP_UNIFORMS + 3 + _JITTER_UNIFORMS),
    "blur": (_CROP_UNIFORMS + 3 + _JITTER_UNIFORMS, _CROP_UNIFORMS + 5 + _JITTER_UNIFORMS),
}
NUM_VIEW_UNIFORMS = _CROP_UNIFORMS + 5 + _JITTER_UNIFORMS


def _part(u: jax.Array, name: str) -> jax.Array:
    start, stop = _VIEW_LAYOUT[name]
    return u[start:stop]


def crop_box_from_uniforms(
    u: jax.Array,
    height: int,
    width: int,
    *,
    min_area: float = 0.08,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
    min_object_covered: float = MIN_OBJECT_COVERED,
) -> jax.Array:
    """Crop box int32 [top, left, h, w] from uniforms u [2 * attempts + 2]; see sample_crop_box.

    u[i] sets attempt i's aspect, u[attempts + i] its height; u[-2], u[-1] the offsets. Every
    attempt is computed at once (no loop) and the first valid one wins, which is what TF's loop
    with early exit returns.
    """
    attempts = (u.shape[0] - 2) // 2
    f32 = np.float32  # constants rounded as TF's float32 kernel rounds them
    image_area = f32(height * width)
    min_px = f32(f32(min_area) * f32(width)) * f32(height)  # area_range = (min_area, 1)
    max_px = image_area
    lo, hi = f32(aspect_range[0]), f32(aspect_range[1])
    aspect = u[:attempts] * (hi - lo) + lo
    low = jnp.rint(jnp.sqrt(min_px / aspect))
    high = jnp.rint(jnp.sqrt(max_px / aspect))
    # The tallest crop whose rounded width still fits (TF's correction for wide aspects).
    too_wide = jnp.rint(high * aspect) > width
    high = jnp.where(too_wide, jnp.floor((width + 0.5 - 1e-7) / aspect), high)
    high = jnp.where(too_wide & (jnp.rint(high * aspect) > width), high - 1, high)
    high = jnp.minimum(high, height)
    low = jnp.minimum(low, high)
    h = jnp.minimum(low + jnp.floor(u[attempts : 2 * attempts] * (high - low + 1)), high)
    w = jnp.rint(h * aspect)
    # One step up, then one down, when rounding left the area outside [min_px, max_px] (as TF).
    grow = w * h < min_px
    h = jnp.where(grow, h + 1, h)
    w = jnp.where(grow, jnp.rint(h * aspect), w)
    shrink = w * h > max_px
    h = jnp.where(shrink, h - 1, h)
    w = jnp.where(shrink, jnp.rint(h * aspect), w)
    area = w * h
    valid = (area >= min_px) & (area <= max_px) & (w >= 1) & (h >= 1)
    valid &= (w <= width) & (h <= height) & (area / image_area >= min_object_covered)
    first = jnp.argmax(valid)
    found = valid[first]
    h = jnp.where(found, h[first], height).astype(jnp.int32)
    w = jnp.where(found, w[first], width).astype(jnp.int32)
    # TF draws the offset from {0 .. height - h - 1}: a crop reaches the last row or column only
    # when it spans the whole side.
    top = jnp.floor(u[-2] * (height - h)).astype(jnp.int32)
    left = jnp.floor(u[-1] * (width - w)).astype(jnp.int32)
    top = jnp.clip(top, 0, jnp.maximum(height - h - 1, 0))
    left = jnp.clip(left, 0, jnp.maximum(width - w - 1, 0))
    return jnp.stack([top, left, h, w])


def sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    *,
    min_area: float = 0.08,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
    attempts: int = CROP_ATTEMPTS,
    min_object_covered: float = MIN_OBJECT_COVERED,
) -> jax.Array:
    """A random crop box int32 [top, left, h, w] with the reference sampler's semantics.

    As TF's sample_distorted_bounding_box, called by the reference with area_range (min_area, 1),
    min_object_covered 0.1 and 100 attempts: each attempt draws the aspect w/h uniformly in
    aspect_range, then the height uniformly among the whole heights whose area fits the range
    (so the area density falls like 1/sqrt(area)), width = round(aspect * height); an attempt
    covering less than min_object_covered of the image is rejected; after `attempts` misses the
    box is the whole image.
    """
    u = jax.random.uniform(key, (2 * attempts + 2,))
    return crop_box_from_uniforms(
        u,
        height,
        width,
        min_area=min_area,
        aspect_range=aspect_range,
        min_object_covered=min_object_covered,
    )


# TF's ResizeBicubic (tf.image.resize(method='bicubic', antialias=False), the reference's resize):
# half-pixel centres, Keys' cubic with a = -0.5 read from a table at 1/1024 steps (the nearest
# entry), taps outside the image dropped and the rest renormalised.
BICUBIC_TABLE_SIZE = 1024
KEYS_A = -0.5


def keys_cubic(distance: jax.Array) -> jax.Array:
    """Keys' cubic convolution kernel (a = -0.5) at |distance| <= 2."""
    x, a = jnp.abs(distance), KEYS_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return jnp.where(x <= 1, near, jnp.where(x < 2, far, 0.0))


def bicubic_matrix(start, length, size: int, out_size: int) -> jax.Array:
    """float32 [out_size, size]: the weights resizing the window [start, start + length) of an axis
    of `size` pixels to `out_size` (start and length may be traced), as TF's bicubic resize of
    the cut-out window: the window's edge pixels are its last taps, nothing outside it is read.

    Output pixel i samples the window at p = (i + 0.5) * length / out_size - 0.5 (float32, as
    TF) from the 4 pixels floor(p) - 1 .. floor(p) + 2, each weighted by the kernel at its
    distance from p with p's fraction rounded to 1/1024 (TF reads its weights from a table at
    that step); taps outside the window get weight 0 and the rest are renormalised.
    """
    length = jnp.asarray(length, jnp.float32)
    position = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (length / out_size) - 0.5
    base = jnp.floor(position)
    fraction = jnp.rint((position - base) * BICUBIC_TABLE_SIZE) / BICUBIC_TABLE_SIZE
    pixel = jnp.arange(size, dtype=jnp.float32) - jnp.asarray(start, jnp.float32)  # in the window
    tap = pixel[None, :] - base[:, None]  # -1, 0, 1, 2 for the 4 taps
    used = (tap >= -1) & (tap <= 2) & (pixel >= 0) & (pixel < length)
    weights = jnp.where(used, keys_cubic(tap - fraction[:, None]), 0.0)
    return weights * (1.0 / jnp.sum(weights, axis=1, keepdims=True))


def _apply_bicubic(image: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """image [..., H, W, C] -> [..., out_h, out_w, C] with the weight matrices of each axis."""
    highest = lax.Precision.HIGHEST  # f32 products on TPUs too (their default is bf16 passes)
    image = jnp.einsum("oh,...hwc->...owc", rows, image, precision=highest)
    return jnp.einsum("pw,...owc->...opc", cols, image, precision=highest)


def crop_and_resize(image: jax.Array, box: jax.Array, out_size: int) -> jax.Array:
    """The window `box` = [top, left, h, w] (traced) of `image`, resized (bicubic) to out_size^2.

    Equals the reference's tf.image.resize of the cut-out window (bicubic_matrix); the output
    shape is static while the window is data-dependent, so it jits and vmaps. Not antialiased
    and not clipped, as the reference (values may overshoot [0, 1]; the views clip where the
    reference does).
    """
    height, width = image.shape[0], image.shape[1]
    rows = bicubic_matrix(box[0], box[2], height, out_size)
    cols = bicubic_matrix(box[1], box[3], width, out_size)
    return _apply_bicubic(image, rows, cols)


def random_resized_crop(
    key: jax.Array, image: jax.Array, out_size: int, *, min_area: float = 0.08
) -> jax.Array:
    """Random-resized crop of one image [H, W, C] to [out_size, out_size, C]."""
    box = sample_crop_box(key, image.shape[0], image.shape[1], min_area=min_area)
    return crop_and_resize(image, box, out_size)


def _crop_from_uniforms(u, image, out_size, min_area):
    box = crop_box_from_uniforms(u, image.shape[0], image.shape[1], min_area=min_area)
    return crop_and_resize(image, box, out_size)


def flip_left_right(image: jax.Array, do_flip: jax.Array | bool) -> jax.Array:
    """Mirror the width axis when `do_flip` (traced bool)."""
    return jnp.where(do_flip, image[:, ::-1, :], image)


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    """Horizontal flip with probability 0.5."""
    return flip_left_right(image, jax.random.uniform(key) < 0.5)


def resize(image: jax.Array, out_size: int) -> jax.Array:
    """Image(s) [..., H, W, C] bicubic-resized to out_size^2 and clipped to [0, 1] (the identity
    when already that size). Not antialiased: TF's bicubic resize, as the reference's."""
    height, width = image.shape[-3], image.shape[-2]
    if height == out_size and width == out_size:
        return image
    rows = bicubic_matrix(0, height, height, out_size)
    cols = bicubic_matrix(0, width, width, out_size)
    return jnp.clip(_apply_bicubic(image, rows, cols), 0.0, 1.0)


def center_crop(image: jax.Array, out_size: int, crop_proportion: float = CROP_PROPORTION):
    """Central square crop keeping `crop_proportion` of the shorter side, resized."""
    height, width = image.shape[-3], image.shape[-2]
    side = int(round(crop_proportion * min(height, width)))
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    return resize(image[..., top : top + side, left : left + side, :], out_size)


# ------------------------------------------------------------------------------------------ colour


def adjust_brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Multiplicative brightness (reference 'simclrv2' mode): x * factor."""
    return image * factor


def shift_brightness(image: jax.Array, delta: jax.Array | float) -> jax.Array:
    """Additive brightness (reference 'simclrv1' mode, tf.image.adjust_brightness): x + delta."""
    return image + delta


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Scale each channel's deviation from its spatial mean by `factor` (as tf.image does)."""
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return (image - mean) * factor + mean


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """[..., 3] RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    chroma = value - jnp.min(rgb, axis=-1)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue_if_g_max = jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    hue = jnp.where(value == r, (g - b) / safe, hue_if_g_max)
    hue = jnp.where(chroma > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """[..., 3] HSV (hue in [0, 1)) -> RGB."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # Channel n = 5, 3, 1 for R, G, B: v * (1 - s * clip(min(k, 4 - k), 0, 1)), k = (n + 6h) mod 6.
    n = jnp.array([5.0, 3.0, 1.0])
    k = jnp.mod(n + 6.0 * hue[..., None], 6.0)
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] * (1.0 - saturation[..., None] * ramp)


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Scale HSV saturation by `factor` (clipped to [0, 1]); identity for 1-channel images."""
    return adjust_hsv(image, factor, 0.0)


def adjust_hue(image: jax.Array, delta: jax.Array | float) -> jax.Array:
    """Rotate HSV hue by `delta` (a fraction of the colour circle); identity for 1 channel."""
    return adjust_hsv(image, 1.0, delta)


def to_grayscale(image: jax.Array) -> jax.Array:
    """Luma replicated over the 3 channels; identity for 1-channel images."""
    if image.shape[-1] == 1:
        return image
    luma = image @ jnp.asarray(GRAYSCALE_WEIGHTS, image.dtype)
    return jnp.repeat(luma[..., None], image.shape[-1], axis=-1)


def adjust_hsv(image: jax.Array, saturation: jax.Array | float, hue: jax.Array | float):
    """Saturation scaled and hue rotated in one HSV round trip; identity for 1-channel images."""
    if image.shape[-1] == 1:
        return image
    h, s, v = jnp.moveaxis(rgb_to_hsv(image), -1, 0)
    hsv = jnp.stack([jnp.mod(h + hue, 1.0), jnp.clip(s * saturation, 0.0, 1.0), v], axis=-1)
    return hsv_to_rgb(hsv)


def _jitter_from_uniforms(
    u: jax.Array, image: jax.Array, strength: float, brightness: str = "multiplicative"
) -> jax.Array:
    """Colour jitter from 8 uniforms: u[:4] order the ops (argsort: a uniform permutation), u[4:]
    set the brightness, contrast, saturation factors U[1 - 0.8s, 1 + 0.8s] and the hue shift
    U[-0.2s, 0.2s].

    Each of the 4 slots runs the same code: the op the permutation puts there gets its random
    parameter, the others a neutral one (factor 1, shift 0), and the result is clipped. The slots
    are a lax.fori_loop, so XLA compiles that body once instead of four times (a 4x smaller program
    than unrolled slots or a lax.switch, which under vmap evaluates every branch anyway).
    """
    b = c = s = 0.8 * strength
    h = 0.2 * strength

    def between(x, lo, hi):
        return lo + (hi - lo) * x

    if brightness not in BRIGHTNESS_MODES:
        raise ValueError(f"brightness must be one of {BRIGHTNESS_MODES}, got {brightness!r}")
    additive = brightness == "additive"
    # v2: a factor U[max(1 - b, 0), 1 + b]; v1: a shift U[-b, b] (tf.image.random_brightness).
    bright = between(u[4], -b, b) if additive else between(u[4], max(1.0 - b, 0.0), 1.0 + b)
    contrast = between(u[5], max(1.0 - c, 0.0), 1.0 + c)
    saturation = between(u[6], max(1.0 - s, 0.0), 1.0 + s)
    hue = between(u[7], -h, h)
    order = jnp.argsort(u[:4])  # order[slot]: 0 brightness, 1 contrast, 2 saturation, 3 hue

    def slot(i, image):
        op = order[i]
        if additive:
            image = shift_brightness(image, jnp.where(op == 0, bright, 0.0))
        else:
            image = adjust_brightness(image, jnp.where(op == 0, bright, 1.0))
        image = adjust_contrast(image, jnp.where(op == 1, contrast, 1.0))
        if image.shape[-1] > 1:
            hsv_params = jnp.where(op == 2, saturation, 1.0), jnp.where(op == 3, hue, 0.0)
            image = jnp.where(op >= 2, adjust_hsv(image, *hsv_params), image)
        return jnp.clip(image, 0.0, 1.0)

    return lax.fori_loop(0, 4, slot, image)


def color_jitter(
    key: jax.Array, image: jax.Array, strength: float, brightness: str = "multiplicative"
) -> jax.Array:
    """Brightness, contrast, saturation (each 0.8 s) and hue (0.2 s) in a random order, clipped
    after each (always applied; random_color_distortion adds the p=0.8 gate)."""
    u = jax.random.uniform(key, (_JITTER_UNIFORMS,))
    return _jitter_from_uniforms(u, image, strength, brightness)


def _color_from_uniforms(u_apply, u_jitter, u_gray, image, strength, brightness="multiplicative"):
    if strength > 0:
        jittered = _jitter_from_uniforms(u_jitter, image, strength, brightness)
        image = jnp.where(u_apply < 0.8, jittered, image)
    if image.shape[-1] > 1:
        image = jnp.where(u_gray < 0.2, to_grayscale(image), image)
    return image


def random_color_distortion(
    key: jax.Array, image: jax.Array, strength: float, brightness: str = "multiplicative"
) -> jax.Array:
    """Colour jitter with p=0.8, then grayscale with p=0.2 (the reference's colour distortion)."""
    u = jax.random.uniform(key, (_JITTER_UNIFORMS + 2,))
    return _color_from_uniforms(u[0], u[2:], u[1], image, strength, brightness)


# -------------------------------------------------------------------------------------------- blur


def blur_kernel_size(image_size: int) -> int:
    """Reference kernel size: side // 10 made odd (radius = side // 20); 1 (no blur) below 20 px."""
    return 2 * ((image_size // 10) // 2) + 1


def gaussian_blur(image: jax.Array, sigma: jax.Array | float, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur of one [H, W, C] image, static odd `kernel_size`, reflect padding."""
    radius = kernel_size // 2
    if radius == 0:
        return image
    radius = min(radius, image.shape[0] - 1, image.shape[1] - 1)
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-(taps**2) / (2.0 * jnp.square(sigma)))
    weights = weights / jnp.sum(weights)
    height, width = image.shape[0], image.shape[1]
    padded = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    image = sum(weights[i] * padded[i : i + height] for i in range(2 * radius + 1))
    padded = jnp.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(weights[i] * padded[:, i : i + width] for i in range(2 * radius + 1))


def random_blur(key: jax.Array, image: jax.Array, p: float = 0.5) -> jax.Array:
    """Gaussian blur with probability p, sigma U[0.1, 2], kernel ~10% of the image side."""
    return _blur_from_uniforms(jax.random.uniform(key, (2,)), image, p)


def _blur_from_uniforms(u: jax.Array, image: jax.Array, p: float = 0.5) -> jax.Array:
    sigma = 0.1 + 1.9 * u[1]
    blurred = gaussian_blur(image, sigma, blur_kernel_size(image.shape[0]))
    return jnp.where(u[0] < p, blurred, image)


# ------------------------------------------------------------------------------ per-example views


def simclr_view(
    key: jax.Array,
    image: jax.Array,
    *,
    out_size: int,
    color_strength: float,
    use_blur: bool,
    crop_min_area: float = 0.08,
    flip: bool = True,
    crop: bool = True,
    brightness: str = "multiplicative",
) -> jax.Array:
    """One SimCLR view of one uint8 image [H, W, C]: crop, flip, colour, blur; float32 in [0, 1]."""
    return _view_from_uniforms(
        jax.random.uniform(key, (NUM_VIEW_UNIFORMS,)),
        image,
        out_size=out_size,
        color_strength=color_strength,
        use_blur=use_blur,
        crop_min_area=crop_min_area,
        flip=flip,
        crop=crop,
        brightness=brightness,
    )


def _view_from_uniforms(
    u, image, *, out_size, color_strength, use_blur, crop_min_area, flip, crop, brightness
):
    image = to_float(image)
    if crop:
        image = _crop_from_uniforms(_part(u, "crop"), image, out_size, crop_min_area)
    else:
        image = resize(image, out_size)
    if flip:
        image = flip_left_right(image, _part(u, "flip")[0] < 0.5)
    u_apply, u_gray = _part(u, "jitter_apply")[0], _part(u, "gray")[0]
    image = _color_from_uniforms(
        u_apply, _part(u, "jitter"), u_gray, image, color_strength, brightness
    )
    image = jnp.clip(image, 0.0, 1.0)  # where the reference clips: before the (batched) blur
    if use_blur:
        image = jnp.clip(_blur_from_uniforms(_part(u, "blur"), image), 0.0, 1.0)
    return image


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """One key per example: fold_in(key, id), independent of batch composition and sharding."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids.astype(jnp.uint32))


@functools.partial(
    jax.jit,
    static_argnames=(
        "out_size",
        "color_strength",
        "use_blur",
        "crop_min_area",
        "flip",
        "brightness",
    ),
)
def simclr_views(
    key: jax.Array,
    images: jax.Array,
    example_ids: jax.Array,
    *,
    out_size: int,
    color_strength: float,
    use_blur: bool,
    crop_min_area: float = 0.08,
    flip: bool = True,
    brightness: str = "multiplicative",
) -> tuple[jax.Array, jax.Array]:
    """Two independent views float32 [B, out, out, C] of uint8 images [B, H, W, C].

    `images` may also be [B, 2, S, S, C]: two crops per image already taken on the host
    (variable-size datasets, see step_stream.StepStream); view v then uses crop v, uncropped.
    brightness: 'multiplicative' (SimCLRv2, the default) or 'additive' (SimCLR v1).
    """
    precropped = images.ndim == 5
    view = functools.partial(
        _view_from_uniforms,
        out_size=out_size,
        color_strength=color_strength,
        use_blur=use_blur,
        crop_min_area=crop_min_area,
        flip=flip,
        crop=not precropped,
        brightness=brightness,
    )

    def both(k, image):
        u = jax.random.uniform(k, (2, NUM_VIEW_UNIFORMS))  # one draw for both views
        pair = image if precropped else jnp.stack([image, image])
        # vmap over the pair rather than two calls: one copy of the view graph to compile.
        return jax.vmap(view)(u, pair)

    views = jax.vmap(both)(example_keys(key, example_ids), images)
    return views[:, 0], views[:, 1]


@functools.partial(jax.jit, static_argnames=("out_size", "crop_min_area", "flip", "crop"))
def finetune_views(
    key: jax.Array,
    images: jax.Array,
    example_ids: jax.Array,
    *,
    out_size: int,
    crop_min_area: float = 0.08,
    flip: bool = True,
    crop: bool = True,
) -> jax.Array:
    """One training view per image for fine-tuning / linear eval: random-resized crop + flip only.

    Returns float32 [B, out, out, C]. crop=False when the host already cropped (variable-size data).
    """

    def one(k, image):
        u = jax.random.uniform(k, (_CROP_UNIFORMS + 1,))
        image = to_float(image)
        if crop:
            image = _crop_from_uniforms(u[:-1], image, out_size, crop_min_area)
        else:
            image = resize(image, out_size)
        image = flip_left_right(image, u[-1] < 0.5) if flip else image
        return jnp.clip(image, 0.0, 1.0)

    return jax.vmap(one)(example_keys(key, example_ids), images)


@functools.partial(jax.jit, static_argnames=("out_size",))
def eval_preprocess(images: jax.Array, *, out_size: int) -> jax.Array:
    """Deterministic eval input float32 [B, out, out, C]: centre crop 0.875 + resize for images
    larger than 32 px (reference ImageNet eval); small ones (CIFAR, Fashion-MNIST) only resized."""
    images = to_float(images)
    if min(images.shape[1], images.shape[2]) <= 32:
        return resize(images, out_size)
    return center_crop(images, out_size)
