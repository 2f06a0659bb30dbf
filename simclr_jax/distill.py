"""Distillation (SimCLRv2's third step): a fine-tuned teacher labels unlabelled images for a student.

    python -m simclr_jax.distill --config=simclr_jax/configs/distill_fashion_mnist.py:demo \
        --workdir=/tmp/ds --config.teacher_checkpoint=/tmp/ft \
        [--config.init_checkpoint=/tmp/fm --config.alpha=0.5]

The objective, per step (one crop+flip view of each image, the same view for teacher and student):

    loss = (1 - alpha) * D + alpha * CE
    D  = mean over the unlabelled batch of  -sum_y P_T(y|x; tau) log P_S(y|x; tau)
         (losses.distillation_loss; softmaxes at temperature tau, no tau**2 factor)
    CE = mean over a labelled batch (labeled_batch_size images of the label_fraction subset of
         train_split) of -log P_S(y|x)   (only built when alpha > 0)

The SimCLRv2 paper writes the same mixture with alpha on the distillation term: ours = 1 - paper's.
The unlabelled split's labels are dropped when it is loaded, so they can never reach the step; the
labelled subset's labels reach it only when alpha > 0 (the kNN monitor also uses that subset).

The teacher is any fine-tuning (or distillation) workdir: its saved config rebuilds it and it runs
frozen, BatchNorm in inference mode. The student is free: by default the teacher's architecture
(self-distillation); set --config.student.model.* for a smaller one, and --config.init_checkpoint to
start it from a pretraining run (then that run's architecture is the default).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import cli, encoder, finetune, losses, parallel, validation
from simclr_jax.data import augment, sources
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.models import build_model
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train import checkpoint, evaluate, loop, metrics
from simclr_jax.train.state import TrainState

LABELED_STREAM = 1  # augmentation key stream of the labelled batch (0 = the unlabelled batch)


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject bad values before anything is loaded or compiled."""
    finetune.check_common(config)
    if not config.teacher_checkpoint:
        raise ValueError("teacher_checkpoint must name a fine-tuning workdir (the teacher)")
    if not config.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {config.temperature}")
    if not 0.0 <= config.alpha <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (weight of the labelled loss), got {config.alpha}"
        )
    if config.alpha > 0 and config.labeled_batch_size <= 0:
        raise ValueError(
            f"labeled_batch_size must be positive when alpha > 0, got {config.labeled_batch_size}"
        )


