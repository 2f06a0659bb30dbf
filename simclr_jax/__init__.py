"""SimCLR v1 and SimCLRv2 in JAX/Flax: pretraining, fine-tuning and distillation."""

__version__ = "0.1.0"
