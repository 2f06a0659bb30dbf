"""Fine-tuning, linear evaluation and the supervised baseline, from a pretraining workdir or scratch.

    python -m simclr_jax.finetune --config=simclr_jax/configs/finetune_fashion_mnist.py:1pct \
        --workdir=/tmp/ft --config.init_checkpoint=/tmp/fm [--config.label_fraction=0.05 ...]

The pretraining workdir is enough: its saved config gives the architecture (explicit
--config.model.* values win) and only its weights are read (params and BN statistics; not the step
or the optimizer). The classifier is new, sized to this dataset's classes. Which layer feeds it
(model.ft_proj_selector), which stages are frozen (model.fine_tune_after_block: 4 = linear
evaluation) and how many labels are used (label_fraction) are this run's choices. Rerunning the
same command resumes from the newest checkpoint in --workdir.

Transfer: the checkpoint may come from another dataset (simclr_jax/configs/transfer_digits.py). Images are
resized to dataset.image_size on the device, grayscale images are repeated to RGB for an
RGB-pretrained network (RGB becomes luma for a grayscale one), and an auto CIFAR stem stays the
checkpoint's whatever this run's image size.

Frozen means frozen: frozen parameters get exactly zero updates (the optimizer mask), frozen stages
run BatchNorm in inference mode, and their statistics are kept bit for bit. Head layers above the
selector feed nothing and are frozen too. Linear evaluation (fine_tune_after_block=4) runs the whole
network in inference mode and trains only the classifier, on fixed features of the chosen layer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import cli, encoder, losses, parallel, validation
from simclr_jax.data import augment, sources, streaming
from simclr_jax.data import pipeline as data_pipeline
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.models import (
    STAGE_NAMES,
    build_model,
    frozen_mask,
    init_variables,
    linear_classifier,
)
from simclr_jax.optim import make_optimizer, scaled_learning_rate, warmup_cosine_schedule
from simclr_jax.parallel import DATA_AXIS
from simclr_jax.train import checkpoint, evaluate, knn_monitor, loop, metrics
from simclr_jax.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LINEAR_EVAL_BLOCK = len(STAGE_NAMES) - 1  # fine_tune_after_block that freezes the whole backbone


# ------------------------------------------------------------------------------------ config


def check_common(config: ml_collections.ConfigDict) -> None:
    """Checks shared with distillation: schedule, data, optimizer, augmentation, kNN, labels."""
    validation.check_schedule(config)
    validation.check_dataset(config.dataset)
    validation.check_optim(config.optim)
    fraction = config.label_fraction
    if not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
        raise ValueError(f"label_fraction must be in (0, 1] (e.g. 0.01 for 1%), got {fraction!r}")
    crop = config.augment.crop_min_area
    if not 0.0 < crop <= 1.0:
        raise ValueError(f"augment.crop_min_area must be in (0, 1], got {crop!r}")
    if config.knn.k < 0:
        raise ValueError(f"knn.k must be >= 0 (0 = no kNN monitor), got {config.knn.k}")
    if not config.knn.temperature > 0:
        raise ValueError(f"knn.temperature must be > 0, got {config.knn.temperature}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject bad values before anything is loaded or compiled (the model once it is resolved)."""
    check_common(config)


def resolve_model(
    config: ml_collections.ConfigDict, model_path: str, run: encoder.SavedRun | None
) -> ml_collections.ConfigDict:
    """A copy of `config` whose model block at `model_path` has every architecture field filled.

    The copy is what the run saves (config.json and with each checkpoint), so its workdir alone
    rebuilds the network (load_encoder, a distillation teacher).
    """
    resolved = copy.deepcopy(config)
    block = resolved
    for name in model_path.split("."):
        block = block[name]
    inherited = run.model_config if run is not None else None
    for name, value in encoder.resolve_model_fields(block.to_dict(), inherited).items():
        block[name] = value
    if run is not None and block.cifar_stem is None:  # auto: the checkpoint's image size decided
        block.cifar_stem = run.image_size <= 32
    return resolved


# ------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class LabeledData:
    """Training batches of the labelled (sub)set and exact-evaluation batches, whatever the source.

    In-memory datasets keep their arrays (the kNN monitor embeds them); variable-size tfds
    datasets (ImageNet) stream through the host pipeline, which crops on the host.
    """

    num_examples: int
    num_classes: int
    channels: int
    batch_for_step: Callable[[int], dict[str, jax.Array]]
    eval_batches: Callable[[], Iterable[dict[str, jax.Array]]] | None
    precropped: bool
    train_arrays: ImageArrays | None = None
    eval_arrays: ImageArrays | None = None


