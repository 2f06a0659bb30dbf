"""Run on 8 forced CPU devices: every stage's train step on 1 device vs 8 (shard_map and pmap).

The steps are the trainers' own (pretrain.make_view_gradient_fn and the views; finetune's and
distill's make_train_step mapped by runner.map_step, as the runner maps them), on the tiny presets'
convnet.
Prints one JSON line: {kind: {backend: {quantity: largest absolute difference from the
single-device step}}, 'scale': {kind: {quantity: largest magnitude on one device}}} for the kinds
'pretrain', 'finetune' and 'distill' and the quantities 'metrics', 'batch_stats', 'params' (after
the update), 'update' (params after minus before) and, for pretraining, 'grads'. The backend
'forgot_pmean' is shard_map with parallel.replica_mean (the steps' one average over replicas)
replaced by the identity: the comparison must catch it.
"""

import json
import os

# The test process's XLA flags (tests/devices.py: the cheap compile pipeline) + 8 devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from simclr_jax import distill as distill_stage  # noqa: E402
from simclr_jax import finetune, parallel, pretrain, saved_run  # noqa: E402
from simclr_jax.configs import (  # noqa: E402
    distill_fashion_mnist,
    finetune_fashion_mnist,
    pretrain_fashion_mnist,
)
from simclr_jax.data import views  # noqa: E402
from simclr_jax.models import (  # noqa: E402
    ARCHITECTURE_FIELDS,
    build_for_run,
    build_model,
    init_variables,  # noqa: E402
)
from simclr_jax.train import runner  # noqa: E402
from simclr_jax.train.update import fine_tune_state  # noqa: E402

BATCH = 16
BACKENDS = ("shard_map", "pmap", "forgot_pmean")


def max_abs(tree) -> float:
    return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


def max_diff(a, b) -> float:
    return max_abs(jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, b))


def images(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def tiny_architecture(model_config) -> None:
    """The pretraining 'tiny' network (the convnet at base width 2, 2 head layers to 16)."""
    tiny = pretrain_fashion_mnist.get_config("tiny").model
    for name in ARCHITECTURE_FIELDS:
        model_config[name] = tiny[name]


def pretrain_case(rng):
    """Gradients and the LARS update in one program: the step's pieces, outputs named."""
    config = pretrain_fashion_mnist.get_config("tiny")
    model = pretrain.make_model(config, 10)
    state = pretrain.init_state(model, config, 1, 0.5)
    gradients = pretrain.make_view_gradient_fn(model, config)

    def fn(state, batch):
        view_a, view_b = views.contrastive_views(config, state.step, batch["image"])
        grads, aux, stats = gradients(state, view_a, view_b, batch["label"])
        new = state.apply_gradients(grads, stats)
        return {"grads": grads, "metrics": aux, "batch_stats": stats, "params": new.params}

    batch = {"image": images(rng, BATCH), "label": rng.integers(0, 10, BATCH, dtype=np.int32)}
    return fn, state, (), batch, None


def finetune_case(rng):
    """From head layer 1 with the stem and block group 1 frozen (frozen BN statistics kept)."""
    config = finetune_fashion_mnist.get_config("tiny_supervised")
    tiny_architecture(config.model)
    config.model.fine_tune_after_block, config.model.ft_proj_selector = 1, 1
    config = saved_run.resolve_model(config, "model", None)
    model = build_for_run(config, config.model, 10)
    variables = saved_run.initial_variables(model, config.seed, 28, 1, None)
    state = fine_tune_state(config.model, config.optim, variables, 0.5)
    batch = {"image": images(rng, BATCH), "label": rng.integers(0, 10, BATCH, dtype=np.int32)}
    return finetune.make_train_step(model, config), state, (), batch, config


def distill_case(rng):
    """Self-distillation with a labelled batch too (alpha 0.5), from a random teacher."""
    config = distill_fashion_mnist.get_config("tiny")
    tiny_architecture(config.student.model)
    config.alpha, config.labeled_batch_size = 0.5, 8
    config = saved_run.resolve_model(config, "student.model", None)
    student = build_for_run(config, config.student.model, 10)
    teacher = build_model(config.student.model, num_classes=10, image_size=28)  # no collectives
    teacher_variables = init_variables(teacher, seed=1, image_size=28, channels=1)
    variables = saved_run.initial_variables(student, config.seed, 28, 1, None)
    state = fine_tune_state(config.student.model, config.optim, variables, 0.5)
    batch = {
        "image": images(rng, BATCH),
        "labeled_image": images(rng, 8),
        "label": rng.integers(0, 10, 8, dtype=np.int32),
    }
    step = distill_stage.make_train_step(student, teacher, config, with_labels=True)
    return step, state, (teacher_variables,), batch, config


def run(case, devices, backend: str) -> dict:
    fn, state, replicated, batch, config = case
    state = jax.device_get(state)  # host copies: every run places (and donates) its own
    dp = parallel.DataParallel(parallel.make_mesh(devices), backend)
    inputs = [dp.replicate(x) for x in replicated]
    if config is None:  # a function of (state, batch) whose outputs are all replicated
        mapped = dp.map(fn, sharded_args=(False, True), sharded_outputs=False)
        out = mapped(dp.replicate(state), jax.device_put(batch, dp.batch_sharding))
        out = jax.device_get(dp.first(out))
    else:  # the trainer's step, mapped as the runner maps it
        mapped = runner.map_step(dp, fn, skip_nonfinite=False, num_replicated=len(replicated))
        new, aux = mapped(dp.replicate(state), *inputs, jax.device_put(batch, dp.batch_sharding))
        out = jax.device_get(
            {"metrics": dp.first(aux), "batch_stats": dp.first(new.batch_stats),
             "params": dp.first(new.params)}
        )  # fmt: skip
    out["update"] = jax.tree.map(lambda a, b: a - np.asarray(b), out["params"], state.params)
    return out


def forgetting_the_average(case, devices) -> dict:
    """The 8-device step built with parallel.replica_mean as the identity (no pmean at all)."""
    kept = parallel.replica_mean
    parallel.replica_mean = lambda tree: tree
    try:
        return run(case, devices, "shard_map")
    finally:
        parallel.replica_mean = kept


def main():
    report = {"devices": jax.device_count(), "scale": {}}
    for kind, make in (("pretrain", pretrain_case), ("finetune", finetune_case),
                       ("distill", distill_case)):  # fmt: skip
        case = make(np.random.default_rng(0))
        reference = run(case, jax.devices()[:1], "shard_map")
        results = {backend: run(case, jax.devices(), backend) for backend in BACKENDS[:2]}
        results["forgot_pmean"] = forgetting_the_average(case, jax.devices())
        report[kind] = {
            backend: {key: max_diff(reference[key], got[key]) for key in reference}
            for backend, got in results.items()
        }
        report["scale"][kind] = {key: max_abs(value) for key, value in reference.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
