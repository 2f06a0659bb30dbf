"""Two-layer-CNN case study: SimCLR pretraining cuts label complexity.

Run ``python -m simclr_jax.theory --out DIR``; see ``simclr_jax/theory/README.md``.
"""