def labeled_subset(arrays: ImageArrays, fraction: float, seed: int) -> ImageArrays:
    """The class-stratified `fraction` of a labelled split; a pure function of its arguments, so
    every host (and every rerun) picks the same examples."""
    if arrays.labels is None:
        raise ValueError("dataset.train_split has no labels; fine-tuning needs a labelled split")
    if fraction >= 1.0:
        return arrays
    return sources.take_label_fraction(arrays, fraction, seed=seed)


def match_channels(arrays: ImageArrays, channels: int | None) -> ImageArrays:
    """`arrays` with the channel count the network expects (None: keep the data's own).

    For transfer from a checkpoint: grayscale is repeated to RGB, RGB becomes its luma
    (augment.GRAYSCALE_WEIGHTS). Done once on the host, before the data goes to the devices.
    """
    have = arrays.images.shape[-1]
    if channels is None or channels == have:
        return arrays
    if (have, channels) == (1, 3):
        images = np.repeat(arrays.images, 3, axis=-1)
    elif (have, channels) == (3, 1):
        luma = arrays.images.astype(np.float32) @ np.asarray(augment.GRAYSCALE_WEIGHTS, np.float32)
        images = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    else:
        raise ValueError(f"cannot convert {have}-channel images to {channels} channels (1 or 3)")
    return ImageArrays(images, arrays.labels, arrays.num_classes)


def in_memory_data(
    config: ml_collections.ConfigDict, mesh, channels: int | None = None
) -> LabeledData:
    """Fixed-size datasets: the labelled subset lives on the devices (data/pipeline.py)."""
    train = sources.load_split(config.dataset, config.dataset.train_split)
    train = labeled_subset(train, config.label_fraction, config.label_seed)
    train = match_channels(train, channels)
    resident = data_pipeline.DeviceResidentData(
        train, global_batch=config.batch_size, seed=config.seed, mesh=mesh
    )
    eval_arrays = eval_batches = None
    if config.dataset.eval_split:
        eval_arrays = sources.load_split(config.dataset, config.dataset.eval_split)
        eval_arrays = match_channels(eval_arrays, channels)
        eval_batches = functools.partial(
            data_pipeline.eval_batches, eval_arrays, global_batch=config.eval_batch_size, mesh=mesh
        )
    return LabeledData(
        num_examples=len(train),
        num_classes=train.num_classes,
        channels=train.images.shape[-1],
        batch_for_step=resident.batch,
        eval_batches=eval_batches,
        precropped=False,
        train_arrays=train,
        eval_arrays=eval_arrays,
    )


def streamed_data(
    config: ml_collections.ConfigDict, mesh, channels: int | None = None
) -> LabeledData:
    """Variable-size tfds datasets: host-cropped batches (tfds_source.host_pipeline).

    Label subsets are tfds datasets of their own (imagenet2012_subset/1pct, /10pct). The stream
    restarts on resume, so a resumed run sees a different (equally random) order.
    """
    from simclr_jax.data import tfds_source

    if config.label_fraction < 1.0:
        raise ValueError(
            f"label_fraction={config.label_fraction} needs an in-memory dataset; for ImageNet use "
            "dataset.name='imagenet2012_subset/1pct' (or /10pct) with label_fraction=1.0"
        )
    info = tfds_source.dataset_info(config.dataset.name, data_dir=config.dataset.data_dir)
    dataset = config.dataset
    have = info.features["image"].shape[-1] or 3
    if channels is not None and channels != have:
        raise ValueError(
            f"{dataset.name!r} has {have}-channel images but the config.init_checkpoint network "
            f"expects {channels}; channels are converted only for in-memory datasets"
        )
    try:
        num_examples = info.splits[dataset.train_split].num_examples
    except (KeyError, ValueError):
        raise ValueError(
            f"dataset.train_split {dataset.train_split!r} of {dataset.name!r} is unknown or not "
            f"prepared: run `tfds build {dataset.name}`"
        ) from None
    processes = jax.process_count()
    common = dict(image_size=dataset.image_size, data_dir=dataset.data_dir)
    train = tfds_source.host_pipeline(
        dataset.name,
        dataset.train_split,
        local_batch=config.batch_size // processes,
        train=True,
        seed=config.seed,
        crop_min_area=config.augment.crop_min_area,
        **common,
    )
    eval_batches = None
    if dataset.eval_split:

        def eval_batches():
            batches = tfds_source.host_pipeline(
                dataset.name,
                dataset.eval_split,
                local_batch=config.eval_batch_size // processes,
                train=False,
                **common,
            )
            return (data_pipeline.to_global_batch(batch, mesh) for batch in batches)

    return LabeledData(
        num_examples=num_examples,
        num_classes=int(info.features["label"].num_classes),
        channels=have,
        batch_for_step=lambda step: data_pipeline.to_global_batch(next(train), mesh),
        eval_batches=eval_batches,
        precropped=True,
    )


