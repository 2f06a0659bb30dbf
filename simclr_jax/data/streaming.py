"""Which datasets stream from the host: variable-size images (ImageNet, a prepared folder) cannot
live on the device."""

from __future__ import annotations

import functools

import ml_collections

from simclr_jax.data import sources, tfds_source


@functools.cache
def _tfds_image_shape(name: str, data_dir: str) -> tuple:
    return tuple(tfds_source.dataset_info(name, data_dir=data_dir).features["image"].shape)


def is_streamed(dataset_config: ml_collections.ConfigDict) -> bool:
    """True for tfds datasets whose images vary in size: they stream (data/step_stream.py)."""
    if sources.resolve_source(dataset_config) != "tfds":
        return False
    shape = _tfds_image_shape(dataset_config.name, dataset_config.data_dir)
    return any(d is None for d in shape)
