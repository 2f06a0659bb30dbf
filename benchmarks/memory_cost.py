"""Cost of the SimCLRv2 memory on CPU: median step time and bytes, memory off vs queue 4096/65536.

    JAX_PLATFORMS=cpu python benchmarks/memory_cost.py   (from the repository root)

Tiny model (ResNet-18, base width 4, 2-layer head to D=128), Fashion-MNIST-sized uint8 input
(28x28x1), global batch 64, one CPU device, the library's train step (state donated). Timing is
round-robin (ROUNDS x STEPS steps of each variant in turn) so load changes hit all variants.
"""

import platform
import statistics
import time

import jax
import numpy as np

from simclr_jax import parallel, pretrain
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.train import runner

BATCH, DIM, WARMUP, ROUNDS, STEPS = 64, 128, 3, 5, 6
VARIANTS = {"off": 0, "queue_4096": 4096, "queue_65536": 65536}


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def main():
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.integers(0, 256, (BATCH, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (BATCH,), dtype=np.int32),
        },
        dp.batch_sharding,
    )
    runs = {}
    for name, size in VARIANTS.items():
        config = pretrain_fashion_mnist.get_config("tiny")
        config.batch_size, config.model.proj_out_dim = BATCH, DIM
        config.memory.enabled, config.memory.size = size > 0, max(size, BATCH)
        model = pretrain.make_model(config, 10)
        state = dp.replicate(pretrain.init_state(model, config, 1, 0.1))
        step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=False)
        compiled = step.lower(state, batch).compile()
        analysis = compiled.memory_analysis()
        for _ in range(WARMUP):
            state, aux = step(state, batch)
        jax.block_until_ready(state)
        extra = nbytes(state.memory) if size else 0
        queue = nbytes(state.memory.queue) if size else 0
        runs[name] = dict(step=step, state=state, times=[], state_bytes=nbytes(state),
                          memory_bytes=extra, queue_bytes=queue,
                          temp_bytes=getattr(analysis, "temp_size_in_bytes", -1))  # fmt: skip
    for _ in range(ROUNDS):
        for run in runs.values():
            for _ in range(STEPS):
                start = time.perf_counter()
                run["state"], aux = run["step"](run["state"], batch)
                jax.block_until_ready(aux)
                run["times"].append(time.perf_counter() - start)
    print(
        f"host={platform.processor() or platform.machine()} cpus={__import__('os').cpu_count()} "
        f"jax={jax.__version__} device={jax.devices()[0].device_kind} batch={BATCH} D={DIM}"
    )
    base = statistics.median(runs["off"]["times"])
    for name, run in runs.items():
        median = statistics.median(run["times"])
        print(
            f"variant={name} median_step_ms={1e3 * median:.1f} vs_off={median / base:.2f}x "
            f"state_bytes={run['state_bytes']} memory_bytes={run['memory_bytes']} "
            f"queue_bytes={run['queue_bytes']} xla_temp_bytes={run['temp_bytes']}"
        )


if __name__ == "__main__":
    main()
