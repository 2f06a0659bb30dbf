"""Config checks that run before any data is read or anything compiles.

A bad value must fail in a second with a message naming the field and what is allowed, not minutes later
inside XLA. Each stage calls the checks for the config blocks it has; the model's own checks live with
the model (models.build.validate_model_fields) and are reused here.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from simclr_jax import memory, optim, parallel
from simclr_jax.checks import is_int, is_number, require
from simclr_jax.data import augment as augment_ops
from simclr_jax.data import sources, splits
from simclr_jax.models.build import validate_model_fields
from simclr_jax.train import evaluators

DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
BAD_IMAGE_POLICIES = ("skip", "error")


def positive(field: str, value: Any) -> None:
    require(is_number(value) and value > 0, field, "positive", value)


def non_negative(field: str, value: Any) -> None:
    require(is_number(value) and value >= 0, field, ">= 0", value)


def one_of(field: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, field, f"one of {list(choices)}", value)


def check_dataset(dataset: ml_collections.ConfigDict) -> None:
    one_of("dataset.source", dataset.source, sources.SOURCES)
    require(
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


def check_crop(augment: ml_collections.ConfigDict) -> None:
    crop = augment.crop_min_area
    require(is_number(crop) and 0 < crop <= 1, "augment.crop_min_area", "in (0, 1]", crop)


def check_augment(augment: ml_collections.ConfigDict) -> None:
    non_negative("augment.color_jitter_strength", augment.color_jitter_strength)
    check_crop(augment)
    one_of("augment.brightness", augment.brightness, augment_ops.BRIGHTNESS_MODES)


def check_optim(optim_config: ml_collections.ConfigDict) -> None:
    one_of("optim.name", optim_config.name, optim.OPTIMIZERS)
    one_of("optim.lr_scaling", optim_config.lr_scaling, optim.LR_SCALINGS)
    positive("optim.base_lr", optim_config.base_lr)
    non_negative("optim.weight_decay", optim_config.weight_decay)
    momentum = optim_config.momentum
    require(is_number(momentum) and 0 <= momentum < 1, "optim.momentum", "in [0, 1)", momentum)
    positive("optim.trust_coefficient", optim_config.trust_coefficient)
    non_negative("optim.warmup_epochs", optim_config.warmup_epochs)


def check_model(model: ml_collections.ConfigDict, image_size: int) -> None:
    fields = model.to_dict()
    require(
        isinstance(fields.pop("global_bn"), bool),
        "model.global_bn",
        "True or False",
        model.global_bn,
    )
    freeze_head = fields.pop("freeze_head_in_linear_eval", False)
    require(
        isinstance(freeze_head, bool),
        "model.freeze_head_in_linear_eval",
        "True or False",
        freeze_head,
    )
    if fields.get("cifar_stem") is None:
        fields["cifar_stem"] = image_size <= 32
    validate_model_fields(fields, image_size=image_size)


def check_schedule(config: ml_collections.ConfigDict) -> None:
    """Length, batch and bookkeeping fields shared by every stage."""
    positive("batch_size", config.batch_size)
    positive("eval_batch_size", config.eval_batch_size)
    chunks = config.accumulation_chunks
    require(is_int(chunks) and chunks >= 1, "accumulation_chunks", "an int >= 1", chunks)
    non_negative("num_steps", config.num_steps)
    if config.num_steps == 0:
        positive("num_epochs (or set num_steps > 0)", config.num_epochs)
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        positive(field, config[field])
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
    non_negative("probe.learning_rate (0 = the encoder's optimizer)", config.probe.learning_rate)
    every = config.probe.clean_every
    require(is_int(every) and every >= 0, "probe.clean_every", "an int >= 0 (0 = the views)", every)
    check_evals(config.evals)
    check_model(config.model, config.dataset.image_size)
    if config.memory.enabled:
        memory.check_config(config.memory, global_batch=config.batch_size)


def validate_finetune(config: ml_collections.ConfigDict) -> None:
    """A fine-tuning config's checks (its model is checked once resolved from the checkpoint)."""
    check_schedule(config)
    check_dataset(config.dataset)
    check_crop(config.augment)
    check_optim(config.optim)
    fraction = config.label_fraction
    require(
        is_number(fraction) and 0 < fraction <= 1,
        "label_fraction",
        "in (0, 1] (e.g. 0.01 for 1%)",
        fraction,
    )
    check_evals(config.evals)


def check_evals(evals: ml_collections.ConfigDict) -> None:
    """config.evals: known kinds, integer cadences, the kNN monitor's fields."""
    for name, fields in evals.items():
        one_of(f"evals.{name} (an evaluator)", name, evaluators.KINDS)
        every = fields.every_steps
        require(is_int(every), f"evals.{name}.every_steps", "an integer (0 = at the end)", every)
    if "knn" in evals:
        non_negative("evals.knn.k (0 = no kNN monitor)", evals.knn.k)
        positive("evals.knn.temperature", evals.knn.temperature)
        non_negative("evals.knn.bank_size (0 = the whole labelled split)", evals.knn.bank_size)


def validate_distill(config: ml_collections.ConfigDict) -> None:
    """A distillation config's checks: fine-tuning's, the teacher and the loss mixture."""
    validate_finetune(config)
    require(
        bool(config.teacher_checkpoint),
        "teacher_checkpoint",
        "a fine-tuning workdir (the teacher)",
        config.teacher_checkpoint,
    )
    positive("temperature", config.temperature)
    alpha = config.alpha
    require(
        is_number(alpha) and 0 <= alpha <= 1, "alpha", "in [0, 1] (labelled loss weight)", alpha
    )
    if config.alpha > 0:
        positive("labeled_batch_size (alpha > 0)", config.labeled_batch_size)
