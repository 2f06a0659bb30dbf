"""Contrastive pretraining (SimCLR v1/v2) with an online linear probe.

    python -m simclr_jax.pretrain --config=simclr_jax/configs/pretrain_fashion_mnist.py \
        --workdir=/tmp/fm [--config.batch_size=512 ...]

Reads in the order the work happens: validate, mesh, data, schedule, model, state, step,
evaluators; train/runner.py runs it. Rerunning the same command resumes from the workdir.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import cli, losses, memory, optim, parallel, validation
from simclr_jax.data import stage_data, views
from simclr_jax.models import SimCLRModel, build_for_run, init_variables
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train import evaluators, runner
from simclr_jax.train.state import TrainState


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> SimCLRModel:
    """Encoder, projection head, and the online probe on stop-gradient features."""
    return build_for_run(config, config.model, num_classes, classifier_stop_gradient=True)


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
    negatives (plus the memory queue's valid rows, as before this step) and the probe's loss."""
    use_memory = config.memory.enabled

    def gradients(state: TrainState, view_a: jax.Array, view_b: jax.Array, labels: jax.Array):
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
            probe = losses.softmax_cross_entropy(out["logits"], labels)
            aux = dict(aux, contrastive_loss=contrastive, probe_loss=probe)
            aux["probe_acc"] = jnp.mean(jnp.argmax(out["logits"], -1) == labels)
            return contrastive + probe, (aux, updates["batch_stats"])

        grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        # Moving averages are averaged too: identical under global BN, in sync under local BN.
        grads, aux, batch_stats = parallel.replica_mean((grads, aux, batch_stats))
        aux["loss"] = aux["contrastive_loss"] + aux["probe_loss"]
        return grads, aux, batch_stats

    return gradients


def make_train_step(model: SimCLRModel, config: ml_collections.ConfigDict):
    """Per-replica step: views, gradients, the optimizer update (LARS by default); with the
    memory, then its update (simclr_jax.memory: view b's keys from the EMA network enter)."""
    view_gradients = make_view_gradient_fn(model, config)
    use_memory, decay = config.memory.enabled, config.memory.ema_decay

    def step(state: TrainState, batch: dict[str, jax.Array]):
        view_a, view_b = views.contrastive_views(config, state.step, batch["image"])
        grads, aux, batch_stats = view_gradients(state, view_a, view_b, batch["label"])
        new_state = state.apply_gradients(grads, batch_stats)
        if use_memory:
            new_memory = memory.update(
                model, state.memory, view_b, new_state.params, decay=decay, axis_name=DATA_AXIS
            )
            new_state = new_state.replace(memory=new_memory)
        return new_state, aux

    return step


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    accept_config_changes: bool = False,
) -> dict[str, Any]:
    """Pretrain, resuming from `workdir`; returns the final metrics (see runner.run)."""
    validation.validate_pretrain(config)
    dp = parallel.from_config(config)
    data = stage_data.pretraining_data(config, dp.mesh)
    schedule = optim.train_schedule(config, data.num_examples)
    model = make_model(config, data.num_classes)
    probe_lr = config.probe.learning_rate
    probe_schedule = schedule.learning_rate(probe_lr) if probe_lr > 0 else None

    def initial_state(resuming: bool) -> TrainState:
        return init_state(
            model, config, data.channels, schedule.learning_rate(),
            probe_schedule=probe_schedule, sharding=dp.replicated_sharding,
        )  # fmt: skip

    probe = evaluators.pretraining_evaluators(dp, model, config, data)
    stage = runner.Stage(
        "Pretraining", initial_state, make_train_step(model, config), data.batch_for_step,
        schedule, evaluators=probe,
    )  # fmt: skip
    return runner.run(
        config, workdir, dp, stage,
        stop_at_step=stop_at_step, accept_config_changes=accept_config_changes,
    )  # fmt: skip


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Pretraining")
