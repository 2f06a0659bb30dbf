"""How well the pretraining step uses a CPU: XLA's FLOPs per second against the machine's matmul rate.

    python benchmarks/cpu_efficiency.py [--config=configs/pretrain_fashion_mnist.py:demo]
        [--cpu_devices=N] [--steps=8] [--layers] [--config.FIELD=VALUE ...]

Prints one line, `step_gflops_per_s=... matmul_gflops_per_s=... ratio=...`, where the step's rate is
XLA's FLOP count of the compiled pretraining step (augmentation, network, NT-Xent, optimizer; all
devices) over its median wall time, and the matmul rate is that of a 1024x1024 fp32 matmul on one
device (which XLA spreads over every core). The two are timed in turns in the same run, so a load
that comes and goes on a shared machine affects both alike.

--layers adds where the time goes: every convolution of the network at the batch one device sees,
its forward pass, input gradient (dX) and weight gradient (dW) timed alone, in ms and GFLOP/s.
--cpu_devices splits the CPU into that many JAX devices (default: one per core), as the demo does.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_jax import parallel  # noqa: E402  (no JAX device is touched at import)

DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain_fashion_mnist.py")
config_flags.DEFINE_config_file("config", f"{DEMO_CONFIG}:demo", "Pretraining config.")
flags.DEFINE_integer("cpu_devices", 0, "JAX CPU devices (0: one per core).")
flags.DEFINE_integer("steps", 8, "Timed steps (after two warm-up steps).")
flags.DEFINE_integer("matmuls_per_step", 3, "Matmul timings after each step.")
flags.DEFINE_bool("layers", False, "Also time every convolution's forward, dX and dW.")
FLAGS = flags.FLAGS

MATMUL_SIDE = 1024


def matmul_seconds(jax, jnp):
    """A function timing one 1024^2 fp32 matmul on the default device: (wall, CPU) seconds."""
    a = jnp.ones((MATMUL_SIDE, MATMUL_SIDE), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()

    def seconds() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        matmul(a).block_until_ready()
        return time.perf_counter() - start, time.process_time() - cpu

    return seconds


def total_flops(compiled, num_devices: int) -> float:
    """XLA's FLOP count of a compiled step over all devices (a shard_map program is per device)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"]) * num_devices


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    name: str
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, int]
    padding: object


def conv_layers(model, variables, images) -> list[ConvLayer]:
    """Every nn.Conv of the model with the input it sees (shapes only: nothing is computed)."""
    import flax.linen as nn
    import jax

    found: list[ConvLayer] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            x = args[0]
            kernel = (*module.kernel_size, x.shape[-1], module.features)
            strides = module.strides if module.strides is not None else 1
            strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            path = "/".join(module.scope.path)
            found.append(ConvLayer(path, tuple(x.shape), kernel, strides, module.padding))
        return next_fun(*args, **kwargs)

    def forward(variables, images):  # inference mode: the same shapes, no cross-replica BN
        with nn.intercept_methods(record):
            return model.apply(variables, images, train=False)

    jax.eval_shape(forward, variables, images)
    return found


def time_layers(layers: list[ConvLayer], seconds_of) -> None:
    """Forward, dX and dW of each layer alone, on one device."""
    import jax
    import jax.numpy as jnp

    print(
        f"{'layer':44s} {'input':>18s} {'kernel':>16s} {'GFLOP':>7s}   fwd / dX / dW ms (GFLOP/s)"
    )
    totals = [0.0, 0.0, 0.0]
    for layer in layers:
        x = jnp.ones(layer.input_shape, jnp.float32)
        w = jnp.ones(layer.kernel_shape, jnp.float32) * 0.01
        padding = layer.padding
        if not isinstance(padding, str):
            padding = tuple(tuple(p) for p in padding)

        def conv(x, w, padding=padding, layer=layer):
            return jax.lax.conv_general_dilated(
                x, w, layer.strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        y = jax.eval_shape(conv, x, w)
        dy = jnp.ones(y.shape, jnp.float32)
        flops = 2.0 * y.shape[0] * y.shape[1] * y.shape[2] * y.shape[3]
        flops *= layer.kernel_shape[0] * layer.kernel_shape[1] * layer.kernel_shape[2]
        passes = [
            (jax.jit(conv), (x, w)),
            (jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0]), (x, w, dy)),
            (jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1]), (x, w, dy)),
        ]
        cells = []
        for k, (fn, args) in enumerate(passes):
            seconds = seconds_of(fn, args)
            totals[k] += seconds
            cells.append(f"{1000 * seconds:6.1f} ({flops / seconds / 1e9:5.1f})")
        print(
            f"{layer.name:44s} {str(layer.input_shape[1:]):>18s} {str(layer.kernel_shape):>16s} "
            f"{flops / 1e9:7.3f}   " + " / ".join(cells)
        )
    print(
        "all convolutions: fwd / dX / dW = " + " / ".join(f"{1000 * t:.1f}" for t in totals) + " ms"
    )


