"""A trained network's answer to images, one way for every reader: evaluators, the classifier's
linear-fit start, `load_encoder`, `embed`.

The network runs in inference mode (BatchNorm's moving averages). Images are uint8 in [0, 255] or
floats in [0, 1]; how they become the network's input is `preprocess`:
- 'eval': the reference's evaluation preprocessing: images of more than 32 px are centre-cropped
  (0.875 of the shorter side) and resized to `image_size`, smaller ones (CIFAR, Fashion-MNIST)
  only resized;
- 'precropped': the host already cropped them at `image_size` (streamed datasets): scaled only;
- 'none': already the network's input (float32 at `image_size`, e.g. `embed`'s host crops).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax.data import augment

PREPROCESS = ("eval", "precropped", "none")


def inputs(images: jax.Array, *, image_size: int, preprocess: str = "eval") -> jax.Array:
    """The network's float32 input for `images` (module docstring)."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    if preprocess == "none":
        return images
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = augment.to_float(images)
    else:
        x = images.astype(jnp.float32)
    if preprocess == "precropped":
        return x
    if min(x.shape[1], x.shape[2]) <= 32:
        return augment.resize(x, image_size)
    return augment.center_crop(x, image_size)


def predict_fn(
    model: Any, *, image_size: int, output: str | None = None, preprocess: str = "eval"
) -> Callable[[Mapping[str, Any], jax.Array], Any]:
    """f(variables, images) -> the named `output` ('logits', 'features', 'projection',
    'head_k', ...), or every named output when None. Not jitted: callers jit or map it."""

    def predict(variables: Mapping[str, Any], images: jax.Array) -> Any:
        x = inputs(images, image_size=image_size, preprocess=preprocess)
        outputs = model.apply(variables, x, train=False)
        return outputs if output is None else outputs[output]

    return predict


def model_variables(state: Any) -> Mapping[str, Any]:
    """{'params', 'batch_stats'} of a train state; a variables dict is returned as it is."""
    if isinstance(state, Mapping):
        return state
    return {"params": state.params, "batch_stats": state.batch_stats}
