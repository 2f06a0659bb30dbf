"""Forward FLOPs counted by hand from the network's shapes, independent of XLA's cost model.

Every layer that carries a `kernel` (convolutions, the convnet's pointwise layer, dense layers) is
a sum of products: out[..., o] = sum over the kernel's other axes of in * kernel, so it costs
2 * (output positions) * (kernel size) FLOPs (a multiply and an add per tap; a grouped kernel
already holds only its group's inputs). Output shapes come from flax's captured intermediates
under `jax.eval_shape`: nothing is allocated or run. BatchNorm, activations, pooling and padding
are not counted (a few percent of a ResNet). XLA's own count (models/card.py) skips the taps
that fall on zero padding, so it lands slightly under this one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp


def forward_flops(model: Any, image_size: int, channels: int = 3, *, batch: int = 1) -> float:
    """FLOPs of `batch` images through the eval-mode forward (backbone, head and classifier)."""
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return variables["params"], state["intermediates"]

    params, intermediates = jax.eval_shape(run, images)
    kernels = _kernels(flax.traverse_util.flatten_dict(dict(params)))
    outputs = flax.traverse_util.flatten_dict(dict(intermediates))
    total = 0.0
    for path, kernel in kernels.items():
        out = outputs.get(path + ("__call__",))
        if out is None:
            raise ValueError(f"no captured output for layer {'/'.join(path)}")
        out = out[0] if isinstance(out, tuple) else out
        total += 2.0 * math.prod(out.shape[:-1]) * math.prod(kernel.shape)
    return total


def _kernels(flat: Mapping[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """Module path -> kernel shape, for every module with a 'kernel' parameter."""
    return {path[:-1]: leaf for path, leaf in flat.items() if path[-1] == "kernel"}
