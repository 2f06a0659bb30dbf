"""Look at what the network sees: a PNG grid of images next to their two SimCLR views.

    python -m simclr_jax.data.show --config=configs/pretrain_fashion_mnist.py \
        --out=pairs.png

Each of the `--num` (8) rows is one training image (its eval view), then view A and view B, with
the config's augmentation settings: a quick check that crops, colour and blur strengths look
sensible before a long run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from simclr_jax import cli
from simclr_jax.data import augment, sources

CELL_MIN_PIXELS = 112  # small images are enlarged (nearest neighbour) so the grid is readable
GAP = 4


def views_for_display(config, num: int) -> np.ndarray:
    """float32 [num, 3, S, S, C]: eval view and two augmented views of the first `num` images."""
    arrays = sources.load_split(config.dataset, config.dataset.train_split)
    if num <= 0 or num > len(arrays):
        raise ValueError(f"num must be in [1, {len(arrays)}], got {num}")
    images = jnp.asarray(arrays.images[:num])
    size = config.dataset.image_size
    aug = config.augment
    view_a, view_b = augment.simclr_views(
        jax.random.key(config.seed),
        images,
        jnp.arange(num),
        out_size=size,
        color_strength=aug.color_jitter_strength,
        use_blur=aug.use_blur,
        crop_min_area=aug.crop_min_area,
        flip=aug.flip,
        brightness=aug.brightness,
    )
    original = augment.eval_preprocess(images, out_size=size)
    return np.asarray(jnp.stack([original, view_a, view_b], axis=1))


def grid_image(views: np.ndarray):
    """A PIL RGB image: one row per example, one column per view, small images enlarged."""
    from PIL import Image

    rows, cols, size, _, channels = views.shape
    zoom = max(1, -(-CELL_MIN_PIXELS // size))
    cell = size * zoom
    canvas = np.full((rows * (cell + GAP) + GAP, cols * (cell + GAP) + GAP, 3), 255, np.uint8)
    pixels = np.round(np.clip(views, 0.0, 1.0) * 255).astype(np.uint8)
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    pixels = pixels.repeat(zoom, axis=2).repeat(zoom, axis=3)
    for r in range(rows):
        for c in range(cols):
            top, left = GAP + r * (cell + GAP), GAP + c * (cell + GAP)
            canvas[top : top + cell, left : left + cell] = pixels[r, c]
    return Image.fromarray(canvas)


def write_pairs(config, out_path: str, num: int = 8) -> str:
    """Write the grid of `num` images and their two views to `out_path` (PNG); returns the path."""
    grid_image(views_for_display(config, num)).save(out_path)
    return out_path


def main() -> None:
    # Flags are defined here, not at import, so importing this module next to a trainer (which
    # defines its own --config) does not clash.
    config = config_flags.DEFINE_config_file(
        "config", None, cli.config_help("A pretraining config", "pretrain")
    )
    out = flags.DEFINE_string("out", "pairs.png", "Where to write the PNG grid.")
    num = flags.DEFINE_integer("num", 8, "How many images (rows).")
    flags.mark_flag_as_required("config")
    cli.run(lambda argv: print(write_pairs(config.value, out.value, num.value)))


if __name__ == "__main__":
    main()
