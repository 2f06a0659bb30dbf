r"""Contrastive pretraining (SimCLR v1/v2) with an online linear probe.

    python -m simclr_jax.pretrain --config=configs/pretrain_fashion_mnist.py \
        --workdir=/tmp/fm [--config.batch_size=512 ...]

Reads in the order the work happens: validate, mesh, data, schedule, model, state, step,
evaluators; train/runner.py runs it. Rerunning the same command resumes from the workdir.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import accumulation, cli, losses, memory, optim, parallel, validation
from simclr_jax.data import stage_data, views
from simclr_jax.models import SimCLRModel, build_for_run, init_variables
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train import evaluators, runner
from simclr_jax.train.state import TrainState


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> SimCLRModel:
    """Encoder, projection head, and the online probe on stop-gradient features."""
    return build_for_run(
        config, config.model, num_classes,
        classifier_stop_gradient=True, classifier_input_norm=config.probe.input_norm,
    )  # fmt: skip


def init_state(model, config, channels, schedule, *, probe_schedule=None, sharding=None):
    """The state from the seed, placed by `sharding` (mesh-replicated: one program for every
    process, which the compilation cache shares). probe_schedule: the online probe's own
    optimizer (optim.with_separate_probe); None trains it with the encoder's, as the reference.
    With config.memory.enabled, SimCLRv2's memory (an EMA copy and an empty queue) is attached."""
    size = config.dataset.image_size
    variables = init_variables(
        model, seed=config.seed, image_size=size, channels=channels, sharding=sharding
    )
    tx = optim.make_optimizer(config.optim, variables["params"], learning_rate=schedule)
    if probe_schedule is not None:
        tx = optim.with_separate_probe(tx, variables["params"], learning_rate=probe_schedule)
    state = TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )
    if not config.memory.enabled:
        return state
    return memory.attach_empty(
        state, model, config.memory, image_size=size, channels=channels,
        global_batch=config.batch_size,
    )  # fmt: skip


def make_view_gradient_fn(model: SimCLRModel, config: ml_collections.ConfigDict):
    """Per-replica (grads, metrics, BN stats) from two views: NT-Xent over every replica's
    negatives (plus the memory queue's valid rows, as before this step) and the probe's loss.

    The probe trains on `probe_batch` (images, labels) when given: un-augmented images through
    the network in inference mode, the features a linear evaluation sees (its classifier input is
    stop-gradient, so only the probe learns from them); without it, on the two views (the
    reference)."""
    use_memory = config.memory.enabled

    def gradients(
        state: TrainState,
        view_a: jax.Array,
        view_b: jax.Array,
        labels: jax.Array,
        probe_batch: tuple[jax.Array, jax.Array] | None = None,
    ):
        images, labels = jnp.concatenate([view_a, view_b]), jnp.concatenate([labels, labels])
        queue = {}
        if use_memory:
            queue = dict(memory=state.memory.queue, memory_mask=state.memory.valid_mask())

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            z_a, z_b = jnp.split(out["projection"], 2)
            contrastive, aux = losses.nt_xent(
                z_a, z_b, temperature=config.loss.temperature, axis_name=DATA_AXIS, **queue
            )
            logits, probe_labels = out["logits"], labels
            if probe_batch is not None:  # the probe sees the images as evaluation does
                probe_images, probe_labels = probe_batch
                logits = model.apply(variables, probe_images, train=False)["logits"]
            # Unlabelled images (label -1, a prepared flat folder) teach the probe nothing.
            labelled = probe_labels >= 0
            probe = losses.softmax_cross_entropy(logits, probe_labels, mask=labelled)
            aux = dict(aux, contrastive_loss=contrastive, probe_loss=probe)
            correct = (jnp.argmax(logits, -1) == probe_labels) & labelled
            aux["probe_acc"] = jnp.sum(correct) / jnp.maximum(jnp.sum(labelled), 1)
            return contrastive + probe, (aux, updates["batch_stats"])

        grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        # Moving averages are averaged too: identical under global BN, in sync under local BN.
        grads, aux, batch_stats = parallel.replica_mean((grads, aux, batch_stats))
        aux["loss"] = aux["contrastive_loss"] + aux["probe_loss"]
        return grads, aux, batch_stats

    return gradients


def make_train_step(model: SimCLRModel, config: ml_collections.ConfigDict):
    """Per-replica step: views, gradients, the optimizer update (LARS by default); with the
    memory, then its update (simclr_jax.memory: view b's keys from the EMA network enter).
    With config.accumulation_chunks > 1, the same in chunks (simclr_jax.accumulation)."""
    if config.accumulation_chunks > 1:
        return accumulation.make_train_step(model, config)
    view_gradients = make_view_gradient_fn(model, config)
    use_memory, decay = config.memory.enabled, config.memory.ema_decay
    clean_every = config.probe.clean_every

    def step(state: TrainState, batch: dict[str, jax.Array]):
        view_a, view_b = views.contrastive_views(config, state.step, batch["image"])
        probe_batch = None
        if clean_every > 0:
            probe_batch = views.probe_inputs(config, batch["image"], batch["label"])
        grads, aux, batch_stats = view_gradients(state, view_a, view_b, batch["label"], probe_batch)
        new_state = state.apply_gradients(grads, batch_stats)
        if use_memory:
            new_memory = memory.update(
                model, state.memory, view_b, new_state.params, decay=decay, axis_name=DATA_AXIS
            )
            new_state = new_state.replace(memory=new_memory)
        return new_state, aux

    return step


def make_stage(
    config: ml_collections.ConfigDict, dp: parallel.DataParallel, data: stage_data.StageData
) -> runner.Stage:
    """The run's pieces, built from its data's facts: what train_and_evaluate hands the runner
    (evaluators aside) and what the planner (simclr_jax.plan) compiles for other hardware."""
    if data.precropped and config.probe.clean_every > 0:
        raise ValueError(
            f"probe.clean_every={config.probe.clean_every} needs whole images, but "
            f"{config.dataset.name!r} streams host-cropped views: set "
            "--config.probe.clean_every=0 (the probe trains on the views, as the reference)"
        )
    schedule = optim.train_schedule(config, data.num_examples)
    # Unlabelled data still gets a (one-class) probe, so every pretraining state has one shape.
    model = make_model(config, max(data.num_classes, 1))
    probe_lr = config.probe.learning_rate
    probe_schedule = schedule.learning_rate(probe_lr) if probe_lr > 0 else None

    def initial_state(resuming: bool) -> TrainState:
        return init_state(
            model, config, data.channels, schedule.learning_rate(),
            probe_schedule=probe_schedule, sharding=dp.replicated_sharding,
        )  # fmt: skip

    return runner.Stage(
        "Pretraining", initial_state, make_train_step(model, config), data.batch_for_step,
        schedule, model=model,
    )  # fmt: skip


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, **run_options: Any
) -> dict[str, Any]:
    """Pretrain, resuming from `workdir`; returns the final metrics (see runner.run, which
    takes run_options: stop_at_step, accept_config_changes)."""
    validation.validate_pretrain(config)
    dp = parallel.from_config(config)
    data = stage_data.pretraining_data(config, dp.mesh)
    stage = make_stage(config, dp, data)
    found = evaluators.from_config(config, dp, stage.model, data)
    return runner.run(config, workdir, dp, stage.with_evaluators(found), **run_options)


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Pretraining")
