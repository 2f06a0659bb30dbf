"""Run on 8 forced CPU devices: the pretraining step with the SimCLRv2 memory, 1 device vs 8.

    python tests/multidevice/memory_queue.py OUT.npz

Starts from a known, partly filled queue (so the first push wraps around), runs STEPS steps on one
device and on eight (shard_map) on the same global batches, and saves to OUT.npz what
tests/test_memory.py checks against NumPy: the 1-device state before and after the first step,
reference projections of that step from an unmapped model, and, per state field, the largest
difference between the runs and between the eight replicas' copies. Prints one JSON line of the
scalar results.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simclr_jax import losses, parallel, pretrain  # noqa: E402
from simclr_jax.configs import pretrain_fashion_mnist  # noqa: E402
from simclr_jax.data import augment  # noqa: E402
from simclr_jax.models import build_model  # noqa: E402

BATCH, QUEUE, FILLED, STEPS = 16, 40, 32, 3
FIELDS = ("queue", "pointer", "count", "ema_params", "ema_batch_stats")


def memory_config():
    config = pretrain_fashion_mnist.get_config("tiny")
    config.batch_size = BATCH
    config.memory.enabled = True
    config.memory.size = QUEUE
    config.memory.ema_decay = 0.9  # far from 1, so the EMA visibly moves in a few steps
    # The probe's clean rows are the global batch's every 2nd image on 1 device and on 8 (2 rows
    # each): clean_every must divide the per-device batch for that.
    config.probe.clean_every = 2
    return config


def start_state(model, config):
    """init_state's state with the queue's first FILLED rows holding known unit vectors."""
    state = pretrain.init_state(model, config, 1, 0.1)
    dim = state.memory.queue.shape[1]
    rows = np.random.default_rng(1).normal(size=(QUEUE, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[FILLED:] = 0.0
    memory = state.memory.replace(
        queue=jnp.asarray(rows), pointer=jnp.int32(FILLED), count=jnp.int32(FILLED)
    )
    return state.replace(memory=memory)


def batches():
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (BATCH, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (BATCH,), dtype=np.int32),
        }
        for _ in range(STEPS)
    ]


def run(model, config, state, data, devices):
    """STEPS steps; returns the states after each step and the per-step metrics."""
    dp = parallel.DataParallel(parallel.make_mesh(devices), "shard_map")
    step = dp.map(
        pretrain.make_train_step(model, config),
        sharded_args=(False, True),
        sharded_outputs=(False, False),
    )
    state, states, metrics = dp.replicate(state), [], []
    for batch in data:
        state, aux = step(state, jax.device_put(batch, dp.batch_sharding))
        states.append(state)
        metrics.append(jax.device_get(aux))
    return states, metrics


def reference_projections(config, state, batch):
    """Step 0's projections from an unmapped model: online (both views) and EMA (view b) keys."""
    model = build_model(
        config.model, num_classes=10, image_size=28, axis_name=None,
        classifier_stop_gradient=True, classifier_input_norm=config.probe.input_norm,
    )  # fmt: skip
    aug = config.augment
    view_a, view_b = augment.simclr_views(
        jax.random.fold_in(jax.random.key(config.seed), 0),
        jnp.asarray(batch["image"]),
        jnp.arange(BATCH),
        out_size=28,
        color_strength=aug.color_jitter_strength,
        use_blur=aug.use_blur,
        crop_min_area=aug.crop_min_area,
        flip=aug.flip,
    )

    @jax.jit
    def forward(params, batch_stats, ema_params, ema_batch_stats):
        online, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            jnp.concatenate([view_a, view_b]),
            train=True,
            mutable=["batch_stats"],
        )
        ema, updates = model.apply(
            {"params": ema_params, "batch_stats": ema_batch_stats},
            view_b,
            train=True,
            mutable=["batch_stats"],
        )
        z_a, z_b = jnp.split(online["projection"], 2)
        return z_a, z_b, losses.l2_normalize(ema["projection"]), updates["batch_stats"]

    m = state.memory
    return forward(state.params, state.batch_stats, m.ema_params, m.ema_batch_stats)


def max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def replica_spread(tree) -> float:
    """Largest difference between any device's copy of a replicated output and device 0's."""
    spreads = [
        max(float(np.max(np.abs(np.asarray(s.data) - np.asarray(x.addressable_shards[0].data))))
            for s in x.addressable_shards)
        for x in jax.tree.leaves(tree)
    ]  # fmt: skip
    return max(spreads)


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def main(out_path: str):
    config = memory_config()
    model = pretrain.make_model(config, 10)
    state, data = start_state(model, config), batches()
    one_states, one_metrics = run(model, config, state, data, jax.devices()[:1])
    eight_states, eight_metrics = run(model, config, state, data, jax.devices())
    z_a, z_b, keys, ema_stats = reference_projections(config, state, data[0])

    first = jax.device_get(one_states[0])
    arrays = {
        "before_queue": state.memory.queue,
        "after_queue": first.memory.queue,
        "z_a": z_a,
        "z_b": z_b,
        "keys": keys,
        "losses_one": np.array([m["contrastive_loss"] for m in one_metrics]),
        "losses_eight": np.array([m["contrastive_loss"] for m in eight_metrics]),
        **flat("before_params", state.params),
        **flat("after_params", first.params),
        **flat("after_ema_params", first.memory.ema_params),
        **flat("after_ema_batch_stats", first.memory.ema_batch_stats),
        **flat("reference_ema_batch_stats", ema_stats),
    }
    np.savez(out_path, **{k: np.asarray(v) for k, v in arrays.items()})

    def eight_vs_one(step: int) -> dict[str, float]:
        one, eight = jax.device_get((one_states[step], eight_states[step]))
        diffs = {f: max_diff(getattr(one.memory, f), getattr(eight.memory, f)) for f in FIELDS}
        return dict(diffs, params=max_diff(one.params, eight.params))

    last = eight_states[-1].memory
    report = {
        "devices": jax.device_count(),
        "batch": BATCH,
        "queue": QUEUE,
        "filled": FILLED,
        "temperature": config.loss.temperature,
        "decay": config.memory.ema_decay,
        "pointer": [int(s.memory.pointer) for s in one_states],
        "count": [int(s.memory.count) for s in one_states],
        "eight_vs_one_first": eight_vs_one(0),
        "eight_vs_one_last": eight_vs_one(-1),
        "replica_spread": {f: replica_spread(getattr(last, f)) for f in FIELDS},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