def distill_objective(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    alpha: float = 0.0,
    labeled_logits: jax.Array | None = None,
    labels: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics): (1 - alpha) * distillation + alpha * labelled cross-entropy (see above)."""
    distill = losses.distillation_loss(student_logits, teacher_logits, temperature=temperature)
    agreement = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
    aux = {"distill_loss": distill, "teacher_agreement": jnp.mean(agreement)}
    loss = distill
    if labeled_logits is not None:
        labeled = losses.softmax_cross_entropy(labeled_logits, labels)
        loss = (1.0 - alpha) * distill + alpha * labeled
        aux["labeled_loss"] = labeled
    aux["loss"] = loss
    return loss, aux


def make_train_step(student, teacher, config: ml_collections.ConfigDict, *, with_labels: bool):
    """Per-replica step(state, teacher_variables, batch).

    batch: {'image'} unlabelled uint8 images, plus {'labeled_image', 'label'} when with_labels.
    """

    def step(state: TrainState, teacher_variables: Any, batch: dict[str, jax.Array]):
        images = finetune.train_view(config, batch["image"], state.step)
        # The teacher labels exactly the view the student sees, frozen and in inference mode.
        teacher_logits = jax.lax.stop_gradient(
            teacher.apply(teacher_variables, images, train=False)["logits"]
        )
        num_unlabeled = images.shape[0]
        if with_labels:
            labeled = finetune.train_view(
                config, batch["labeled_image"], state.step, stream=LABELED_STREAM
            )
            images = jnp.concatenate([images, labeled])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, updates = student.apply(variables, images, train=True, mutable=["batch_stats"])
            logits = out["logits"]
            loss, aux = distill_objective(
                logits[:num_unlabeled],
                teacher_logits,
                temperature=config.temperature,
                alpha=config.alpha,
                labeled_logits=logits[num_unlabeled:] if with_labels else None,
                labels=batch["label"] if with_labels else None,
            )
            return loss, (aux, updates["batch_stats"])

        grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads, aux, batch_stats = jax.lax.pmean((grads, aux, batch_stats), DATA_AXIS)
        frozen = finetune.frozen_tree(
            state.batch_stats,
            fine_tune_after_block=config.student.model.fine_tune_after_block,
            ft_proj_selector=config.student.model.ft_proj_selector,
        )
        batch_stats = finetune.keep_frozen_stats(frozen, state.batch_stats, batch_stats)
        return state.apply_gradients(grads, batch_stats), aux

    return step


def unlabeled_view(arrays: ImageArrays) -> ImageArrays:
    """The split without its labels: what the teacher labels and the student learns from."""
    return ImageArrays(arrays.images, None, arrays.num_classes)


def make_batches(config, mesh, train: ImageArrays, labeled: ImageArrays | None):
    """step -> {'image'} (+ {'labeled_image', 'label'} from the labelled subset when given)."""
    unlabeled = data_pipeline.DeviceResidentData(
        unlabeled_view(train), global_batch=config.batch_size, seed=config.seed, mesh=mesh
    )
    labeled_data = None
    if labeled is not None:
        labeled_data = data_pipeline.DeviceResidentData(
            labeled, global_batch=config.labeled_batch_size, seed=config.seed + 1, mesh=mesh
        )

    def batch_for_step(step: int) -> dict[str, jax.Array]:
        batch = {"image": unlabeled.batch(step)["image"]}
        if labeled_data is not None:
            extra = labeled_data.batch(step)
            batch.update(labeled_image=extra["image"], label=extra["label"])
        return batch

    return unlabeled.steps_per_epoch, batch_for_step


def make_teacher_evaluate(dp, teacher, teacher_variables, config, eval_arrays: ImageArrays):
    """() -> {'teacher_top1', 'teacher_top5'} on the eval split, computed once and remembered."""

    def predict(variables: Any, images: jax.Array) -> jax.Array:
        x = augment.eval_preprocess(images, out_size=config.dataset.image_size)
        return teacher.apply(variables, x, train=False)["logits"]

    mapped = dp.map(predict, sharded_args=(False, True), sharded_outputs=True)

    @functools.cache
    def run() -> tuple[tuple[str, float], ...]:
        batches = data_pipeline.eval_batches(
            eval_arrays, global_batch=config.eval_batch_size, mesh=dp.mesh
        )
        result = evaluate.exact_evaluate(lambda images: mapped(teacher_variables, images), batches)
        return (("teacher_top1", result["top1"]), ("teacher_top5", result["top5"]))

    return lambda: dict(run())


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Distil the teacher into the student, resuming from `workdir`; returns the final metrics.

    Results: the last training metrics ('loss', 'distill_loss', 'teacher_agreement',
    'labeled_loss' when alpha > 0), the student's 'eval_top1'/'eval_top5'/'eval_loss'/'eval_count',
    'teacher_top1'/'teacher_top5', 'knn_top1' (student features, when on) and 'step'.
    """
    validate(config)
    teacher_run = encoder.read_run(config.teacher_checkpoint, field="config.teacher_checkpoint")
    init_run = None
    if config.init_checkpoint:
        init_run = encoder.read_run(config.init_checkpoint, field="config.init_checkpoint")
    config = finetune.resolve_model(config, "student.model", init_run or teacher_run)
    validation.check_model(config.student.model, config.dataset.image_size)
    mesh = parallel.make_mesh()
    dp = parallel.DataParallel(mesh, config.parallel.backend)
    for name in ("batch_size", "eval_batch_size") + (("labeled_batch_size",) * (config.alpha > 0)):
        parallel.check_divisible(name, config[name], mesh)

    dtype = finetune.DTYPES[config.dtype]
    teacher = encoder.build_from_run(teacher_run, dtype=dtype)
    teacher_variables = encoder.restore_variables(teacher_run, teacher)
    if teacher_run.image_size != config.dataset.image_size:
        logging.warning(
            "the teacher was trained at %d px; it sees this run's %d px views",
            teacher_run.image_size, config.dataset.image_size,
        )  # fmt: skip
    num_classes = teacher_run.num_classes

    # Data: the unlabelled pool loses its labels here; the labelled subset is a separate copy.
    train = sources.load_split(config.dataset, config.dataset.train_split)
    labeled = None
    if train.labels is not None and (config.alpha > 0 or config.knn.k > 0):
        labeled = finetune.labeled_subset(train, config.label_fraction, config.label_seed)
    elif config.alpha > 0:
        raise ValueError("alpha > 0 needs a labelled dataset.train_split")
    if labeled is not None and labeled.num_classes != num_classes:
        raise ValueError(
            f"the teacher predicts {num_classes} classes but {config.dataset.name!r} has "
            f"{labeled.num_classes}"
        )
    steps_per_epoch, batch_for_step = make_batches(
        config, mesh, train, labeled if config.alpha > 0 else None
    )
    _, total_steps, schedule, peak_lr = finetune.schedule_for(config, len(train))

    student = build_model(
        config.student.model,
        num_classes=num_classes,
        image_size=config.dataset.image_size,
        axis_name=DATA_AXIS,
        dtype=dtype,
    )
    ckpt = checkpoint.CheckpointManager(
        workdir,
        keep=config.keep_checkpoints,
        save_every=config.checkpoint_every_steps,
        config=config,
    )
    resuming = ckpt.latest_step() is not None
    variables = finetune.initial_variables(
        student,
        config.seed,
        config.dataset.image_size,
        train.images.shape[-1],
        None if resuming else init_run,
    )
    state = finetune.create_state(config.student.model, config.optim, variables, schedule)
    if resuming:
        state = ckpt.restore(state)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    state = dp.replicate(state)
    teacher_variables = dp.replicate(teacher_variables)
    metrics.write_config(workdir, config)

    mapped_step = dp.map(
        _guarded(
            make_train_step(student, teacher, config, with_labels=config.alpha > 0),
            skip=config.nonfinite == "skip",
        ),
        sharded_args=(False, False, True),
        sharded_outputs=(False, False),
        donate_argnums=(0,),
    )

    evaluate_fn = None
    if config.dataset.eval_split:
        eval_arrays = sources.load_split(config.dataset, config.dataset.eval_split)
        data = finetune.LabeledData(
            num_examples=len(train),
            num_classes=num_classes,
            channels=train.images.shape[-1],
            batch_for_step=batch_for_step,
            eval_batches=functools.partial(
                data_pipeline.eval_batches,
                eval_arrays,
                global_batch=config.eval_batch_size,
                mesh=mesh,
            ),
            precropped=False,
            train_arrays=labeled,
            eval_arrays=eval_arrays,
        )
        student_evaluate = finetune.make_evaluate(dp, student, config, data)
        teacher_evaluate = make_teacher_evaluate(
            dp, teacher, teacher_variables, config, eval_arrays
        )
        evaluate_fn = lambda state: {**student_evaluate(state), **teacher_evaluate()}  # noqa: E731

    logging.info(
        "Distilling %d steps (%d per epoch) over %d unlabelled images, batch %d on %d devices, "
        "peak lr %.4g, alpha %g, temperature %g",
        total_steps, steps_per_epoch, len(train), config.batch_size, dp.num_replicas, peak_lr,
        config.alpha, config.temperature,
    )  # fmt: skip
    return finetune.run_loop(
        dp=dp,
        config=config,
        workdir=workdir,
        ckpt=ckpt,
        state=state,
        train_step=lambda state, batch: mapped_step(state, teacher_variables, batch),
        batch_for_step=batch_for_step,
        evaluate_fn=evaluate_fn,
        total_steps=total_steps,
        schedule=schedule,
        stop_at_step=stop_at_step,
    )


def _guarded(step_fn, *, skip: bool):
    """loop.guard_nonfinite for a step that also takes the (replicated) teacher variables."""

    def guarded(state, teacher_variables, batch):
        inner = lambda s, b: step_fn(s, teacher_variables, b)  # noqa: E731
        return loop.guard_nonfinite(inner, skip=skip)(state, batch)

    return guarded


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Distillation")
