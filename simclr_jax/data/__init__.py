"""Data: sources (local Fashion-MNIST, tfds, image folders, arrays), folders prepared once into tfds
datasets (prepared.py, with folder_layout, image_files and shard_writer), on-device SimCLR
augmentation, and the batch pipelines (device-resident training data, streamed batches read by
index, padded exact-eval batches).

tensorflow / tensorflow_datasets are imported only inside `tfds_source`, and only when it is used.
"""

from simclr_jax.data.arrays import ImageArrays, from_arrays
from simclr_jax.data.sources import load_split

__all__ = ["ImageArrays", "from_arrays", "load_split"]