def load_data(config: ml_collections.ConfigDict, mesh, channels: int | None = None) -> LabeledData:
    """The run's data; `channels` (a checkpoint's input channels) converts the images to match."""
    if streaming.is_streamed(config.dataset):
        return streamed_data(config, mesh, channels)
    return in_memory_data(config, mesh, channels)


# ------------------------------------------------------------------------------------ model


def frozen_tree(tree: Any, *, fine_tune_after_block: int, ft_proj_selector: int) -> Any:
    """Pytree of bools over params or batch_stats: True where this run must not change a value.

    Frozen: backbone stages up to fine_tune_after_block (models.frozen_mask); projection-head
    layers above ft_proj_selector (they feed nothing); and, for linear evaluation
    (fine_tune_after_block=4), everything but the classifier.
    """
    backbone = frozen_mask(tree, fine_tune_after_block)
    linear_eval = fine_tune_after_block == LINEAR_EVAL_BLOCK

    def frozen(path: tuple[Any, ...], in_frozen_stage: bool) -> bool:
        names = [str(getattr(entry, "key", entry)) for entry in path]
        if names and names[0] == "classifier":
            return False
        if in_frozen_stage or linear_eval:
            return True
        if "head" in names[:-1]:
            layer = re.search(r"(\d+)$", names[names.index("head") + 1])
            return layer is not None and int(layer.group(1)) > ft_proj_selector
        return False

    return jax.tree_util.tree_map_with_path(frozen, backbone)


def initial_variables(
    model, seed: int, image_size: int, channels: int, run: encoder.SavedRun | None
) -> dict[str, Any]:
    """Random variables from `seed`, or a checkpoint's variables with a fresh classifier.

    From a checkpoint only the model variables are read (not the step or the optimizer), checked
    first against the model's shapes, so one of another architecture fails at once
    (checkpoint.CheckpointMismatchError naming the mismatched paths). Only the classifier is then
    initialised: initialising the whole network is one of the largest XLA programs of a run.
    """
    if run is None:
        variables = init_variables(model, seed=seed, image_size=image_size, channels=channels)
        return {k: dict(v) for k, v in variables.items()}
    abstract = encoder.abstract_variables(model, image_size, channels)
    target = {
        collection: {k: v for k, v in tree.items() if k != "classifier"}
        for collection, tree in abstract.items()
    }
    variables = checkpoint.restore_weights(run.workdir, target)
    width = abstract["params"]["classifier"]["kernel"].shape[0]
    classifier = linear_classifier(model.num_classes, zero_init=model.zero_init_logits_layer)
    fresh = jax.jit(classifier.init)(jax.random.key(seed), jnp.zeros((1, width), jnp.float32))
    variables["params"] = {**variables["params"], "classifier": fresh["params"]}
    return variables


def create_state(model_config, optim_config, variables, schedule) -> TrainState:
    """TrainState whose optimizer gives frozen parameters exactly zero updates (and no state)."""
    frozen = frozen_tree(
        variables["params"],
        fine_tune_after_block=model_config.fine_tune_after_block,
        ft_proj_selector=model_config.ft_proj_selector,
    )
    tx = make_optimizer(optim_config, variables["params"], learning_rate=schedule, frozen=frozen)
    return TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def keep_frozen_stats(frozen: Any, old: Any, new: Any) -> Any:
    """New BN statistics, except the old ones (bit for bit) wherever `frozen` says so."""
    return jax.tree.map(lambda is_frozen, o, n: o if is_frozen else n, frozen, old, new)


