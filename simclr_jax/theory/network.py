"""The two-layer CNN of the case study.

``f(W, x) = F_{+1}(W_{+1}, x) - F_{-1}(W_{-1}, x)`` with
``F_j = (1/m) sum_r sum_p sigma(<w_{j,r}, x^(p)>)`` and ``sigma(z) = max(0, z)^q``, ``q > 2``.
The same ``m`` filters per sign slide over every patch (a convolution with stride = patch size) and
the second layer is fixed to +1/m and -1/m, so only the filters ``W`` of shape ``[2, m, d]`` train
(index 0 is the +1 group, index 1 the -1 group). Because the output sums over patches, the
network does not care about patch order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def activation(z: jax.Array, q: float) -> jax.Array:
    """``max(0, z)^q``: polynomial ReLU. ``q > 2`` makes small inner products grow slowly and
    large ones fast, which turns learning into a race between signal and noise."""
    return jnp.maximum(z, 0.0) ** q


def output_from_preactivations(pre: jax.Array, q: float) -> jax.Array:
    """``f`` from the pre-activations ``<w_{j,r}, x^(p)>`` arranged ``[..., 2, m, P]``."""
    per_sign = activation(pre, q).sum(-1).mean(-1)
    return per_sign[..., 0] - per_sign[..., 1]


def forward(filters: jax.Array, x: jax.Array, q: float) -> jax.Array:
    """``f(W, x)`` for filters ``[2, m, d]`` and inputs ``[..., P, d]``; returns ``[...]``."""
    pre = jnp.einsum("jrd,...pd->...jrp", filters, x)
    return output_from_preactivations(pre, q)


def logistic_loss_from_outputs(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Mean ``log(1 + exp(-y f))`` (``softplus`` keeps it finite for large margins)."""
    return jnp.mean(jax.nn.softplus(-y * outputs))


def logistic_loss(filters: jax.Array, x: jax.Array, y: jax.Array, q: float) -> jax.Array:
    """The training objective of both supervised training and fine-tuning."""
    return logistic_loss_from_outputs(forward(filters, x, q), y)


def init_filters(key: jax.Array, filters_per_sign: int, dim: int, sigma0: float) -> jax.Array:
    """Small Gaussian initialisation ``N(0, sigma0^2)`` of the ``[2, m, d]`` filters."""
    return sigma0 * jax.random.normal(key, (2, filters_per_sign, dim))


def alignment(filters: jax.Array, mu: jax.Array) -> jax.Array:
    """``|cos(w, mu)|`` of every filter (any leading shape, last axis ``d``)."""
    cos = (filters @ mu) / (jnp.linalg.norm(filters, axis=-1) * jnp.linalg.norm(mu))
    return jnp.abs(cos)
