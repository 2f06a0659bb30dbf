"""What gradient accumulation (config.accumulation_chunks) costs: the compiled pretraining step's
temporary memory for each chunk count, and the step time of some of them, timed in turns.

    python benchmarks/accumulation_cost.py [--config=configs/pretrain_fashion_mnist.py:demo]
        [--chunks=1,2,4,8,16] [--time=1,4] [--cpu_devices=N] [--rounds=5] [--steps=4]
        [--loop=auto|scan|unrolled] [--config.FIELD=VALUE ...]

Memory: XLA's memory_analysis() of the step the runner compiles (runner.map_step: guarded, state
donated), per device: temporaries (activations and workspace), arguments, outputs. Time: ROUNDS
rounds of STEPS steps of each --time variant in turn, so that a load that comes and goes on a
shared machine hits all alike; medians, and each one's ratio to the first. A variant is K (chunks
of the config's batch) or K@B (global batch B): `--time=1,2@512` compares the batch with twice
the batch in 2 chunks.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_jax import accumulation, parallel, pretrain  # noqa: E402  (no device touched)
from simclr_jax.train import runner  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain_fashion_mnist.py"
config_flags.DEFINE_config_file("config", f"{DEMO_CONFIG}:demo", "Pretraining config.")
flags.DEFINE_list(
    "chunks", ["1", "2", "4", "8", "16"], "Chunk counts to compile: K, or K@B for a global batch B."
)
flags.DEFINE_list("time", ["1", "4"], "Of those (or others), the ones to time; empty: none.")
flags.DEFINE_integer("cpu_devices", 0, "JAX CPU devices (0: one per core).")
flags.DEFINE_enum(
    "loop", "auto", ["auto", "scan", "unrolled"],
    "Pass 2's chunks: as the library does on this backend, in a lax.scan, or unrolled.",
)  # fmt: skip
flags.DEFINE_integer("rounds", 5, "Timing rounds.")
flags.DEFINE_integer("steps", 4, "Steps of each timed variant per round (after 2 warm-up steps).")
FLAGS = flags.FLAGS
MB = 2**20


def compile_variant(config, variant: str, dp: parallel.DataParallel, rng) -> dict:
    """Variant 'K' or 'K@B': the runner's step for it, compiled; prints its memory."""
    chunks, _, batch_size = variant.partition("@")
    config.accumulation_chunks = int(chunks)
    config.batch_size = int(batch_size or config.batch_size)
    parallel.check_chunks("batch_size", config.batch_size, config.accumulation_chunks, dp.mesh)
    size, n = config.dataset.image_size, config.batch_size
    batch = jax.device_put(
        {"image": rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8),
         "label": rng.integers(0, 10, n, dtype=np.int32)},
        dp.batch_sharding,
    )  # fmt: skip
    model = pretrain.make_model(config, 10)
    state = dp.replicate(pretrain.init_state(model, config, 1, 0.1))
    step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=False)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    print(
        f"variant={variant} batch={n} chunk_images={n // dp.num_replicas // int(chunks)} "
        f"temp_mb={memory.temp_size_in_bytes / MB:.1f} "
        f"argument_mb={memory.argument_size_in_bytes / MB:.1f} "
        f"output_mb={memory.output_size_in_bytes / MB:.1f} compile_s={seconds:.1f}",
        flush=True,
    )
    return {"step": compiled, "state": state, "batch": batch, "times": []}


def time_in_turns(runs: list[dict]) -> None:
    """Two warm-up steps each, then ROUNDS rounds of STEPS steps of each run in turn."""
    for run in runs * 2:
        run["state"], aux = run["step"](run["state"], run["batch"])
        jax.block_until_ready(aux)
    for _ in range(FLAGS.rounds):
        for run in runs:
            for _ in range(FLAGS.steps):
                start = time.perf_counter()
                run["state"], aux = run["step"](run["state"], run["batch"])
                jax.block_until_ready(aux)
                run["times"].append(time.perf_counter() - start)


def main(argv) -> None:
    del argv
    devices = parallel.use_cpu_devices(FLAGS.cpu_devices or None)
    loop = contextlib.nullcontext()
    if FLAGS.loop != "auto":
        loop = accumulation.unrolled_loops(FLAGS.loop == "unrolled")
    config = FLAGS.config
    print(
        f"host={platform.machine()} cpus={os.cpu_count()} devices={devices} jax={jax.__version__} "
        f"load={os.getloadavg()[0]:.1f} batch={config.batch_size} "
        f"backbone={config.model.backbone} depth={config.model.depth} "
        f"base_width={config.model.base_width} image_size={config.dataset.image_size} "
        f"loop={FLAGS.loop}"
    )
    dp, rng = parallel.DataParallel(parallel.make_mesh()), np.random.default_rng(0)
    default_batch = config.batch_size
    runs = {}
    with loop:  # traced (and compiled) inside
        print(f"unrolled={accumulation.loops_unrolled()}")
        for variant in dict.fromkeys(FLAGS.chunks + FLAGS.time):
            config.batch_size = default_batch
            runs[variant] = compile_variant(config, variant, dp, rng)
    time_in_turns([runs[variant] for variant in FLAGS.time])
    first = statistics.median(runs[FLAGS.time[0]]["times"]) if FLAGS.time else 0.0
    for variant in FLAGS.time:
        median = statistics.median(runs[variant]["times"])
        print(
            f"variant={variant} median_step_ms={1e3 * median:.1f} vs_{FLAGS.time[0]}="
            f"{median / first:.2f}x steps={len(runs[variant]['times'])} "
            f"load={os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    app.run(main)
