"""Run on 4 forced CPU devices: gradient accumulation (config.accumulation_chunks) against references.

    python tests/multidevice/accumulation.py exact|steps

Two groups of cases ('exact': the first two below, 'steps': the others), run as two processes side
by side. Each prints one JSON line for tests/test_accumulation.py: {case: {quantity: largest
absolute difference}} and, under 'scale', {case: {quantity: largest magnitude}}. The cases:

* 'bn_free/<d>dev/K<k>': a network without BatchNorm, the accumulated step's loss and gradients on
  d devices in k chunks, against one jax.grad of the whole batch on one device. 'plain/K<k>': plain
  accumulation (each chunk's NT-Xent with its own negatives, gradients averaged) against the same
  reference: the comparison must reject it.
* 'ghost_bn/<d>dev/K<k>': the SimCLR network (convnet, global BatchNorm in training mode, the probe
  on the views) against one jax.grad of the whole batch whose network runs on each chunk group
  separately (chunk c of every replica: what BN normalises together), written here without
  simclr_jax.accumulation.
* 'step': one whole pretraining step with the memory queue and the clean-image probe in 2 chunks
  on 2 devices, against the one-pass step (K=1) on 4 devices with per-device BatchNorm
  (model.global_bn=False), whose devices normalise what the chunks hold: the new states.
* 'finetune', 'distill': the same comparison for their steps (plain accumulation), 1 vs 2 devices.

Pass 2 runs as the library runs it on the CPU (unrolled), except in 'ghost_bn' and 'finetune': in
a lax.scan, as on accelerators (accumulation.unrolled_loops(False)).
"""

import json
import os
import sys

# The test process's XLA flags (tests/devices.py: the cheap compile pipeline) + 4 devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from simclr_jax import accumulation, losses, parallel, pretrain, saved_run  # noqa: E402
from simclr_jax import distill as distill_stage  # noqa: E402
from simclr_jax import finetune as finetune_stage  # noqa: E402
from simclr_jax.configs import (  # noqa: E402
    distill_fashion_mnist,
    finetune_fashion_mnist,
    pretrain_fashion_mnist,
)
from simclr_jax.data import augment  # noqa: E402
from simclr_jax.models import (  # noqa: E402
    ARCHITECTURE_FIELDS,
    build_for_run,
    build_model,
    init_variables,  # noqa: E402
)
from simclr_jax.train import runner  # noqa: E402
from simclr_jax.train.state import TrainState  # noqa: E402
from simclr_jax.train.update import fine_tune_state  # noqa: E402

BATCH, QUEUE, FILLED = 16, 40, 32


def max_abs(tree) -> float:
    return max((float(np.max(np.abs(x))) for x in jax.tree.leaves(tree)), default=0.0)


def max_diff(a, b) -> float:
    return max_abs(jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y), a, b))


def pretrain_config(chunks: int, clean_every: int, global_bn: bool = True):
    """The tiny preset on the 4-conv convnet (it compiles in a fraction of the ResNet's time)."""
    config = pretrain_fashion_mnist.get_config("tiny")
    config.model.backbone, config.model.depth = "convnet", 4
    config.batch_size, config.accumulation_chunks = BATCH, chunks
    config.probe.clean_every, config.model.global_bn = clean_every, global_bn
    return config


def batch_of(seed: int, n: int = BATCH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, n, dtype=np.int32)}  # fmt: skip


def mesh_of(devices: int) -> parallel.DataParallel:
    return parallel.DataParallel(parallel.make_mesh(jax.devices()[:devices]), "shard_map")


# ----------------------------------------------------------------------------- the references


class NoBatchNorm(nn.Module):
    """SimCLRModel's outputs without any BatchNorm: features, a 2-layer head, a stop-gradient probe."""

    @nn.compact
    def __call__(self, images, *, train):
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="encoder")(images))
        features = jnp.mean(x, axis=(1, 2))
        hidden = nn.relu(nn.Dense(16, name="head_0")(features))
        logits = nn.Dense(10, name="classifier")(jax.lax.stop_gradient(features))
        return {"projection": nn.Dense(8, name="head_1")(hidden), "logits": logits}