def median_seconds(fn, args, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv) -> None:
    del argv
    parallel.use_cpu_devices(FLAGS.cpu_devices or None)
    import jax
    import jax.numpy as jnp

    from simclr_jax import optim, pretrain
    from simclr_jax.data import stage_data
    from simclr_jax.train import runner

    config = FLAGS.config
    dp = parallel.from_config(config)
    data = stage_data.pretraining_data(config, dp.mesh)
    schedule = optim.train_schedule(config, data.num_examples)
    model = pretrain.make_model(config, data.num_classes)
    state = pretrain.init_state(
        model, config, data.channels, schedule.learning_rate(), sharding=dp.replicated_sharding
    )
    state = dp.replicate(state)
    step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=False)
    batch = data.batch_for_step(0)
    flops = total_flops(step.lower(state, batch).compile(), dp.num_replicas)
    matmul = matmul_seconds(jax, jnp)
    for warmup in range(2):
        state, metrics = step(state, data.batch_for_step(1 + warmup))
        jax.block_until_ready(metrics)
    step_times, step_cpu, matmul_times, matmul_cpu = [], [], [], []
    for k in range(FLAGS.steps):
        batch = data.batch_for_step(3 + k)
        start, cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - start)
        step_cpu.append(time.process_time() - cpu)
        for wall, cpu in (matmul() for _ in range(FLAGS.matmuls_per_step)):
            matmul_times.append(wall)
            matmul_cpu.append(cpu)
    step_rate = flops / statistics.median(step_times) / 1e9
    matmul_rate = 2.0 * MATMUL_SIDE**3 / statistics.median(matmul_times) / 1e9
    # The same ratio in CPU seconds (all threads): a process that loses its cores to others for a
    # while keeps it, so it is the figure to compare variants by on a busy machine.
    cpu_ratio = (flops / statistics.median(step_cpu)) / (
        2.0 * MATMUL_SIDE**3 / statistics.median(matmul_cpu)
    )
    print(
        f"# {dp.num_replicas} {jax.devices()[0].platform} device(s), batch {config.batch_size} "
        f"images ({2 * config.batch_size} views), {flops / 1e9:.2f} GFLOP per step, median step "
        f"{1000 * statistics.median(step_times):.0f} ms, "
        f"{2 * config.batch_size / statistics.median(step_times):.0f} views/s"
    )
    print(f"# the same in CPU seconds of all threads: ratio {cpu_ratio:.3f}")
    print(
        f"step_gflops_per_s={step_rate:.1f} matmul_gflops_per_s={matmul_rate:.1f} "
        f"ratio={step_rate / matmul_rate:.3f}"
    )
    if FLAGS.layers:
        per_device = 2 * config.batch_size // dp.num_replicas
        size = config.dataset.image_size
        images = jax.ShapeDtypeStruct((per_device, size, size, data.channels), jnp.float32)
        variables = {"params": dp.unreplicate(state).params}
        variables["batch_stats"] = dp.unreplicate(state).batch_stats
        time_layers(conv_layers(model, variables, images), median_seconds)


if __name__ == "__main__":
    app.run(main)
