r"""Distillation (SimCLRv2's third step): a fine-tuned teacher labels unlabelled images for a student.

    python -m simclr_jax.distill --config=configs/distill_fashion_mnist.py:demo \
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

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import cli, losses, optim, parallel, saved_run, validation
from simclr_jax.data import stage_data, views
from simclr_jax.models import SimCLRModel, build_for_run
from simclr_jax.train import evaluators, runner
from simclr_jax.train.state import TrainState
from simclr_jax.train.update import accumulated_update, fine_tune_state

LABELED_STREAM = 1  # augmentation key stream of the labelled batch (0 = the unlabelled batch)


def make_train_step(
    student: SimCLRModel, teacher: SimCLRModel, config, *, with_labels: bool, precropped=False
):
    """Per-replica step(state, teacher_variables, batch).

    batch: {'image'} unlabelled uint8 images, plus {'labeled_image', 'label'} when with_labels;
    precropped: the host took the crops (a streamed dataset), the step only flips.
    With config.accumulation_chunks > 1 the student's gradients are averaged over chunks of both
    batches (the teacher labels the whole batch first, in inference mode).
    """

    def step(state: TrainState, teacher_variables: Any, batch: dict[str, jax.Array]):
        images = views.finetune_view(config, state.step, batch["image"], precropped=precropped)
        # The teacher labels exactly the view the student sees, frozen and in inference mode.
        teacher_logits = jax.lax.stop_gradient(
            teacher.apply(teacher_variables, images, train=False)["logits"]
        )
        data = {"image": images, "teacher_logits": teacher_logits}
        if with_labels:
            data["labeled_image"] = views.finetune_view(
                config, state.step, batch["labeled_image"], precropped=precropped,
                stream=LABELED_STREAM,
            )  # fmt: skip
            data["label"] = batch["label"]

        def loss_fn(params, data):
            images, num_unlabeled = data["image"], data["image"].shape[0]
            if with_labels:
                images = jnp.concatenate([images, data["labeled_image"]])
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, updates = student.apply(variables, images, train=True, mutable=["batch_stats"])
            logits = out["logits"]
            loss, aux = losses.distillation_objective(
                logits[:num_unlabeled],
                data["teacher_logits"],
                temperature=config.temperature,
                alpha=config.alpha,
                labeled_logits=logits[num_unlabeled:] if with_labels else None,
                labels=data["label"] if with_labels else None,
            )
            return loss, (aux, updates["batch_stats"])

        chunks, model_config = config.accumulation_chunks, config.student.model
        return accumulated_update(state, loss_fn, data, chunks, model_config)

    return step


def make_stage(
    config: ml_collections.ConfigDict,
    dp: parallel.DataParallel,
    data: stage_data.StageData,
    teacher: SimCLRModel,
    teacher_variables: Any,
    init_run: saved_run.SavedRun | None,
) -> runner.Stage:
    """The run's pieces from its data's facts, the teacher (its replicated variables, arrays or
    their shapes) and the checkpoint the student starts from: what train_and_evaluate hands the
    runner (evaluators aside) and what the planner (simclr_jax.plan) compiles."""
    size = config.dataset.image_size
    schedule = optim.train_schedule(config, data.num_examples)
    student = build_for_run(config, config.student.model, data.num_classes)

    def initial_state(resuming: bool) -> TrainState:
        start = None if resuming else init_run
        variables = saved_run.initial_variables(student, config.seed, size, data.channels, start)
        return fine_tune_state(
            config.student.model, config.optim, variables, schedule.learning_rate()
        )

    return runner.Stage(
        f"Distilling (alpha {config.alpha:g}, temperature {config.temperature:g})",
        initial_state,
        make_train_step(
            student, teacher, config, with_labels=config.alpha > 0, precropped=data.precropped
        ),
        data.batch_for_step,
        schedule,
        replicated=(teacher_variables,),
        model=student,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, **run_options: Any
) -> dict[str, Any]:
    """Distil the teacher into the student, resuming from `workdir`; returns the final metrics
    (run_options: runner.run's).

    Results: the last training metrics ('loss', 'distill_loss', 'teacher_agreement',
    'labeled_loss' when alpha > 0), the student's 'eval_top1'/'eval_top5'/'eval_loss'/'eval_count',
    'teacher_top1'/'teacher_top5', 'knn_top1' (student features, when on) and 'step'.
    """
    validation.validate_distill(config)
    teacher_run = saved_run.read_teacher(
        config.teacher_checkpoint, field="config.teacher_checkpoint"
    )
    init_run = saved_run.read_start(
        config.init_checkpoint, field="config.init_checkpoint", required=False
    )
    config = saved_run.resolve_model(config, "student.model", init_run or teacher_run)
    size = config.dataset.image_size
    validation.check_model(config.student.model, size)
    batches = ("batch_size", "eval_batch_size") + ("labeled_batch_size",) * (config.alpha > 0)
    dp = parallel.from_config(config, batches)
    teacher = saved_run.build_from_run(teacher_run, dtype=config.dtype)
    teacher_variables = dp.replicate(saved_run.restore_variables(teacher_run, teacher))
    if teacher_run.image_size != size:
        logging.warning(
            "the teacher saw %d px images; it labels %d px views", teacher_run.image_size, size
        )
    data = stage_data.distillation_data(
        config, dp.mesh, teacher_run.num_classes, teacher_run.channels
    )
    stage = make_stage(config, dp, data, teacher, teacher_variables, init_run)
    found = evaluators.from_config(
        config, dp, stage.model, data, teacher=evaluators.Teacher(teacher, teacher_variables)
    )
    return runner.run(config, workdir, dp, stage.with_evaluators(found), **run_options)


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Distillation")
