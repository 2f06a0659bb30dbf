"""The presets, one file per stage and dataset family, and their base builders (base.py).

This folder is the top-level `configs/` of a checkout and installs as `simclr_jax.configs`:
`--config=configs/pretrain_imagenet.py:r50_1x_sk1` from a checkout, or
`--config=pretrain_imagenet:r50_1x_sk1` anywhere once the package is installed.
"""
