"""A workdir's network as exporters see it: the architecture, float32 weights and the JAX truth.

Any stage's workdir works (for a distillation run, its student), converted official models
included: the network comes from the config saved with the newest checkpoint (saved_run.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from simclr_jax import saved_run
from simclr_jax.models import convnet
from simclr_jax.models.heads import num_head_layers, selected_layer
from simclr_jax.models.resnet import total_stride
from simclr_jax.models.simclr import SimCLRModel

PARITY_TOLERANCE = 1e-4  # max |export - JAX| / max |JAX| that an export must meet


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What an exporter needs from a workdir."""

    workdir: str
    step: int
    stage: str
    architecture: dict[str, Any]  # architecture.forward's fields
    weights: dict[str, np.ndarray]  # 'params/backbone/stem/conv1/kernel' -> float32 array
    image_size: int  # the export's input side
    channels: int
    model: SimCLRModel
    variables: Any

    def reference(self, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The JAX model's `outputs` on float NHWC images in [0, 1] (inference mode)."""
        found = _apply(self.model, self.variables, jnp.asarray(images, jnp.float32))
        return {name: np.asarray(found[name]) for name in outputs}

    def metadata(self, output: str, batch: str) -> dict[str, str]:
        """What a user of the exported file must know to feed it and read it."""
        return {
            "producer": "simclr_jax.export",
            "source_workdir": self.workdir,
            "source_step": str(self.step),
            "source_stage": self.stage,
            "output": output,
            "input_range": "[0, 1] float32, no mean/std normalisation",
            "input_size": str(self.image_size),
            "input_channels": str(self.channels),
            "batch": batch,
            "preprocessing": (
                "at most 32 px: resize the whole image; larger: centre crop of 0.875 of the "
                "shorter side, then bicubic resize without antialiasing (simclr_jax.embed)"
            ),
        }


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: SimCLRModel, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    return model.apply(variables, images, train=False)


def architecture_of(model: SimCLRModel) -> dict[str, Any]:
    """architecture.forward's fields for a built SimCLRModel."""
    layers = num_head_layers(model.proj_head_mode, model.num_proj_layers)
    return {
        "backbone": model.backbone,
        "depth": int(model.depth),
        "width_multiplier": int(model.width_multiplier),
        "base_width": int(model.base_width),
        "cifar_stem": bool(model.cifar_stem),
        "resnet_d": model.sk_ratio > 0,
        "sk": model.sk_ratio > 0,
        "se": model.se_ratio > 0,
        "head_layers": layers,
        "selected": selected_layer(model.ft_proj_selector, layers),
        "classifier_input_norm": bool(model.classifier_input_norm),
        "bn_epsilon": float(model.bn_epsilon),
        "num_classes": int(model.num_classes),
    }


def read_source(workdir: str, image_size: int | None = None) -> ExportSource:
    """The newest checkpoint of `workdir` for export; `image_size` defaults to the run's."""
    run = saved_run.read_run(workdir)
    model = saved_run.build_from_run(run)
    size = run.image_size if image_size is None else image_size
    minimum = total_stride(model.cifar_stem) if model.backbone == "resnet" else convnet.TOTAL_STRIDE
    if isinstance(size, bool) or not isinstance(size, int) or size < minimum:
        raise ValueError(
            f"--image_size must be an integer >= {minimum} for this network, got {size}"
        )
    variables = saved_run.restore_variables(run, model)
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    weights = {path: np.asarray(value, np.float32) for path, value in flat.items()}
    return ExportSource(
        workdir=run.workdir,
        step=run.step,
        stage=run.stage,
        architecture=architecture_of(model),
        weights=weights,
        image_size=size,
        channels=run.channels,
        model=model,
        variables=variables,
    )


def test_images(source: ExportSource, count: int = 2, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1] float32 NHWC images at the export's size, for the parity check."""
    shape = (count, source.image_size, source.image_size, source.channels)
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def relative_difference(found: np.ndarray, expected: np.ndarray) -> float:
    """max |found - expected| / max |expected| (the parity measure)."""
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(np.asarray(found, np.float64) - expected))) / scale


def check_parity(
    run_export: Callable[[np.ndarray], np.ndarray],
    source: ExportSource,
    output: str,
    images: np.ndarray,
    what: str,
) -> float:
    """The relative difference of an export against JAX; an error beyond PARITY_TOLERANCE."""
    expected = source.reference(images, [output])[output]
    difference = relative_difference(run_export(images), expected)
    if not difference <= PARITY_TOLERANCE:
        raise RuntimeError(
            f"the {what} export's {output!r} differs from the JAX model by {difference:.3g} "
            f"(relative, max over {len(images)} images; allowed {PARITY_TOLERANCE:g})"
        )
    return difference


def parameter_count(weights: Mapping[str, np.ndarray]) -> int:
    """Number of parameters (batch statistics excluded)."""
    return sum(v.size for k, v in weights.items() if k.startswith("params/"))
