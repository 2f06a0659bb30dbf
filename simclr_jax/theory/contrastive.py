"""SimCLR pretraining of the CNN's filters, and the hand-over to fine-tuning.

Encoder: the ``M = 2m`` filters applied linearly to every patch; projection: the sum of the patch
outputs, so an example's representation is ``z = sum_p W x^(p)`` (``[M]``). Loss: SimCLR's NT-Xent
over the ``2 n_0`` views with the plain inner product ``<z, z'> / tau`` as similarity. It is not
normalised: cosine similarity is blind to scale, so "small initialisation" would mean nothing.

Why it finds ``mu``: near ``W = 0`` the loss is ``const - tr(W S W^T) / tau`` with ``S`` the
symmetrised cross-covariance of the two views, ``S ~ mu mu^T + (1/n_0) sum_i sym(xi_i xi_i'^T)``.
Gradient descent is then a power iteration: every filter turns towards the top eigenvector of ``S``.
The signal eigenvalue is ``||mu||^2``; with fresh noise in the positive, the noise part has
eigenvalues of about ``sigma_p^2 d / (2 n_0)``. So filters align with ``+mu`` or ``-mu`` (the sign
set by the initialisation) once ``2 n_0 SNR^2`` is well above 1, and with noise otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from simclr_jax.theory import network


def encode(filters: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_p W x^(p)``: ``[M, d]`` filters, ``[n, P, d]`` inputs -> ``[n, M]`` (linear, so the
    patches can be summed first)."""
    return x.sum(axis=-2) @ filters.T


def contrastive_loss(
    filters: jax.Array, view_a: jax.Array, view_b: jax.Array, temperature: float
) -> jax.Array:
    """NT-Xent with inner-product similarity: each of the ``2n`` views must pick its partner among
    the other ``2n - 1``; mean over views."""
    z = jnp.concatenate([encode(filters, view_a), encode(filters, view_b)])
    n2 = z.shape[0]
    logits = (z @ z.T) / temperature
    logits = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, logits)
    partner = (jnp.arange(n2) + n2 // 2) % n2
    return optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()


@functools.partial(jax.jit, static_argnames=("iterations",))
def curvature_at_origin(
    view_a: jax.Array, view_b: jax.Array, temperature: float, *, iterations: int = 30
) -> jax.Array:
    """Largest ``|eigenvalue|`` of the loss Hessian at ``W = 0`` for one filter (power iteration
    with Hessian-vector products). It is the fastest rate at which any direction moves under GD
    from a small start, computed from unlabeled data only; the step size is set against it."""
    dim = view_a.shape[-1]

    def grad_one(w: jax.Array) -> jax.Array:
        return jax.grad(contrastive_loss)(w[None], view_a, view_b, temperature)[0]

    def hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(grad_one, (jnp.zeros(dim),), (v,))[1]

    def body(_, v: jax.Array) -> jax.Array:
        hv = hvp(v)
        return hv / jnp.linalg.norm(hv)

    v = jax.lax.fori_loop(0, iterations, body, jnp.ones(dim) / jnp.sqrt(dim))
    return jnp.linalg.norm(hvp(v))


@functools.partial(jax.jit, static_argnames=("num_filters", "steps", "log_every"))
def pretrain(
    key: jax.Array,
    view_a: jax.Array,
    view_b: jax.Array,
    mu: jax.Array,
    *,
    num_filters: int,
    sigma0: float,
    temperature: float,
    rate: float,
    steps: int,
    log_every: int,
) -> dict[str, jax.Array]:
    """Gradient descent on the contrastive loss from ``N(0, sigma0^2)`` filters ``[M, d]``.

    The step size is ``rate / curvature_at_origin``: the fastest direction then grows by about a
    factor ``1 + rate`` per step whatever the SNR and ``n_0``, so one step budget fits the whole grid
    (GD's usual ``1/L`` rule, with ``L`` measured on the unlabeled data). ``mu`` is used only to
    log the alignment. Returns the final ``filters`` and, every ``log_every`` steps, ``loss`` and
    the mean ``alignment`` ``|cos(w_r, mu)|``.
    """
    if steps < 1 or log_every < 1 or steps % log_every:
        raise ValueError(
            f"pretrain steps ({steps}) and log_every ({log_every}) must be >= 1 with log_every "
            "dividing steps"
        )
    step_size = rate / curvature_at_origin(view_a, view_b, temperature)
    filters0 = sigma0 * jax.random.normal(key, (num_filters, view_a.shape[-1]))
    loss_and_grad = jax.value_and_grad(contrastive_loss)

    def gd_step(_, filters: jax.Array) -> jax.Array:
        return filters - step_size * loss_and_grad(filters, view_a, view_b, temperature)[1]

    def chunk(filters: jax.Array, _) -> tuple[jax.Array, dict[str, jax.Array]]:
        filters = jax.lax.fori_loop(0, log_every, gd_step, filters)
        log = {
            "loss": contrastive_loss(filters, view_a, view_b, temperature),
            "alignment": network.alignment(filters, mu).mean(),
        }
        return filters, log

    filters, history = jax.lax.scan(chunk, filters0, None, length=steps // log_every)
    history["filters"] = filters
    history["step_size"] = step_size
    return history


def finetune_init(
    key: jax.Array, filters: jax.Array, unlabeled_x: jax.Array, rms_preactivation: float
) -> jax.Array:
    """Pretrained ``[M, d]`` filters -> CNN filters ``[2, M/2, d]``.

    The split into the +1 and -1 groups is a random permutation: pretraining never saw a label, so
    it cannot know which group a filter belongs in. A filter ``w ~ s mu`` (``s = +-1``) fires only
    on the signal patch of class ``y = s`` (``sigma`` is zero for negative inputs), so it votes for
    its class exactly when it lands in group ``j = s``; about half the filters land right. Fine-
    tuning grows those and shuts the others off (their activation shrinks under the logistic
    gradient, and ``sigma'(0) = 0`` keeps them off), so any split with at least one right filter per
    class works. All filters are rescaled by one factor so that the root-mean-square pre-activation
    over the unlabeled patches is ``rms_preactivation``: of order 1, where ``sigma`` is neither
    negligible nor explosive. The scale only sets the time scale of fine-tuning; the direction
    carries the pretraining.
    """
    num_filters, dim = filters.shape
    if num_filters % 2:
        raise ValueError(f"the number of pretrained filters must be even, got {num_filters}")
    shuffled = jax.random.permutation(key, filters, axis=0)
    rms = jnp.sqrt(jnp.mean((unlabeled_x.reshape(-1, dim) @ shuffled.T) ** 2))
    return (rms_preactivation / rms) * shuffled.reshape(2, num_filters // 2, dim)
