"""What gradient accumulation (config.accumulation_chunks) costs: the compiled pretraining step's
temporary memory for each chunk count, and the step time of some of them, timed in turns.

    python benchmarks/accumulation_cost.py [--config=configs/pretrain_fashion_mnist.py:demo]
        [--chunks=1,2,4,8,16] [--time=1,4] [--cpu_devices=N] [--rounds=5] [--steps=4]
        [--loop=auto|scan|unrolled] [--config.FIELD=VALUE ...]

Memory: XLA's memory_analysis() of the step the runner compiles (runner.map_step: guarded, state
donated), per device: temporaries (activations and workspace), arguments, outputs. Time: ROUNDS
rounds of STEPS steps of each --time chunk count in turn, so that a load that comes and goes on a
shared machine hits all alike; medians, and each one's ratio to the first.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_jax import parallel  # noqa: E402  (no JAX device is touched at import)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain_fashion_mnist.py"
config_flags.DEFINE_config_file("config", f"{DEMO_CONFIG}:demo", "Pretraining config.")
flags.DEFINE_list("chunks", ["1", "2", "4", "8", "16"], "Chunk counts to compile.")
flags.DEFINE_list("time", ["1", "4"], "Chunk counts to time (empty: memory only).")
flags.DEFINE_integer("cpu_devices", 0, "JAX CPU devices (0: one per core).")
flags.DEFINE_enum(
    "loop", "auto", ["auto", "scan", "unrolled"],
    "Pass 2's chunks: as the library does on this backend, in a lax.scan, or unrolled.",
)  # fmt: skip
flags.DEFINE_integer("rounds", 5, "Timing rounds.")
flags.DEFINE_integer("steps", 4, "Steps of each chunk count per round (after 2 warm-up steps).")
FLAGS = flags.FLAGS
MB = 2**20


def main(argv) -> None:
    del argv
    devices = parallel.use_cpu_devices(FLAGS.cpu_devices or None)
    import jax
    import numpy as np

    from simclr_jax import accumulation, pretrain
    from simclr_jax.train import runner

    if FLAGS.loop != "auto":
        accumulation.loops_unrolled = lambda: FLAGS.loop == "unrolled"

    config = FLAGS.config
    dp = parallel.DataParallel(parallel.make_mesh())
    rng = np.random.default_rng(0)
    size, batch_size = config.dataset.image_size, config.batch_size
    batch = jax.device_put(
        {"image": rng.integers(0, 256, (batch_size, size, size, 1), dtype=np.uint8),
         "label": rng.integers(0, 10, batch_size, dtype=np.int32)},
        dp.batch_sharding,
    )  # fmt: skip
    print(
        f"host={platform.machine()} cpus={os.cpu_count()} devices={devices} jax={jax.__version__} "
        f"load={os.getloadavg()[0]:.1f} batch={batch_size} per_device={batch_size // devices} "
        f"backbone={config.model.backbone} depth={config.model.depth} "
        f"base_width={config.model.base_width} image_size={size} "
        f"loop={FLAGS.loop}({'unrolled' if accumulation.loops_unrolled() else 'scan'})"
    )
    runs = {}
    for chunks in sorted({int(k) for k in FLAGS.chunks + FLAGS.time}):
        config.accumulation_chunks = chunks
        parallel.check_chunks("batch_size", batch_size, chunks, dp.mesh)
        model = pretrain.make_model(config, 10)
        state = dp.replicate(pretrain.init_state(model, config, 1, 0.1))
        step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=False)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        print(
            f"chunks={chunks} chunk_images={batch_size // devices // chunks} "
            f"temp_mb={memory.temp_size_in_bytes / MB:.1f} "
            f"argument_mb={memory.argument_size_in_bytes / MB:.1f} "
            f"output_mb={memory.output_size_in_bytes / MB:.1f} compile_s={seconds:.1f}",
            flush=True,
        )
        runs[chunks] = {"step": compiled, "state": state, "times": []}
    timed = [int(k) for k in FLAGS.time]
    for chunks in timed:  # warm-up
        for _ in range(2):
            runs[chunks]["state"], aux = runs[chunks]["step"](runs[chunks]["state"], batch)
        jax.block_until_ready(aux)
    for _ in range(FLAGS.rounds):
        for chunks in timed:
            run = runs[chunks]
            for _ in range(FLAGS.steps):
                start = time.perf_counter()
                run["state"], aux = run["step"](run["state"], batch)
                jax.block_until_ready(aux)
                run["times"].append(time.perf_counter() - start)
    for chunks in timed:
        median = statistics.median(runs[chunks]["times"])
        first = statistics.median(runs[timed[0]]["times"])
        print(
            f"chunks={chunks} median_step_ms={1e3 * median:.1f} vs_chunks_{timed[0]}="
            f"{median / first:.2f}x steps={len(runs[chunks]['times'])} "
            f"load={os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    app.run(main)