def reference_views(config, images):
    """Step 0's two views of the global batch, from augment directly (global ids 0..N-1)."""
    aug = config.augment
    return augment.simclr_views(
        jax.random.fold_in(jax.random.key(config.seed), 0), jnp.asarray(images),
        jnp.arange(len(images)), out_size=28, color_strength=aug.color_jitter_strength,
        use_blur=aug.use_blur, crop_min_area=aug.crop_min_area, flip=aug.flip,
        brightness=aug.brightness,
    )  # fmt: skip


def chunk_groups(devices: int, chunks: int) -> list[np.ndarray]:
    """Global rows of chunk c on every replica, for each c: the rows BN normalises together."""
    local = BATCH // devices
    size = local // chunks
    return [np.concatenate([r * local + c * size + np.arange(size) for r in range(devices)])
            for c in range(chunks)]  # fmt: skip


def clean_rows(devices: int, every: int) -> np.ndarray:
    """The probe's clean rows: every `every`-th row of each replica's part (views.probe_inputs)."""
    local = BATCH // devices
    return np.concatenate([r * local + np.arange(0, local, every) for r in range(devices)])


def grouped_loss(model, config, groups, probe_rows):
    """The one-pass objective on one device, the network run on each group of rows separately:
    NT-Xent over the whole batch plus the probe's cross-entropy (on the views' logits, or on the
    clean `probe_rows` in inference mode); aux: (NT-Xent, probe loss, mean of the groups' BN
    statistics)."""
    inverse = np.argsort(np.concatenate(groups))

    def loss(params, batch_stats, view_a, view_b, images, labels):
        variables = {"params": params, "batch_stats": batch_stats}
        outs, stats = [], []
        for rows in groups:
            pair = jnp.concatenate([view_a[rows], view_b[rows]])
            out, updates = model.apply(variables, pair, train=True, mutable=["batch_stats"])
            outs.append(out)
            stats.append(updates.get("batch_stats", {}))

        def rows_of(name, view):  # [N, ...] in global row order, view 0 (a) or 1 (b)
            halves = [jnp.split(out[name], 2)[view] for out in outs]
            return jnp.concatenate(halves)[inverse]

        z_a, z_b = rows_of("projection", 0), rows_of("projection", 1)
        contrastive, _ = losses.nt_xent(z_a, z_b, temperature=config.loss.temperature)
        if probe_rows is None:
            logits = jnp.concatenate([rows_of("logits", 0), rows_of("logits", 1)])
            probe = losses.softmax_cross_entropy(logits, jnp.concatenate([labels, labels]))
        else:
            clean = augment.eval_preprocess(images[probe_rows], out_size=28)
            logits = model.apply(variables, clean, train=False)["logits"]
            probe = losses.softmax_cross_entropy(logits, labels[probe_rows])
        mean_stats = jax.tree.map(lambda *xs: sum(xs) / len(xs), *stats)
        return contrastive + probe, (contrastive, probe, mean_stats)

    return loss


def reference_gradients(model, config, state, batch, groups, probe_rows):
    """jax.grad of grouped_loss: one backward pass over the whole batch."""
    view_a, view_b = reference_views(config, batch["image"])
    loss = grouped_loss(model, config, groups, probe_rows)
    grad = jax.jit(jax.grad(loss, has_aux=True))
    grads, (contrastive, probe, stats) = grad(
        state.params, state.batch_stats, view_a, view_b, batch["image"], batch["label"]
    )
    return {"grads": grads, "contrastive_loss": contrastive, "probe_loss": probe,
            "batch_stats": stats}  # fmt: skip


def accumulated_gradients(model, config, state, batch, devices):
    """The accumulated gradients as a step computes them, mapped over `devices`."""
    dp = mesh_of(devices)
    gradients = accumulation.make_gradient_fn(model, config)

    def fn(state, batch):
        grads, aux, stats, _ = gradients(state, batch)
        return {"grads": grads, "contrastive_loss": aux["contrastive_loss"],
                "probe_loss": aux["probe_loss"], "batch_stats": stats}  # fmt: skip

    mapped = dp.map(fn, sharded_args=(False, True), sharded_outputs=False)
    return jax.device_get(mapped(dp.replicate(state), jax.device_put(batch, dp.batch_sharding)))


