"""The on-device crop sampler against a NumPy transcription of the reference's sampler.

The reference (google-research/simclr, tf2/data_util.py crop_and_resize) calls TF's
sample_distorted_bounding_box with the whole image as the object box, min_object_covered=0.1,
aspect_ratio_range=(3/4, 4/3), area_range=(0.08, 1.0), max_attempts=100. `reference_box` below is a
loop written from that kernel's documented C++ behaviour (sample_distorted_bounding_box_op.cc):

    per attempt: aspect = U * (hi - lo) + lo                       (float32)
                 height = rint(sqrt(min_area_px / aspect)), max_height = rint(sqrt(max_area_px /
                 aspect)), max_height lowered until rint(max_height * aspect) <= width, and to
                 <= image height; height = max_height if height >= max_height, else height plus
                 Uniform(max_height - height + 1)
                 width = rint(height * aspect); one step up if the area is under min, one down if
                 over max; reject if still out of range or outside the image
                 reject if area / image area < min_object_covered
                 top = Uniform(image_height - height) (0..H-h-1) if height < H, likewise left
    after max_attempts rejections: the whole image.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from scipy import stats

from simclr_jax.data import augment as A

f32 = np.float32


def reference_box(draw, height, width, *, min_area=0.08, aspect_range=(0.75, 4 / 3)):
    """[top, left, h, w]; draw(kind, attempt) is a uniform in [0, 1), Uniform(n) = floor(u * n)."""

    def uniform_int(n, kind, i):
        return min(int(draw(kind, i) * n), n - 1)

    min_px = f32(f32(min_area) * f32(width)) * f32(height)
    max_px = f32(f32(1.0) * f32(width)) * f32(height)
    lo, hi = f32(aspect_range[0]), f32(aspect_range[1])
    for i in range(100):
        aspect = f32(f32(draw("aspect", i)) * (hi - lo) + lo)
        h = int(np.rint(np.sqrt(f32(min_px / aspect))))
        max_h = int(np.rint(np.sqrt(f32(max_px / aspect))))
        if np.rint(f32(max_h * aspect)) > width:
            max_h = int((width + 0.5 - float(f32(1e-7))) / float(aspect))  # C++: double, truncated
            if np.rint(f32(max_h * aspect)) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += uniform_int(max_h - h + 1, "height", i)
        w = int(np.rint(f32(h * aspect)))
        if w * h < min_px:
            h += 1
            w = int(np.rint(f32(h * aspect)))
        if w * h > max_px:
            h -= 1
            w = int(np.rint(f32(h * aspect)))
        area = w * h
        if area < min_px or area > max_px or w > width or h > height or w <= 0 or h <= 0:
            continue
        if area < 1 or f32(area) / f32(height * width) < f32(0.1):  # min_object_covered
            continue
        top = uniform_int(height - h, "top", i) if h < height else 0
        left = uniform_int(width - w, "left", i) if w < width else 0
        return top, left, h, w
    return 0, 0, height, width


def _reference_boxes(n, height, width, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return np.array(
        [reference_box(lambda *_: rng.random(), height, width, **kwargs) for _ in range(n)]
    )


def _our_boxes(n, height, width, seed=1, **kwargs):
    keys = jax.random.split(jax.random.key(seed), n)
    sample = jax.jit(jax.vmap(lambda k: A.sample_crop_box(k, height, width, **kwargs)))
    return np.asarray(sample(keys))


def _area_uniform_boxes(n, height, width, seed=2):
    """The sampler this project had before: area U[0.08, 1], log-uniform aspect, 10 tries."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        box = (0, 0, height, width)
        for _ in range(10):
            area = rng.uniform(0.08, 1.0) * height * width
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
            if 1 <= w <= width and 1 <= h <= height:
                box = (0, 0, h, w)
                break
        boxes.append(box)
    return np.array(boxes)


def _area(boxes, height, width):
    return boxes[:, 2] * boxes[:, 3] / (height * width)


