"""The toy image model of the case study: one signal patch and one noise patch.

Each example is ``x = [y * mu, xi]`` (two patches in R^d), ``y`` is +1 or -1 with equal odds and
``xi ~ N(0, sigma_p^2 (I - mu mu^T / ||mu||^2))`` is orthogonal to the signal ``mu``. The
signal-to-noise ratio is ``SNR = ||mu|| / (sigma_p * sqrt(d))``: the noise patch carries about
``sigma_p * sqrt(d)`` of norm, the signal patch ``||mu||``.

Augmentations for SimCLR act on the noise patch only and keep the signal patch: the idealised one of
the analysis draws fresh noise, the realistic ones transform the existing noise so that positives
share part of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("fresh", "mask", "flip", "rotate")


def signal_vector(dim: int, snr: float | jax.Array, sigma_p: float) -> jax.Array:
    """``mu`` along the first axis with the norm that gives ``snr``.

    The direction is irrelevant (the noise is isotropic in the complement of ``mu`` and the network
    and Gaussian initialisation are rotation invariant); the first axis keeps the coordinate-wise
    augmentations ('mask', 'flip') orthogonal to ``mu`` without a projection.
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (one signal axis plus noise), got {dim}")
    norm = jnp.asarray(snr, jnp.float32) * sigma_p * jnp.sqrt(float(dim))
    return jnp.zeros((dim,), jnp.float32).at[0].set(norm)


def empirical_snr(mu: jax.Array, sigma_p: float) -> jax.Array:
    """``||mu|| / (sigma_p sqrt(d))`` -- the definition every sweep axis uses."""
    return jnp.linalg.norm(mu) / (sigma_p * jnp.sqrt(mu.shape[-1]))


def _project_out(v: jax.Array, mu: jax.Array) -> jax.Array:
    """Remove the component along ``mu`` (rows of ``v``)."""
    unit = mu / jnp.linalg.norm(mu)
    return v - (v @ unit)[..., None] * unit


def sample_noise(key: jax.Array, n: int, mu: jax.Array, sigma_p: float) -> jax.Array:
    """``n`` draws of ``N(0, sigma_p^2 (I - mu mu^T/||mu||^2))``: Gaussian projected off ``mu``."""
    return _project_out(sigma_p * jax.random.normal(key, (n, mu.shape[-1])), mu)


def assemble(
    key: jax.Array, y: jax.Array, mu: jax.Array, xi: jax.Array, *, random_order: bool = False
) -> jax.Array:
    """Stack ``[y mu, xi]`` into ``[n, 2, d]``; with ``random_order`` each example's patches swap
    with probability 1/2 (the CNN sums over patches, so it cannot tell the difference)."""
    x = jnp.stack([y[:, None] * mu, xi], axis=1)
    if random_order:
        swap = jax.random.bernoulli(key, 0.5, (x.shape[0],))
        x = jnp.where(swap[:, None, None], x[:, ::-1], x)
    return x


def sample(
    key: jax.Array, n: int, mu: jax.Array, sigma_p: float, *, random_order: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``n`` labelled examples: ``x`` float32 ``[n, 2, d]``, ``y`` float32 ``[n]`` in {+1, -1}."""
    if n < 1:
        raise ValueError(f"n (number of examples) must be >= 1, got {n}")
    key_y, key_xi, key_order = jax.random.split(key, 3)
    y = jnp.where(jax.random.bernoulli(key_y, 0.5, (n,)), 1.0, -1.0)
    xi = sample_noise(key_xi, n, mu, sigma_p)
    return assemble(key_order, y, mu, xi, random_order=random_order), y


def augment_noise(
    key: jax.Array, xi: jax.Array, mu: jax.Array, sigma_p: float, kind: str, strength: float
) -> jax.Array:
    """Noise patch of the positive view of examples whose noise patches are ``xi`` ``[n, d]``.

    ``fresh``: an independent draw, the idealised augmentation of the analysis (``strength`` unused).
    ``mask``: keep each coordinate with probability ``strength``, redraw the rest (a crop-like
    transform: positives share a fraction ``strength`` of the noise exactly).
    ``flip``: flip each coordinate's sign with probability ``(1 - strength) / 2`` (positives share
    the noise magnitudes always and the noise itself with correlation ``strength``).
    ``rotate``: rotate ``xi`` by ``arccos(strength)`` towards a random direction (norm kept).
    Every kind keeps the positive's noise orthogonal to ``mu`` and its marginal law unchanged, so
    the views differ from the data only in how much noise the two views share.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {kind!r}")
    if isinstance(strength, int | float) and not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    key_fresh, key_pick = jax.random.split(key)
    fresh = sample_noise(key_fresh, xi.shape[0], mu, sigma_p)
    if kind == "fresh":
        return fresh
    if kind == "mask":
        keep = jax.random.bernoulli(key_pick, strength, xi.shape)
        return _project_out(jnp.where(keep, xi, fresh), mu)
    if kind == "flip":
        flip = jax.random.bernoulli(key_pick, (1.0 - strength) / 2.0, xi.shape)
        return _project_out(jnp.where(flip, -xi, xi), mu)
    # rotate: the fresh draw's part orthogonal to xi, rescaled to |xi|, is the rotation partner.
    unit = xi / jnp.linalg.norm(xi, axis=-1, keepdims=True)
    partner = fresh - jnp.sum(fresh * unit, -1, keepdims=True) * unit
    partner = partner / jnp.linalg.norm(partner, axis=-1, keepdims=True)
    norm = jnp.linalg.norm(xi, axis=-1, keepdims=True)
    return strength * xi + jnp.sqrt(1.0 - strength**2) * norm * partner


def positive_pairs(
    key: jax.Array,
    n: int,
    mu: jax.Array,
    sigma_p: float,
    *,
    augmentation: str = "fresh",
    strength: float = 0.0,
    random_order: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``n`` unlabeled examples and their positives, both ``[n, 2, d]``: the two views share the
    signal patch ``y mu`` and differ in the noise patch as ``augmentation`` says. The labels are
    drawn to build the signal patch and then discarded."""
    key_y, key_xi, key_aug, key_order_a, key_order_b = jax.random.split(key, 5)
    y = jnp.where(jax.random.bernoulli(key_y, 0.5, (n,)), 1.0, -1.0)
    xi = sample_noise(key_xi, n, mu, sigma_p)
    xi_positive = augment_noise(key_aug, xi, mu, sigma_p, augmentation, strength)
    view_a = assemble(key_order_a, y, mu, xi, random_order=random_order)
    view_b = assemble(key_order_b, y, mu, xi_positive, random_order=random_order)
    return view_a, view_b