def compare(reference, got) -> dict[str, float]:
    diffs = {key: max_diff(reference[key], got[key]) for key in got}
    encoder = lambda grads: {k: v for k, v in grads.items() if k != "classifier"}  # noqa: E731
    diffs["encoder_grads"] = max_diff(encoder(reference["grads"]), encoder(got["grads"]))
    return diffs


def scales(reference) -> dict[str, float]:
    return {key: max_abs(value) for key, value in reference.items()}


# ----------------------------------------------------------------------------- the cases


def bn_free_cases(report):
    """Exactness without BatchNorm, and plain accumulation caught (clean probe rows padded)."""
    every = 3  # divides no chunk: the probe's clean rows are padded to a multiple of K
    model = NoBatchNorm()
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=True)["params"]
    state = TrainState.create(params=params, batch_stats={}, tx=optax.sgd(0.1))
    batch = batch_of(1)
    config = pretrain_config(1, every)
    everything = [np.arange(BATCH)]
    for devices in (1, 2):
        reference = reference_gradients(
            model, config, state, batch, everything, clean_rows(devices, every)
        )
        for chunks in (1, 2, 4):
            got = accumulated_gradients(
                model, pretrain_config(chunks, every), state, batch, devices
            )
            report[f"bn_free/{devices}dev/K{chunks}"] = compare(reference, got)
        report["scale"][f"bn_free/{devices}dev"] = scales(reference)
    full = reference_gradients(model, config, state, batch, everything, None)
    for chunks in (2, 4):
        report[f"plain/K{chunks}"] = compare(
            full, plain_gradients(model, config, state, batch, chunks)
        )
    report["scale"]["plain"] = scales(full)


def plain_gradients(model, config, state, batch, chunks):
    """Plain accumulation on one device: each chunk a small batch of its own (NT-Xent with its own
    negatives; the probe on the views, whose mean over examples is exact), gradients averaged."""
    view_a, view_b = reference_views(config, batch["image"])
    loss = grouped_loss(model, config, [np.arange(BATCH // chunks)], None)

    def mean_loss(params):
        images, labels = batch["image"], batch["label"]
        chunk_losses = [loss(params, {}, view_a[r], view_b[r], images[r], labels[r])[0]
                        for r in chunk_groups(1, chunks)]  # fmt: skip
        return sum(chunk_losses) / chunks

    return {"grads": jax.jit(jax.grad(mean_loss))(state.params)}


def ghost_bn_cases(report):
    """Training-mode global BN: chunks equal a full batch whose BN normalises each chunk group."""
    batch = batch_of(2)
    for devices, chunks in ((1, 4), (2, 2)):
        config = pretrain_config(chunks, 0)
        model = pretrain.make_model(config, 10)
        state = jax.device_get(pretrain.init_state(model, config, 1, 0.1))
        unmapped = build_model(
            config.model, num_classes=10, image_size=28, axis_name=None,
            classifier_stop_gradient=True, classifier_input_norm=config.probe.input_norm,
        )  # fmt: skip
        groups = chunk_groups(devices, chunks)
        reference = reference_gradients(unmapped, config, state, batch, groups, None)
        with accumulation.unrolled_loops(False):
            got = accumulated_gradients(model, config, state, batch, devices)
        key = f"ghost_bn/{devices}dev/K{chunks}"
        report[key], report["scale"][key] = compare(reference, got), scales(reference)


def step_state(new, aux) -> dict:
    fields = {"params": new.params, "batch_stats": new.batch_stats, "opt_state": new.opt_state,
              "metrics": aux}  # fmt: skip
    if hasattr(new, "memory"):
        fields["memory"] = new.memory
    return jax.device_get(fields)


def run_step(step, state, batch, devices, replicated=()):
    dp = mesh_of(devices)
    mapped = runner.map_step(dp, step, skip_nonfinite=False, num_replicated=len(replicated))
    inputs = [dp.replicate(x) for x in replicated]
    new, aux = mapped(dp.replicate(state), *inputs, jax.device_put(batch, dp.batch_sharding))
    return step_state(dp.first(new), dp.first(aux))


def memory_step_case(report):
    """A whole step with the memory (a partly filled queue: the push wraps) and the clean probe:
    2 chunks on 2 devices against the one-pass step on 4 devices, both with per-device BN."""
    batch, results = batch_of(3), {}
    for chunks, devices in ((2, 2), (1, 4)):
        config = pretrain_config(chunks, 2, global_bn=False)
        config.memory.enabled, config.memory.size, config.memory.ema_decay = True, QUEUE, 0.9
        model = pretrain.make_model(config, 10)
        state = jax.device_get(pretrain.init_state(model, config, 1, 0.5))
        rows = np.random.default_rng(4).normal(size=state.memory.queue.shape)
        rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
        rows[FILLED:] = 0.0
        bank = state.memory.replace(
            queue=jnp.asarray(rows), pointer=jnp.int32(FILLED), count=jnp.int32(FILLED)
        )
        state = state.replace(memory=bank)
        results[chunks] = run_step(pretrain.make_train_step(model, config), state, batch, devices)
    report["step"] = {name: max_diff(results[1][name], results[2][name]) for name in results[1]}
    report["scale"]["step"] = {name: max_abs(value) for name, value in results[1].items()}
    report["scale"]["step"]["update"] = max_diff(results[1]["params"], state.params)


def tiny_convnet(model_config) -> None:
    tiny = pretrain_fashion_mnist.get_config("tiny").model
    for name in ARCHITECTURE_FIELDS:
        model_config[name] = tiny[name]
    model_config.backbone, model_config.depth = "convnet", 4
    model_config.global_bn = False


def finetune_run(chunks, devices):
    config = finetune_fashion_mnist.get_config("tiny_supervised")
    tiny_convnet(config.model)
    config.model.fine_tune_after_block, config.model.ft_proj_selector = 1, 1
    config.accumulation_chunks = chunks
    config = saved_run.resolve_model(config, "model", None)
    model = build_for_run(config, config.model, 10)
    variables = saved_run.initial_variables(model, config.seed, 28, 1, None)
    state = jax.device_get(fine_tune_state(config.model, config.optim, variables, 0.5))
    step = finetune_stage.make_train_step(model, config)
    return run_step(step, state, batch_of(5), devices), state.params


def distill_run(chunks, devices):
    config = distill_fashion_mnist.get_config("tiny")
    tiny_convnet(config.student.model)
    config.alpha, config.labeled_batch_size, config.accumulation_chunks = 0.5, 8, chunks
    config = saved_run.resolve_model(config, "student.model", None)
    student = build_for_run(config, config.student.model, 10)
    teacher = build_model(config.student.model, num_classes=10, image_size=28)  # no collectives
    teacher_variables = init_variables(teacher, seed=1, image_size=28, channels=1)
    variables = saved_run.initial_variables(student, config.seed, 28, 1, None)
    state = jax.device_get(fine_tune_state(config.student.model, config.optim, variables, 0.5))
    labelled = batch_of(7, 8)
    batch = {"image": batch_of(6)["image"], "labeled_image": labelled["image"],
             "label": labelled["label"]}  # fmt: skip
    step = distill_stage.make_train_step(student, teacher, config, with_labels=True)
    return run_step(step, state, batch, devices, (teacher_variables,)), state.params


def supervised_cases(report):
    for name, run in (("finetune", finetune_run), ("distill", distill_run)):
        one_pass, before = run(1, 2)
        with accumulation.unrolled_loops(name == "distill"):
            chunked, _ = run(2, 1)
        report[name] = {key: max_diff(one_pass[key], chunked[key]) for key in one_pass}
        report["scale"][name] = {key: max_abs(value) for key, value in one_pass.items()}
        report["scale"][name]["update"] = max_diff(one_pass["params"], before)


GROUPS = {"exact": (bn_free_cases, ghost_bn_cases), "steps": (memory_step_case, supervised_cases)}


def main(group: str):
    report = {"devices": jax.device_count(), "scale": {}}
    for case in GROUPS[group]:
        case(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
