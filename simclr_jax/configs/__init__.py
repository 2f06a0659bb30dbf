"""The stage configs as a package: `from simclr_jax.configs import pretrain_fashion_mnist`."""
