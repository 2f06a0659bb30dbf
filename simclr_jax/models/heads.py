"""Projection head and linear classifier, as in google-research/simclr (tf2/model.py).

Reference details mirrored here:

* every head layer is a Dense **without bias** (init N(0, 0.01)) followed by BatchNorm;
* the BN of a middle layer has a learned offset (beta, ``center=True``) and is followed by ReLU;
  the final layer's BN (also the single 'linear' layer's) has no beta (``center=False``), no ReLU;
* middle layers keep the input width, the final layer maps to ``proj_out_dim``;
* the head returns every layer's output ``[features, h_1, ..., h_K]`` so a classifier can be
  fine-tuned from any of them (SimCLRv2's ``ft_proj_selector``). Unlike the reference, 'none' and
  'linear' work.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def num_head_layers(proj_head_mode: str, num_proj_layers: int) -> int:
    """How many Dense+BN layers the head has (so outputs are head_0 .. head_<this>)."""
    if proj_head_mode not in PROJ_HEAD_MODES:
        raise ValueError(f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {proj_head_mode!r}")
    return {"none": 0, "linear": 1, "nonlinear": num_proj_layers}[proj_head_mode]


def selected_layer(ft_proj_selector: int, num_layers: int) -> int:
    """The head output the classifier reads, 0..num_layers: k as given, -1 the last layer (as the
    reference's hiddens_list[ft_proj_selector]). Raises naming the allowed range."""
    if isinstance(ft_proj_selector, bool) or not isinstance(ft_proj_selector, int):
        raise ValueError(f"ft_proj_selector must be an integer, got {ft_proj_selector!r}")
    if not -1 <= ft_proj_selector <= num_layers:
        raise ValueError(
            f"ft_proj_selector must be an integer in -1..{num_layers} (-1 = the last head layer), "
            f"got {ft_proj_selector}"
        )
    return num_layers if ft_proj_selector == -1 else ft_proj_selector


class ProjectionHead(nn.Module):
    """SimCLR projection head. Returns ``[input, layer 1 out, ..., layer K out]`` in float32."""

    proj_head_mode: str = "nonlinear"
    num_proj_layers: int = 3
    proj_out_dim: int = 128
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool) -> list[jax.Array]:
        num_layers = num_head_layers(self.proj_head_mode, self.num_proj_layers)
        hiddens = [features.astype(jnp.float32)]
        for j in range(num_layers):
            is_last = j == num_layers - 1
            width = self.proj_out_dim if is_last else features.shape[-1]
            h = nn.Dense(
                width,
                use_bias=False,
                kernel_init=dense_kernel_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"dense{j + 1}",
            )(hiddens[-1])
            h = nn.BatchNorm(
                use_running_average=not train,
                use_bias=not is_last,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                axis_name=self.axis_name,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"bn{j + 1}",
            )(h)
            if not is_last:
                h = nn.relu(h)
            hiddens.append(h.astype(jnp.float32))
        return hiddens


def linear_classifier(num_classes: int, *, zero_init: bool, name: str = "classifier") -> nn.Dense:
    """Dense with bias. Computes in float32 (it is tiny, and its logits feed the loss directly).

    ``zero_init`` starts the logits at 0 (reference's ``zero_init_logits_layer``, for linear eval).
    """
    return nn.Dense(
        num_classes,
        use_bias=True,
        kernel_init=nn.initializers.zeros if zero_init else dense_kernel_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )
