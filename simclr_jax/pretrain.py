"""Contrastive pretraining (SimCLR v1/v2) with an online linear probe.

    python -m simclr_jax.pretrain --config=configs/pretrain_fashion_mnist.py --workdir=/tmp/fm \
        [--config.batch_size=512 ...]

The trainer reads in the order the work happens: mesh, data, model and optimizer, init or restore, the
per-replica step, the loop. Rerunning the same command resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from simclr_jax import distributed, losses, parallel
from simclr_jax.data import augment, sources
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.models import build_model
from simclr_jax.optim import make_optimizer, scaled_learning_rate, warmup_cosine_schedule
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train import checkpoint, evaluate, loop, metrics
from simclr_jax.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_gradient_fn(model, config: ml_collections.ConfigDict):
    """Per-replica: two views, NT-Xent over all replicas plus the probe; grads averaged over replicas."""
    seed_key = jax.random.key(config.seed)
    aug = config.augment
    image_size = config.dataset.image_size

    def gradients(state: TrainState, batch: dict[str, jax.Array]):
        local_batch = batch["image"].shape[0]
        # Keys per example (seed, step, global index): the views do not depend on the device count.
        example_ids = jax.lax.axis_index(DATA_AXIS) * local_batch + jnp.arange(local_batch)
        view_a, view_b = augment.simclr_views(
            jax.random.fold_in(seed_key, state.step),
            batch["image"],
            example_ids,
            out_size=image_size,
            color_strength=aug.color_jitter_strength,
            use_blur=aug.use_blur,
            crop_min_area=aug.crop_min_area,
            flip=aug.flip,
        )
        images = jnp.concatenate([view_a, view_b])
        labels = jnp.concatenate([batch["label"], batch["label"]])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            z_a, z_b = jnp.split(out["projection"], 2)
            contrastive, aux = losses.nt_xent(
                z_a, z_b, temperature=config.loss.temperature, axis_name=DATA_AXIS
            )
            # The probe sees stop-gradient features, so it never shapes the representation.
            probe = losses.softmax_cross_entropy(out["logits"], labels)
            aux = dict(aux, contrastive_loss=contrastive, probe_loss=probe)
            aux["probe_acc"] = jnp.mean(jnp.argmax(out["logits"], -1) == labels)
            return contrastive + probe, (aux, updates["batch_stats"])

        grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        # Moving averages are averaged too: identical under global BN, kept in sync under local BN.
        grads, aux, batch_stats = jax.lax.pmean((grads, aux, batch_stats), DATA_AXIS)
        aux["loss"] = aux["contrastive_loss"] + aux["probe_loss"]
        return grads, aux, batch_stats

    return gradients


def make_train_step(model, config: ml_collections.ConfigDict):
    """The per-replica pretraining step: gradients, then the optimizer update (LARS by default)."""
    gradients = make_gradient_fn(model, config)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        grads, aux, batch_stats = gradients(state, batch)
        return state.apply_gradients(grads, batch_stats), aux

    return step


def make_predict_step(model, image_size: int):
    """Per-replica probe logits on centre-cropped evaluation images (BN in inference mode)."""

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        x = augment.eval_preprocess(images, out_size=image_size)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model.apply(variables, x, train=False)["logits"]

    return predict


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject bad values before anything is loaded or compiled."""
    if config.loss.temperature <= 0:
        raise ValueError(f"loss.temperature must be positive, got {config.loss.temperature}")
    if config.optim.base_lr <= 0:
        raise ValueError(f"optim.base_lr must be positive, got {config.optim.base_lr}")
    if config.num_steps < 0 or (config.num_steps == 0 and config.num_epochs <= 0):
        raise ValueError("set num_epochs > 0 or num_steps > 0")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"{name} must be positive, got {config[name]}")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Pretrain, resuming from `workdir` when it holds a checkpoint; returns the final metrics.

    stop_at_step ends this run early (with a checkpoint) to fit a time slot; rerunning resumes.
    """
    validate(config)
    mesh = parallel.make_mesh()
    dp = parallel.DataParallel(mesh, config.parallel.backend)
    parallel.check_divisible("batch_size", config.batch_size, mesh)
    parallel.check_divisible("eval_batch_size", config.eval_batch_size, mesh)

    # Data: small fixed-size datasets live on the devices; each step gathers its batch there.
    train_arrays = sources.load_split(config.dataset, config.dataset.train_split)
    if train_arrays.labels is None:
        raise ValueError("pretraining with the online probe needs a labeled train split")
    steps_per_epoch = len(train_arrays.images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {len(train_arrays.images)} training images"
        )
    total_steps = config.num_steps or int(config.num_epochs * steps_per_epoch)
    train_data = data_pipeline.DeviceResidentData(
        train_arrays, global_batch=config.batch_size, seed=config.seed, mesh=mesh
    )

    # Model and optimizer; the learning rate is derived here, never stored in the config.
    model = build_model(
        config.model,
        num_classes=train_arrays.num_classes,
        image_size=config.dataset.image_size,
        axis_name=DATA_AXIS if config.model.global_bn else None,
        dtype=DTYPES[config.dtype],
        classifier_stop_gradient=True,
    )
    peak_lr = scaled_learning_rate(config.optim.base_lr, config.batch_size, config.optim.lr_scaling)
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)
    schedule = warmup_cosine_schedule(peak_lr, total_steps, min(warmup_steps, total_steps))
    state = init_state(model, config, train_arrays.images.shape[1:], schedule)

    # Resume from the workdir when it holds a checkpoint.
    ckpt = checkpoint.CheckpointManager(
        workdir,
        keep=config.keep_checkpoints,
        save_every=config.checkpoint_every_steps,
        config=config,
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    start_step = int(state.step)
    state = dp.replicate(state)

    train_step = dp.map(
        make_train_step(model, config),
        sharded_args=(False, True),
        sharded_outputs=(False, False),
        donate_argnums=(0,),
    )
    writer = metrics.create_writer(workdir, is_main=jax.process_index() == 0)
    metrics.write_config(workdir, config)
    progress = metrics.Progress(
        total_steps,
        writer=writer,
        every_steps=config.log_every_steps,
        first_step=start_step,
        batch_size=config.batch_size,
    )
    logging.info(
        "Pretraining %d steps (%d per epoch), batch %d on %d devices, peak lr %.4g",
        total_steps, steps_per_epoch, config.batch_size, dp.num_replicas, peak_lr,
    )  # fmt: skip
    settings = loop.LoopSettings(
        total_steps=total_steps,
        end_step=total_steps if stop_at_step is None else min(stop_at_step, total_steps),
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps,
        eval_every=config.eval_every_steps,
    )
    evaluate_probe = None
    if config.dataset.eval_split:
        eval_arrays = sources.load_split(config.dataset, config.dataset.eval_split)
        evaluate_probe = functools.partial(evaluate_split, dp, model, config, eval_arrays)
    state, results = loop.run(
        state=state,
        start_step=start_step,
        settings=settings,
        train_step=train_step,
        batch_for_step=train_data.batch,
        first=dp.first,
        save=lambda step, state: ckpt.save(step, dp.unreplicate(state), force=True),
        evaluate=evaluate_probe,
        writer=writer,
        progress=progress,
        learning_rate=schedule,
        workdir=workdir,
    )
    ckpt.wait()
    ckpt.close()
    return results


def init_state(model, config, image_shape, schedule) -> TrainState:
    """Parameters from the seed, on the host's default device (BN in inference mode: no collectives)."""
    size, channels = config.dataset.image_size, image_shape[-1]
    dummy = jnp.zeros((1, size, size, channels), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(config.seed), dummy
    )
    tx = make_optimizer(config.optim, variables["params"], learning_rate=schedule)
    return TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def evaluate_split(dp, model, config, arrays, state) -> dict[str, float]:
    """Exact probe accuracy on a split: every example counted once (padded, masked last batch)."""
    predict = dp.map(
        make_predict_step(model, config.dataset.image_size),
        sharded_args=(False, True),
        sharded_outputs=True,
    )
    batches = data_pipeline.eval_batches(arrays, global_batch=config.eval_batch_size, mesh=dp.mesh)
    result = evaluate.exact_evaluate(lambda images: predict(state, images), batches)
    return {f"probe_{k}": v for k, v in result.items()}


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    distributed.initialize()
    flag_values = flags.FLAGS
    results = train_and_evaluate(
        flag_values.config, flag_values.workdir, stop_at_step=flag_values.stop_at_step
    )
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})


def define_flags() -> None:
    """Flags are defined only when run as a program, so other modules can import this one."""
    config_flags.DEFINE_config_file("config", None, "Pretraining config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
    flags.DEFINE_integer("stop_at_step", None, "End this run at this step (rerun to resume).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
