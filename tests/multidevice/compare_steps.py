"""Run on 8 forced CPU devices: the pretraining step on 1 device vs 8 (shard_map and pmap).

Prints one JSON line: for every backend, the largest absolute difference from the single-device step in
the loss and metrics, the averaged gradients, the new BN statistics and the LARS-updated parameters.
"""

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from simclr_jax import parallel, pretrain  # noqa: E402
from simclr_jax.configs import pretrain_fashion_mnist  # noqa: E402
from simclr_jax.models import build_model, init_variables  # noqa: E402
from simclr_jax.optim import make_optimizer  # noqa: E402
from simclr_jax.train.state import TrainState  # noqa: E402


def max_diff(a, b) -> float:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
    return max(leaves)


def main():
    config = pretrain_fashion_mnist.get_config("tiny")
    batch_size = 16
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, (batch_size,), dtype=np.int32),
    }
    model = build_model(
        config.model, num_classes=10, image_size=28, axis_name="data", classifier_stop_gradient=True
    )
    variables = init_variables(model, seed=0, image_size=28, channels=1)
    tx = make_optimizer(config.optim, variables["params"], learning_rate=0.5)
    state = TrainState.create(
        params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )

    def run(devices, backend):
        dp = parallel.DataParallel(parallel.make_mesh(devices), backend)
        global_batch = jax.device_put(batch, dp.batch_sharding)
        gradients = pretrain.make_gradient_fn(model, config)

        def step_with_grads(state, batch):  # one program: the gradients and the LARS update
            grads, aux, stats = gradients(state, batch)
            return state.apply_gradients(grads, stats), grads, aux, stats

        step_fn = dp.map(
            step_with_grads,
            sharded_args=(False, True),
            sharded_outputs=(False, False, False, False),
        )
        new_state, grads, aux, stats = dp.first(step_fn(dp.replicate(state), global_batch))
        return jax.device_get(
            {"metrics": aux, "grads": grads, "batch_stats": stats, "params": new_state.params}
        )

    reference = run(jax.devices()[:1], "shard_map")
    report = {"devices": jax.device_count()}
    for backend in ("shard_map", "pmap"):
        result = run(jax.devices(), backend)
        report[backend] = {key: max_diff(reference[key], result[key]) for key in reference}
    # Scale of the quantities, so a test can tell "equal" from "both zero".
    report["scale"] = {
        "grads": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(reference["grads"])),
        "loss": float(reference["metrics"]["loss"]),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
