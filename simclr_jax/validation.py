"""Config checks that run before any data is read or anything compiles.

A bad value must fail in a second with a message naming the field and what is allowed, not minutes later
inside XLA. Each stage calls the checks for the config blocks it has; the model's own checks live with
the model (models.build.validate_model_fields) and are reused here.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from simclr_jax import memory, optim, parallel
from simclr_jax.data import augment as augment_ops
from simclr_jax.data import sources, splits
from simclr_jax.models.build import validate_model_fields

DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
BAD_IMAGE_POLICIES = ("skip", "error")


def _check(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive(field: str, value: Any) -> None:
    _check(_number(value) and value > 0, field, "positive", value)


def non_negative(field: str, value: Any) -> None:
    _check(_number(value) and value >= 0, field, ">= 0", value)


def one_of(field: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, field, f"one of {list(choices)}", value)


def check_dataset(dataset: ml_collections.ConfigDict) -> None:
    one_of("dataset.source", dataset.source, sources.SOURCES)
    _check(
        isinstance(dataset.name, str) and bool(dataset.name), "dataset.name", "a name", dataset.name
    )
    positive("dataset.image_size", dataset.image_size)
    one_of("dataset.channels", str(dataset.channels), ("1", "3"))
    one_of("dataset.bad_images", dataset.bad_images, BAD_IMAGE_POLICIES)
    sources.check_data_dir(dataset)
    for field in ("train_split", "eval_split"):
        split = dataset[field]
        if split:
            try:
                splits.parse_split(split)
            except ValueError as err:
                raise ValueError(f"dataset.{field}: {err}") from None


def check_augment(augment: ml_collections.ConfigDict) -> None:
    non_negative("augment.color_jitter_strength", augment.color_jitter_strength)
    crop = augment.crop_min_area
    _check(_number(crop) and 0 < crop <= 1, "augment.crop_min_area", "in (0, 1]", crop)
    one_of("augment.brightness", augment.brightness, augment_ops.BRIGHTNESS_MODES)


def check_optim(optim_config: ml_collections.ConfigDict) -> None:
    one_of("optim.name", optim_config.name, optim.OPTIMIZERS)
    one_of("optim.lr_scaling", optim_config.lr_scaling, optim.LR_SCALINGS)
    positive("optim.base_lr", optim_config.base_lr)
    non_negative("optim.weight_decay", optim_config.weight_decay)
    momentum = optim_config.momentum
    _check(_number(momentum) and 0 <= momentum < 1, "optim.momentum", "in [0, 1)", momentum)
    positive("optim.trust_coefficient", optim_config.trust_coefficient)
    non_negative("optim.warmup_epochs", optim_config.warmup_epochs)


def check_model(model: ml_collections.ConfigDict, image_size: int) -> None:
    fields = model.to_dict()
    _check(
        isinstance(fields.pop("global_bn"), bool),
        "model.global_bn",
        "True or False",
        model.global_bn,
    )
    if fields.get("cifar_stem") is None:
        fields["cifar_stem"] = image_size <= 32
    validate_model_fields(fields, image_size=image_size)


def check_schedule(config: ml_collections.ConfigDict) -> None:
    """Length, batch and bookkeeping fields shared by every stage."""
    positive("batch_size", config.batch_size)
    positive("eval_batch_size", config.eval_batch_size)
    non_negative("num_steps", config.num_steps)
    if config.num_steps == 0:
        positive("num_epochs (or set num_steps > 0)", config.num_epochs)
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        positive(field, config[field])
    non_negative("eval_every_steps", config.eval_every_steps)
    one_of("dtype", config.dtype, DTYPES)
    one_of("parallel.backend", config.parallel.backend, parallel.BACKENDS)
    one_of("nonfinite", config.nonfinite, NONFINITE_POLICIES)


def validate_pretrain(config: ml_collections.ConfigDict) -> None:
    """Every check a pretraining config needs before the run touches data or devices."""
    check_schedule(config)
    check_dataset(config.dataset)
    check_augment(config.augment)
    check_optim(config.optim)
    positive("loss.temperature", config.loss.temperature)
    check_model(config.model, config.dataset.image_size)
    if config.memory.enabled:
        memory.check_config(config.memory, global_batch=config.batch_size)
