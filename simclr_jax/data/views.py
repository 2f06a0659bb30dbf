"""The augmented views a training step takes of its batch, inside the mapped step (per replica).

Every random choice is keyed by (seed, step, stream, global example index), never by the device:
the same example at the same step gets the same view on 1 device or 64, and a resumed run sees
the views an uninterrupted one would have. The augmentations themselves are data/augment.py's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.data import augment
from simclr_jax.parallel import DATA_AXIS


def example_keys(
    seed: int, step: jax.Array, local_batch: int, *, stream: int = 0
) -> tuple[jax.Array, jax.Array]:
    """(key of this step, global example ids [local_batch]) for this replica's rows.

    `stream` separates batches of one step (distillation's labelled batch); 0 leaves the key as
    (seed, step).
    """
    key = jax.random.fold_in(jax.random.key(seed), step)
    if stream:
        key = jax.random.fold_in(key, stream)
    example_ids = jax.lax.axis_index(DATA_AXIS) * local_batch + jnp.arange(local_batch)
    return key, example_ids


def contrastive_views(
    config: ml_collections.ConfigDict,
    step: jax.Array,
    images: jax.Array,
    example_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pretraining's two views of uint8 images (SimCLR augmentation, config.augment).

    example_ids: the rows' global ids when `images` is a part of this replica's batch (a chunk of
    gradient accumulation); None: `images` is the whole replica batch."""
    key, ids = example_keys(config.seed, step, images.shape[0])
    example_ids = ids if example_ids is None else example_ids
    aug = config.augment
    return augment.simclr_views(
        key,
        images,
        example_ids,
        out_size=config.dataset.image_size,
        color_strength=aug.color_jitter_strength,
        use_blur=aug.use_blur,
        crop_min_area=aug.crop_min_area,
        flip=aug.flip,
        brightness=aug.brightness,
    )


def probe_inputs(
    config: ml_collections.ConfigDict, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The online probe's un-augmented (images, labels): every `probe.clean_every`-th row of this
    replica's batch, preprocessed as for evaluation. Rows are taken by position, and the batch
    order is already random; when clean_every divides the per-device batch these are the global
    batch's every clean_every-th images, the same ones on any number of devices."""
    if images.ndim == 5:
        raise ValueError(
            f"probe.clean_every={config.probe.clean_every} needs whole images, but this batch holds "
            "host-cropped views: set probe.clean_every=0 (the probe trains on the views)"
        )
    every = config.probe.clean_every
    clean = augment.eval_preprocess(images[::every], out_size=config.dataset.image_size)
    return clean, labels[::every]


def finetune_view(
    config: ml_collections.ConfigDict,
    step: jax.Array,
    images: jax.Array,
    *,
    precropped: bool = False,
    stream: int = 0,
) -> jax.Array:
    """Fine-tuning's (and distillation's) one view: crop + flip (only flip when `precropped`)."""
    key, example_ids = example_keys(config.seed, step, images.shape[0], stream=stream)
    return augment.finetune_views(
        key,
        images,
        example_ids,
        out_size=config.dataset.image_size,
        crop_min_area=config.augment.crop_min_area,
        flip=config.augment.flip,
        crop=not precropped,
    )
