r"""Fine-tuning, linear evaluation and the supervised baseline, from a pretraining workdir or scratch.

    python -m simclr_jax.finetune --config=configs/finetune_fashion_mnist.py:1pct \
        --workdir=/tmp/ft --config.init_checkpoint=/tmp/fm [--config.label_fraction=0.05 ...]

--config.init_checkpoint is required: a pretraining workdir, or `none` for random weights (the
supervised recipes set it). The pretraining workdir is enough: its saved config gives the
architecture (explicit --config.model.* values win) and only its weights are read (params and BN
statistics; not the step or the optimizer). The classifier is new, sized to this dataset's classes.
Which layer feeds it (model.ft_proj_selector), which stages are frozen
(model.fine_tune_after_block: 4 = linear evaluation) and how many labels are used (label_fraction)
are this run's choices. With init_classifier_by_linear_fit the classifier starts at the logistic
regression of its input features on the labelled examples (LP-FT: train/classifier_init.py).
Rerunning the same command resumes from the newest checkpoint in --workdir.

Transfer: the checkpoint may come from another dataset (configs/transfer_digits.py):
images are resized to dataset.image_size on the device, their channels converted to the
checkpoint's (data/stage_data.match_channels), and an auto CIFAR stem stays the checkpoint's.

Frozen means frozen (models.frozen_tree): frozen parameters get exactly zero updates, frozen
stages run BatchNorm in inference mode and keep their statistics bit for bit; head layers above
the selector feed nothing and are frozen too. Linear evaluation (fine_tune_after_block=4) from a
head layer trains the head layers up to the selector with the classifier, their BN in training
mode, as the reference (it stops the gradient only at the ResNet output); with
model.freeze_head_in_linear_eval it runs the whole network in inference mode and trains only the
classifier, on fixed features of the chosen layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import cli, losses, optim, parallel, saved_run, validation
from simclr_jax.data import stage_data, views
from simclr_jax.models import LINEAR_EVAL_BLOCK, SimCLRModel, build_for_run
from simclr_jax.train import classifier_init, evaluators, runner
from simclr_jax.train.state import TrainState
from simclr_jax.train.update import accumulated_update, fine_tune_state


def make_train_step(model: SimCLRModel, config: ml_collections.ConfigDict, *, precropped=False):
    """Per-replica step: one crop+flip view, cross-entropy, grads averaged over replicas (and
    over config.accumulation_chunks chunks of the batch)."""
    # A linear probe on fixed features (freeze_head_in_linear_eval): the whole network in
    # inference mode. Otherwise frozen stages still run BN in inference mode (the model), and the
    # trainable head layers in training mode, as the reference.
    fixed_features = (
        config.model.fine_tune_after_block == LINEAR_EVAL_BLOCK
        and config.model.freeze_head_in_linear_eval
    )

    def step(state: TrainState, batch: dict[str, jax.Array]):
        images = views.finetune_view(config, state.step, batch["image"], precropped=precropped)

        def loss_fn(params, data):
            images, labels = data
            variables = {"params": params, "batch_stats": state.batch_stats}
            if fixed_features:
                out, batch_stats = model.apply(variables, images, train=False), state.batch_stats
            else:
                out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
                batch_stats = updates["batch_stats"]
            loss = losses.softmax_cross_entropy(out["logits"], labels)
            top1 = jnp.mean(jnp.argmax(out["logits"], -1) == labels)
            return loss, ({"loss": loss, "train_top1": top1}, batch_stats)

        data = (images, batch["label"])
        return accumulated_update(state, loss_fn, data, config.accumulation_chunks, config.model)

    return step


def make_stage(
    config: ml_collections.ConfigDict,
    dp: parallel.DataParallel,
    data: stage_data.StageData,
    run: saved_run.SavedRun | None,
) -> runner.Stage:
    """The run's pieces from its data's facts and the checkpoint it starts from (`run`; config's
    model already resolved against it): what train_and_evaluate hands the runner (evaluators
    aside) and what the planner (simclr_jax.plan) compiles for other hardware."""
    if config.init_classifier_by_linear_fit:
        validation.require(
            run is not None and data.train_arrays is not None,
            "init_classifier_by_linear_fit",
            "False without init_checkpoint or for a streamed dataset (the fit needs pretrained "
            "features of labelled examples in memory)",
            True,
        )
    schedule = optim.train_schedule(config, data.num_examples)
    size = config.dataset.image_size
    model = build_for_run(config, config.model, data.num_classes)

    def initial_state(resuming: bool) -> TrainState:
        # Resuming restores every variable, so the checkpoint to start from is not read.
        start = None if resuming else run
        variables = saved_run.initial_variables(model, config.seed, size, data.channels, start)
        if start is not None and config.init_classifier_by_linear_fit:
            classifier = classifier_init.linear_fit_classifier(
                model, variables, data.train_arrays, image_size=size, seed=config.seed
            )
            variables["params"] = {**variables["params"], "classifier": classifier}
        return fine_tune_state(config.model, config.optim, variables, schedule.learning_rate())

    return runner.Stage(
        f"Fine-tuning on {data.num_examples} labelled examples from "
        f"{config.init_checkpoint if run else 'random weights'}",
        initial_state,
        make_train_step(model, config, precropped=data.precropped),
        data.batch_for_step,
        schedule,
        results={"num_labeled": data.num_examples},
        model=model,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, **run_options: Any
) -> dict[str, Any]:
    """Fine-tune (or train from scratch), resuming from `workdir`; returns the final metrics
    (run_options: runner.run's).

    Results: the last training metrics ('loss', 'train_top1'), 'eval_top1', 'eval_top5',
    'eval_loss', 'eval_count' (the whole eval split), 'knn_top1' (when on), 'num_labeled', 'step'.
    """
    validation.validate_finetune(config)
    run = saved_run.read_start(
        config.init_checkpoint, field="config.init_checkpoint", required=True
    )
    config = saved_run.resolve_model(config, "model", run)
    validation.check_model(config.model, config.dataset.image_size)
    dp = parallel.from_config(config)
    data = stage_data.labeled_data(config, dp.mesh, channels=None if run is None else run.channels)
    stage = make_stage(config, dp, data, run)
    found = evaluators.from_config(config, dp, stage.model, data)
    return runner.run(config, workdir, dp, stage.with_evaluators(found), **run_options)


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Fine-tuning")
