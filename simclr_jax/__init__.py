"""SimCLR v1 and SimCLRv2 in JAX/Flax: pretraining, fine-tuning and distillation."""

__version__ = "0.1.0"


def load_encoder(*args, **kwargs):
    """(apply_fn, variables) for features from any stage's workdir; see simclr_jax.encoder."""
    from simclr_jax.saved_run import load_encoder as load

    return load(*args, **kwargs)