# ------------------------------------------------------------------------------------ steps


def train_view(
    config, images: jax.Array, step: jax.Array, *, precropped: bool = False, stream: int = 0
) -> jax.Array:
    """Crop + flip, keyed by (seed, step, stream, global example index): the same views whatever
    the device count. `stream` separates batches of one step (distillation's labelled batch)."""
    local_batch = images.shape[0]
    example_ids = jax.lax.axis_index(DATA_AXIS) * local_batch + jnp.arange(local_batch)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    if stream:
        key = jax.random.fold_in(key, stream)
    return augment.finetune_views(
        key,
        images,
        example_ids,
        out_size=config.dataset.image_size,
        crop_min_area=config.augment.crop_min_area,
        flip=config.augment.flip,
        crop=not precropped,
    )


def make_train_step(model, config: ml_collections.ConfigDict, *, precropped: bool = False):
    """Per-replica step: one crop+flip view, cross-entropy, grads averaged over replicas."""
    linear_eval = config.model.fine_tune_after_block == LINEAR_EVAL_BLOCK

    def step(state: TrainState, batch: dict[str, jax.Array]):
        images = train_view(config, batch["image"], state.step, precropped=precropped)
        labels = batch["label"]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if linear_eval:  # fixed features: the whole network in inference mode
                out, batch_stats = model.apply(variables, images, train=False), state.batch_stats
            else:
                out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
                batch_stats = updates["batch_stats"]
            loss = losses.softmax_cross_entropy(out["logits"], labels)
            top1 = jnp.mean(jnp.argmax(out["logits"], -1) == labels)
            return loss, ({"loss": loss, "train_top1": top1}, batch_stats)

        grads, (aux, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads, aux, batch_stats = jax.lax.pmean((grads, aux, batch_stats), DATA_AXIS)
        frozen = frozen_tree(
            state.batch_stats,
            fine_tune_after_block=config.model.fine_tune_after_block,
            ft_proj_selector=config.model.ft_proj_selector,
        )
        batch_stats = keep_frozen_stats(frozen, state.batch_stats, batch_stats)
        return state.apply_gradients(grads, batch_stats), aux

    return step


def make_predict_step(model, image_size: int, *, precropped: bool = False):
    """Per-replica logits of evaluation images (centre crop unless the host already cropped)."""

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        if precropped:
            x = augment.to_float(images)
        else:
            x = augment.eval_preprocess(images, out_size=image_size)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return model.apply(variables, x, train=False)["logits"]

    return predict


def make_evaluate(dp, model, config, data: LabeledData, prefix: str = "eval_"):
    """state -> exact top-1/top-5 over the whole eval split, plus the kNN monitor when it applies.

    The kNN memory bank is the labelled training (sub)set: the only labels this run may use.
    """
    if data.eval_batches is None:
        return None
    predict = dp.map(
        make_predict_step(model, config.dataset.image_size, precropped=data.precropped),
        sharded_args=(False, True),
        sharded_outputs=True,
    )
    use_knn = config.knn.k > 0 and data.train_arrays is not None and data.eval_arrays is not None

    def run(state) -> dict[str, float]:
        result = evaluate.exact_evaluate(lambda images: predict(state, images), data.eval_batches())
        result = {f"{prefix}{k}": v for k, v in result.items()}
        if use_knn:
            result.update(
                knn_monitor.knn_monitor(
                    dp, model, state, data.train_arrays, data.eval_arrays, config
                )
            )
        return result

    return run


# ------------------------------------------------------------------------------------ trainer


def schedule_for(config, num_examples: int) -> tuple[int, int, Any, float]:
    """(steps per epoch, total steps, schedule, peak lr) derived from the config and data size."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {num_examples} training examples "
            "(after label_fraction); lower batch_size"
        )
    total_steps = config.num_steps or max(1, int(config.num_epochs * steps_per_epoch))
    peak_lr = scaled_learning_rate(config.optim.base_lr, config.batch_size, config.optim.lr_scaling)
    warmup_steps = min(int(config.optim.warmup_epochs * steps_per_epoch), total_steps)
    return (
        steps_per_epoch,
        total_steps,
        warmup_cosine_schedule(peak_lr, total_steps, warmup_steps),
        peak_lr,
    )


def run_loop(
    *,
    dp,
    config,
    workdir: str,
    ckpt: checkpoint.CheckpointManager,
    state: TrainState,
    train_step,
    batch_for_step,
    evaluate_fn,
    total_steps: int,
    schedule,
    stop_at_step: int | None,
) -> dict[str, Any]:
    """The shared loop (train/loop.py) with this config's logging, checkpoint and eval periods."""
    start_step = int(jax.device_get(dp.first(state.step)))
    writer = metrics.create_writer(workdir, is_main=jax.process_index() == 0)
    progress = metrics.Progress(
        total_steps,
        writer=writer,
        every_steps=config.log_every_steps,
        first_step=start_step,
        batch_size=config.batch_size,
    )
    settings = loop.LoopSettings(
        total_steps=total_steps,
        end_step=total_steps if stop_at_step is None else min(stop_at_step, total_steps),
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps,
        eval_every=config.eval_every_steps,
    )
    try:
        _, results = loop.run(
            state=state,
            start_step=start_step,
            settings=settings,
            train_step=train_step,
            batch_for_step=batch_for_step,
            first=dp.first,
            save=lambda step, state: ckpt.save(step, dp.unreplicate(state), force=True),
            evaluate=evaluate_fn,
            writer=writer,
            progress=progress,
            learning_rate=schedule,
            workdir=workdir,
            stop_on_nonfinite=config.nonfinite == "stop",
        )
    finally:
        ckpt.wait()
        ckpt.close()
    return results


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Fine-tune (or train from scratch), resuming from `workdir`; returns the final metrics.

    Results: the last training metrics ('loss', 'train_top1'), 'eval_top1', 'eval_top5',
    'eval_loss', 'eval_count' (the whole eval split), 'knn_top1' (when on), 'num_labeled', 'step'.
    """
    validate(config)
    run = None
    if config.init_checkpoint:
        run = encoder.read_run(config.init_checkpoint, field="config.init_checkpoint")
    config = resolve_model(config, "model", run)
    validation.check_model(config.model, config.dataset.image_size)
    mesh = parallel.make_mesh()
    dp = parallel.DataParallel(mesh, config.parallel.backend)
    parallel.check_divisible("batch_size", config.batch_size, mesh)
    parallel.check_divisible("eval_batch_size", config.eval_batch_size, mesh)

    data = load_data(config, mesh, channels=None if run is None else run.channels)
    steps_per_epoch, total_steps, schedule, peak_lr = schedule_for(config, data.num_examples)
    model = build_model(
        config.model,
        num_classes=data.num_classes,
        image_size=config.dataset.image_size,
        axis_name=DATA_AXIS,
        dtype=DTYPES[config.dtype],
    )

    ckpt = checkpoint.CheckpointManager(
        workdir,
        keep=config.keep_checkpoints,
        save_every=config.checkpoint_every_steps,
        config=config,
    )
    resuming = ckpt.latest_step() is not None
    variables = initial_variables(
        model, config.seed, config.dataset.image_size, data.channels, None if resuming else run
    )
    state = create_state(config.model, config.optim, variables, schedule)
    if resuming:
        state = ckpt.restore(state)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    state = dp.replicate(state)
    metrics.write_config(workdir, config)

    step_fn = make_train_step(model, config, precropped=data.precropped)
    train_step = dp.map(
        loop.guard_nonfinite(step_fn, skip=config.nonfinite == "skip"),
        sharded_args=(False, True),
        sharded_outputs=(False, False),
        donate_argnums=(0,),
    )
    logging.info(
        "Fine-tuning %d steps (%d per epoch) on %d labelled examples, batch %d on %d devices, "
        "peak lr %.4g, from %s",
        total_steps, steps_per_epoch, data.num_examples, config.batch_size, dp.num_replicas,
        peak_lr, config.init_checkpoint or "scratch",
    )  # fmt: skip
    results = run_loop(
        dp=dp,
        config=config,
        workdir=workdir,
        ckpt=ckpt,
        state=state,
        train_step=train_step,
        batch_for_step=data.batch_for_step,
        evaluate_fn=make_evaluate(dp, model, config, data),
        total_steps=total_steps,
        schedule=schedule,
        stop_at_step=stop_at_step,
    )
    results["num_labeled"] = data.num_examples
    metrics.write_results_json(workdir, results, results["step"])
    return results


if __name__ == "__main__":
    cli.run_stage(train_and_evaluate, "Fine-tuning")