def test_area_and_aspect_distributions_match_the_reference_sampler():
    n = 3000
    for height, width in [(32, 32), (375, 500)]:
        ours, ref = _our_boxes(n, height, width), _reference_boxes(n, height, width)
        area_ours, area_ref = _area(ours, height, width), _area(ref, height, width)
        assert stats.ks_2samp(area_ours, area_ref).pvalue > 1e-3, (height, width)
        aspect_ours, aspect_ref = ours[:, 3] / ours[:, 2], ref[:, 3] / ref[:, 2]
        assert stats.ks_2samp(aspect_ours, aspect_ref).pvalue > 1e-3, (height, width)
        # The height-uniform density falls like 1/sqrt(area): mean area well under the 0.54 of an
        # area-uniform draw in [0.08, 1].
        assert 0.36 < area_ours.mean() < 0.46
    # The test has the power to see the old sampler (area uniform) as different.
    old = _area(_area_uniform_boxes(n, 32, 32), 32, 32)
    assert stats.ks_2samp(old, _area(_reference_boxes(n, 32, 32), 32, 32)).pvalue < 1e-6


def test_sampler_equals_the_reference_box_for_box_given_the_same_uniforms():
    attempts = A.CROP_ATTEMPTS
    cases = [(32, 32, 0.08), (28, 28, 0.2), (200, 160, 0.08), (7, 9, 0.08), (33, 17, 0.5)]
    for height, width, min_area in cases:
        u = np.asarray(jax.random.uniform(jax.random.key(height), (400, 2 * attempts + 2)))
        boxes = functools.partial(A.crop_box_from_uniforms, height=height, width=width)
        ours = np.asarray(jax.jit(jax.vmap(functools.partial(boxes, min_area=min_area)))(u))

        def fed(v):
            slots = {"aspect": 0, "height": attempts}
            offsets = {"top": v[-2], "left": v[-1]}
            return lambda kind, i: offsets[kind] if kind in offsets else v[slots[kind] + i]

        ref = np.array([reference_box(fed(v), height, width, min_area=min_area) for v in u])
        np.testing.assert_array_equal(ours, ref, err_msg=f"{height}x{width} min_area={min_area}")


def test_boxes_inside_the_image_none_under_the_covered_fraction():
    height, width = 32, 32
    boxes = _our_boxes(4000, height, width)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert _area(boxes, height, width).min() >= A.MIN_OBJECT_COVERED
    # As TF: the offset is drawn from 0..H-h-1, so the last row is reached only by full height.
    assert (top + h < height)[h < height].all() and (top == 0).any()
    aspect = w / h
    assert aspect.min() >= 0.75 * 0.95 and aspect.max() <= 4 / 3 * 1.05


def test_sampler_falls_back_to_the_whole_image():
    # A 10x100 strip: every attempt needs h >= sqrt(0.5 * 1000 / (4/3)) > 10 rows, so all fail.
    box = jax.jit(functools.partial(A.sample_crop_box, height=10, width=100, min_area=0.5))(
        jax.random.key(3)
    )
    np.testing.assert_array_equal(np.asarray(box), [0, 0, 10, 100])


def test_host_crop_window_is_the_reference_sampler():
    import tensorflow as tf

    from simclr_jax.data import tfds_source

    height, width, n = 32, 32, 2000

    @tf.function
    def windows(seeds):
        def one(seed):
            begin, size = tfds_source.random_crop_window(tf, [height, width, 3], seed)
            return tf.concat([begin[:2], size[:2]], 0)

        return tf.map_fn(one, seeds)

    seeds = tf.stack([tf.range(n), tf.fill([n], 5)], axis=1)
    host = windows(seeds).numpy()
    area = _area(host, height, width)
    assert area.min() >= A.MIN_OBJECT_COVERED  # none in [0.08, 0.1): min_object_covered is 0.1
    ref = _area(_reference_boxes(n, height, width), height, width)
    assert stats.ks_2samp(area, ref).pvalue > 1e-3
