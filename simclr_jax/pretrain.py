"""Contrastive pretraining (SimCLR v1/v2) with an online linear probe.

    python -m simclr_jax.pretrain --config=simclr_jax/configs/pretrain_fashion_mnist.py \
        --workdir=/tmp/fm \
        [--config.batch_size=512 ...]

The trainer reads in the order the work happens: mesh, data, model and optimizer, init or restore, the
per-replica step, the loop. Rerunning the same command resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import cli, losses, memory, parallel, validation
from simclr_jax.data import augment, sources, streaming
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.models import build_model, init_variables
from simclr_jax.optim import (
    make_optimizer,
    scaled_learning_rate,
    warmup_cosine_schedule,
    with_separate_probe,
)
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train import checkpoint, evaluate, loop, metrics
from simclr_jax.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_views_fn(config: ml_collections.ConfigDict):
    """Per-replica: the two augmented views of this replica's uint8 images at a step."""
    seed_key = jax.random.key(config.seed)
    aug = config.augment

    def views(step: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        local_batch = images.shape[0]
        # Keys per example (seed, step, global index): the views do not depend on the device count.
        example_ids = jax.lax.axis_index(DATA_AXIS) * local_batch + jnp.arange(local_batch)
        return augment.simclr_views(
            jax.random.fold_in(seed_key, step),
            images,
            example_ids,
            out_size=config.dataset.image_size,
            color_strength=aug.color_jitter_strength,
            use_blur=aug.use_blur,
            crop_min_area=aug.crop_min_area,
            flip=aug.flip,
        )

    return views


def make_view_gradient_fn(model, config: ml_collections.ConfigDict):
    """Per-replica gradients from given views (see make_gradient_fn).

    With config.memory.enabled the state is a memory.MemoryTrainState: the queue's valid rows, as
    they were before this step, are extra NT-Xent negatives.
    """
    use_memory = config.memory.enabled

    def gradients(state: TrainState, view_a: jax.Array, view_b: jax.Array, labels: jax.Array):
        images = jnp.concatenate([view_a, view_b])
        labels = jnp.concatenate([labels, labels])
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


def make_gradient_fn(model, config: ml_collections.ConfigDict):
    """Per-replica: two views, NT-Xent over all replicas plus the probe; grads averaged over replicas."""
    views = make_views_fn(config)
    view_gradients = make_view_gradient_fn(model, config)

    def gradients(state: TrainState, batch: dict[str, jax.Array]):
        view_a, view_b = views(state.step, batch["image"])
        return view_gradients(state, view_a, view_b, batch["label"])

    return gradients


def make_train_step(model, config: ml_collections.ConfigDict):
    """The per-replica pretraining step: gradients, then the optimizer update (LARS by default).

    With config.memory.enabled, then the memory update (simclr_jax.memory): the EMA network embeds
    view b, moves towards the updated weights, and the keys of all replicas enter the queue.
    """
    views = make_views_fn(config)
    view_gradients = make_view_gradient_fn(model, config)
    use_memory, decay = config.memory.enabled, config.memory.ema_decay

    def step(state: TrainState, batch: dict[str, jax.Array]):
        view_a, view_b = views(state.step, batch["image"])
        grads, aux, batch_stats = view_gradients(state, view_a, view_b, batch["label"])
        new_state = state.apply_gradients(grads, batch_stats)
        if use_memory:
            new_memory = memory.update(
                model, state.memory, view_b, new_state.params, decay=decay, axis_name=DATA_AXIS
            )
            new_state = new_state.replace(memory=new_memory)
        return new_state, aux

    return step


def make_predict_step(model, image_size: int, *, precropped: bool = False):
    """Per-replica probe logits on centre-cropped evaluation images (BN in inference mode).

    precropped: the host already took the centre crop at image_size (streamed datasets).
    """

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        if precropped:
            x = images.astype(jnp.float32) / 255.0
        else:
            x = augment.eval_preprocess(images, out_size=image_size)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model.apply(variables, x, train=False)["logits"]

    return predict


@dataclasses.dataclass(frozen=True)
class PretrainData:
    """Where a run's batches come from, whichever path serves them."""

    num_examples: int | None  # None: a streamed split whose size tfds does not record
    num_classes: int
    channels: int
    batch_for_step: Callable[[int], dict[str, jax.Array]]  # global batch of a step
    eval_batches: Callable[[], Iterable[dict[str, jax.Array]]] | None  # fresh pass, padded
    streamed: bool  # host-cropped (variable-size images) rather than device-resident


def load_data(config: ml_collections.ConfigDict, mesh) -> PretrainData:
    """Device-resident arrays for fixed-size datasets; the host tf.data path for ImageNet.

    Device-resident batches are a function of (seed, step), so a resumed run sees exactly the
    batches it would have; the host stream restarts on resume (another, equally random, order).
    """
    dataset = config.dataset
    if streaming.is_streamed(dataset):
        return _streamed_data(config, mesh)
    train = sources.load_split(dataset, dataset.train_split)
    if train.labels is None:
        raise ValueError("pretraining with the online probe needs a labeled train split")
    device_data = data_pipeline.DeviceResidentData(
        train, global_batch=config.batch_size, seed=config.seed, mesh=mesh
    )
    eval_batches = None
    if dataset.eval_split:
        test = sources.load_split(dataset, dataset.eval_split)
        eval_batches = functools.partial(
            data_pipeline.eval_batches, test, global_batch=config.eval_batch_size, mesh=mesh
        )
    return PretrainData(
        num_examples=len(train.images),
        num_classes=train.num_classes,
        channels=train.images.shape[-1],
        batch_for_step=device_data.batch,
        eval_batches=eval_batches,
        streamed=False,
    )


def _streamed_data(config: ml_collections.ConfigDict, mesh) -> PretrainData:
    from simclr_jax.data import tfds_source

    dataset = config.dataset
    info = tfds_source.dataset_info(dataset.name, data_dir=dataset.data_dir)
    split_sizes = {name: split.num_examples for name, split in info.splits.items()}
    processes = jax.process_count()
    common = dict(image_size=dataset.image_size, data_dir=dataset.data_dir)
    train = tfds_source.host_pipeline(
        dataset.name,
        dataset.train_split,
        local_batch=config.batch_size // processes,
        train=True,
        seed=config.seed,
        num_crops=2,  # one random-resized crop per view; the device does the rest
        crop_min_area=config.augment.crop_min_area,
        **common,
    )

    def eval_batches():
        batches = tfds_source.host_pipeline(
            dataset.name,
            dataset.eval_split,
            local_batch=config.eval_batch_size // processes,
            train=False,
            **common,
        )
        return (data_pipeline.to_global_batch(batch, mesh) for batch in batches)

    return PretrainData(
        num_examples=split_sizes.get(dataset.train_split),
        num_classes=int(info.features["label"].num_classes),
        channels=info.features["image"].shape[-1] or 3,
        batch_for_step=lambda step: data_pipeline.to_global_batch(next(train), mesh),
        eval_batches=eval_batches if dataset.eval_split else None,
        streamed=True,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Pretrain, resuming from `workdir` when it holds a checkpoint; returns the final metrics.

    stop_at_step ends this run early (with a checkpoint) to fit a time slot; rerunning resumes.
    """
    validation.validate_pretrain(config)
    mesh = parallel.make_mesh()
    dp = parallel.DataParallel(mesh, config.parallel.backend)
    parallel.check_divisible("batch_size", config.batch_size, mesh)
    parallel.check_divisible("eval_batch_size", config.eval_batch_size, mesh)

    # Data: small fixed-size datasets live on the devices; each step gathers its batch there.
    # Variable-size ones (ImageNet) stream: the host decodes and takes two crops per image.
    data = load_data(config, mesh)
    if data.num_examples is None:
        if not config.num_steps or config.optim.warmup_epochs:
            raise ValueError(
                f"the size of {config.dataset.name}:{config.dataset.train_split} is unknown to "
                "tfds, so epochs cannot be counted: set num_steps > 0 and optim.warmup_epochs=0"
            )
        data = dataclasses.replace(data, num_examples=config.num_steps * config.batch_size)
    steps_per_epoch = data.num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {data.num_examples} training images"
        )
    total_steps = config.num_steps or int(config.num_epochs * steps_per_epoch)

    # Model and optimizer; the learning rate is derived here, never stored in the config.
    model = build_model(
        config.model,
        num_classes=data.num_classes,
        image_size=config.dataset.image_size,
        axis_name=DATA_AXIS if config.model.global_bn else None,
        dtype=DTYPES[config.dtype],
        classifier_stop_gradient=True,
    )
    peak_lr = scaled_learning_rate(config.optim.base_lr, config.batch_size, config.optim.lr_scaling)
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps, total_steps)
    schedule = warmup_cosine_schedule(peak_lr, total_steps, warmup_steps)
    probe_schedule = None
    if config.probe.learning_rate > 0:
        probe_schedule = warmup_cosine_schedule(
            config.probe.learning_rate, total_steps, warmup_steps
        )
    state = init_state(
        model,
        config,
        data.channels,
        schedule,
        probe_schedule=probe_schedule,
        sharding=dp.replicated_sharding,
    )

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
        loop.guard_nonfinite(make_train_step(model, config), skip=config.nonfinite == "skip"),
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
    if data.eval_batches is not None:
        evaluate_probe = functools.partial(evaluate_probe_on, dp, model, config, data)
    state, results = loop.run(
        state=state,
        start_step=start_step,
        settings=settings,
        train_step=train_step,
        batch_for_step=data.batch_for_step,
        first=dp.first,
        save=lambda step, state: ckpt.save(step, dp.unreplicate(state), force=True),
        evaluate=evaluate_probe,
        writer=writer,
        progress=progress,
        learning_rate=schedule,
        workdir=workdir,
        stop_on_nonfinite=config.nonfinite == "stop",
    )
    ckpt.wait()
    ckpt.close()
    return results


def init_state(
    model, config, channels, schedule, *, probe_schedule=None, sharding=None
) -> TrainState:
    """Parameters from the seed (BN in inference mode: no collectives), placed by `sharding`.

    With a mesh-replicated `sharding` every process compiles one and the same program, which the
    persistent cache shares (jax writes it from process 0 only); compiled per process, the workers
    would start a minute behind process 0. Default: the host's default device. probe_schedule
    gives the online probe its own optimizer (optim.with_separate_probe); None trains it with the
    encoder's, as the reference does.
    """
    variables = init_variables(
        model,
        seed=config.seed,
        image_size=config.dataset.image_size,
        channels=channels,
        sharding=sharding,
    )
    tx = make_optimizer(config.optim, variables["params"], learning_rate=schedule)
    if probe_schedule is not None:
        tx = with_separate_probe(tx, variables["params"], learning_rate=probe_schedule)
    state = TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )
    if not config.memory.enabled:
        return state
    # SimCLRv2's memory: an EMA copy of the weights and an empty queue of projection-sized keys.
    memory.check_config(config.memory, global_batch=config.batch_size)
    size = config.dataset.image_size
    dummy = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    projection = jax.eval_shape(functools.partial(model.apply, train=False), variables, dummy)
    bank = memory.create(
        variables["params"],
        variables["batch_stats"],
        size=config.memory.size,
        dim=projection["projection"].shape[-1],
    )
    return memory.attach(state, bank)


def evaluate_probe_on(dp, model, config, data: PretrainData, state) -> dict[str, float]:
    """Exact probe accuracy on the eval split: every example counted once (padded, masked)."""
    predict = dp.map(
        make_predict_step(model, config.dataset.image_size, precropped=data.streamed),
        sharded_args=(False, True),
        sharded_outputs=True,
    )
    result = evaluate.exact_evaluate(lambda images: predict(state, images), data.eval_batches())
    return {f"probe_{k}": v for k, v in result.items()}


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Pretraining")
