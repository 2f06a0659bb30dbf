"""A step's FLOPs per image counted by hand, to hold XLA's count against.

Forward FLOPs of one image come from the network's shapes (models/flops.py). A training image
costs its forward and a backward of about twice that (the gradients with respect to activations
and to weights), so 3x; inference-only passes cost 1x. Per image of the global batch:
- pretraining: 2 views x 3 forward (with accumulation_chunks > 1, one more forward of both
  views: GradCache's first pass, simclr_jax/accumulation.py); the probe's clean pass on every
  clean_every-th image (1x); the memory's EMA network on one view (1x); NT-Xent's similarity
  matrix, [2B, 2B + M] x d per forward, and its backward;
- fine-tuning: 3 forward (a frozen backbone still runs its forward; its backward is skipped, so
  this overcounts linear evaluation); chunks, if any, are plain accumulation: no extra pass;
- distillation: the teacher's forward (1x) and the student's 3x, plus the labelled batch's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.models import flops as model_flops

TRAIN_FACTOR = 3.0  # forward + backward (activations and weights)


def flops_per_image(
    stage: str,
    config: ml_collections.ConfigDict,
    model: Any,
    *,
    channels: int,
    teacher: Any = None,
) -> float:
    """The analytic FLOPs per image of the global batch for `stage` (module docstring)."""
    size = config.dataset.image_size
    forward = model_flops.forward_flops(model, size, channels)
    if stage == "pretrain":
        total = 2 * TRAIN_FACTOR * forward
        if config.accumulation_chunks > 1:
            total += 2 * forward  # pass 1: the projections without activations kept
        if config.probe.clean_every > 0:
            total += forward / config.probe.clean_every
        negatives = 2 * config.batch_size
        if config.memory.enabled:
            total += forward
            negatives += config.memory.size
        # 2B rows of z against `negatives` columns, 2 FLOPs a product, per image: 2 rows.
        total += TRAIN_FACTOR * 2 * 2 * negatives * _projection_dim(model, size, channels)
        return float(total)
    if stage == "finetune":
        return float(TRAIN_FACTOR * forward)
    teacher_forward = model_flops.forward_flops(teacher or model, size, channels)
    total = teacher_forward + TRAIN_FACTOR * forward
    if config.alpha > 0:
        total += TRAIN_FACTOR * forward * config.labeled_batch_size / config.batch_size
    return float(total)


def _projection_dim(model: Any, image_size: int, channels: int) -> int:
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        return model.apply(variables, x, train=False)["projection"]

    return int(jax.eval_shape(run, images).shape[-1])
