"""Data-parallel scaling of the pretraining step: measured on forced CPU devices, computed for pods.

    python benchmarks/scaling.py                          # 1, 2, 4, 8 CPU devices, global batch 64
    python benchmarks/scaling.py --devices 1,2,4,8 --global_batch 128 --steps 10

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N is
read when jax starts) with the SAME global batch: the real pretraining step (device-resident data,
on-device augmentation, global BN, NT-Xent over gathered negatives, LARS), its median step time,
the per-device memory of the compiled program, the process's peak RSS, and the bytes of the
collectives in the optimised HLO. On a CPU the N "devices" share the same cores, so the time shows
the partitioning overhead, not a speed-up.

Then the communication per step and replica computed from the shapes, for the measured model and
for ResNet-50 on a TPU pod: the gradient all-reduce (a ring moves 2(N-1)/N x P x 4 bytes per
replica: flat in N) against the gather of the 2 x [b, D] projections ((N-1)/N x 2B x D x 4 bytes
forward, the same again for its reduce-scatter backward: it grows with the global batch B).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--global_batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--base_width", type=int, default=4)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--proj_out_dim", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ worker


def run_worker(args: argparse.Namespace) -> dict:
    """One device count, in this process (XLA_FLAGS already set by the parent)."""
    import jax

    from benchmarks import common
    from simclr_jax import parallel, pretrain
    from simclr_jax.data import pipeline

    common.enable_compilation_cache(args.cache_dir or str(common.DEFAULT_CACHE_DIR))
    devices = jax.devices()
    if len(devices) != args.worker:
        raise RuntimeError(f"asked for {args.worker} devices, jax sees {len(devices)}")
    mesh = parallel.make_mesh(devices)
    config = common.bench_config(
        depth=args.depth, width=1, sk_ratio=0.0, base_width=args.base_width,
        image_size=args.image_size, global_batch=args.global_batch, dtype="float32",
        proj_out_dim=args.proj_out_dim,
    )  # fmt: skip
    model, state, dp = common.build(config, mesh)
    step = common.map_step(dp, pretrain.make_train_step(model, config), config)
    arrays = common.synthetic_arrays(2 * args.global_batch, args.image_size, 3)
    data = pipeline.DeviceResidentData(arrays, global_batch=args.global_batch, seed=0, mesh=mesh)
    start = time.perf_counter()
    compiled = step.lower(state, data.batch(0)).compile()
    compile_s = time.perf_counter() - start
    variant = common.make_variant("device", compiled, state, data.batch)
    common.time_round_robin([variant], warmup=args.warmup, steps=args.steps)
    memory = common.memory_bytes(compiled)
    return {
        "devices": len(devices),
        "global_batch": args.global_batch,
        "median_step_s": variant.median_s,
        "compile_s": compile_s,
        "temp_bytes": memory.get("temp", 0),
        "argument_bytes": memory.get("argument", 0),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "hlo_collective_bytes": common.collective_bytes(compiled.as_text()),
        "params": common.param_count(state.params),
        "batch_stats": common.param_count(state.batch_stats),
        "proj_out_dim": args.proj_out_dim,
        "loadavg_1m": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------- communication


def ring_all_reduce_bytes(payload: float, n: int) -> float:
    """Bytes each replica sends (and receives) in a ring all-reduce of `payload` bytes."""
    return 2.0 * (n - 1) / n * payload


def gather_bytes(global_batch: int, dim: int, n: int) -> float:
    """Bytes each replica receives gathering both views' [b, D] fp32 projections (forward)."""
    return (n - 1) / n * 2 * global_batch * dim * 4


def communication_row(n: int, params: int, batch_stats: int, global_batch: int, dim: int) -> dict:
    gradients = ring_all_reduce_bytes(4 * params, n)
    gather = 2 * gather_bytes(global_batch, dim, n)  # all_gather + its reduce-scatter transpose
    # Global BN: a pmean of (mean, mean of squares) per BN forward, its transpose backward and the
    # final pmean of the moving statistics: about 3 x |batch_stats|, in many small collectives.
    batch_norm = ring_all_reduce_bytes(3 * 4 * batch_stats, n)
    return {"n": n, "gradients": gradients, "gather": gather, "batch_norm": batch_norm}


def resnet50_sizes(proj_out_dim: int = 128) -> tuple[int, int]:
    """(parameters, BN statistics) of the r50 preset's model, from shapes only (no compute)."""
    import functools

    import jax
    import jax.numpy as jnp

    from benchmarks import common
    from simclr_jax import parallel
    from simclr_jax.models import build_model

    config = common.bench_config(
        depth=50, width=1, sk_ratio=0.0, base_width=64, image_size=224, global_batch=4096,
        dtype="bfloat16", proj_out_dim=proj_out_dim,
    )  # fmt: skip
    model = build_model(
        config.model, num_classes=1000, image_size=224, axis_name=parallel.DATA_AXIS
    )
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
    )
    return common.param_count(shapes["params"]), common.param_count(shapes["batch_stats"])


# ------------------------------------------------------------------------------------------ parent


def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    for n in [int(x) for x in args.devices.split(",")]:
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
        passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker")]
        command = [sys.executable, str(Path(__file__).resolve()), f"--worker={n}", *passthrough]
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{n} devices failed:\n{result.stderr[-3000:]}")
        line = [x for x in result.stdout.splitlines() if x.startswith("SCALING ")][-1]
        rows.append(json.loads(line[len("SCALING ") :]))
        print(f"measured {n} device(s): {rows[-1]['median_step_s'] * 1e3:.1f} ms", flush=True)
    return rows


def print_tables(rows: list[dict]) -> None:
    base = rows[0]["median_step_s"]
    print(
        "\n| devices | per-device batch | median step ms | vs first | temp MB/device | "
        "argument MB/device | peak RSS MB | HLO all-reduce MB | HLO all-gather MB | "
        "HLO reduce-scatter MB | load 1m |"
    )
    print("|" + "---|" * 11)
    for r in rows:
        hlo = r["hlo_collective_bytes"]
        print(
            f"| {r['devices']} | {r['global_batch'] // r['devices']} | "
            f"{r['median_step_s'] * 1e3:.1f} | {r['median_step_s'] / base:.2f} | "
            f"{r['temp_bytes'] / MB:.1f} | {r['argument_bytes'] / MB:.2f} | "
            f"{r['peak_rss_bytes'] / MB:.0f} | {hlo.get('all-reduce', 0) / MB:.3f} | "
            f"{hlo.get('all-gather', 0) / MB:.3f} | {hlo.get('reduce-scatter', 0) / MB:.3f} | "
            f"{r['loadavg_1m']:.1f} |"
        )
    r = rows[0]
    print(
        f"\nMeasured model: P = {r['params']:,} parameters ({4 * r['params'] / MB:.2f} MB fp32), "
        f"{r['batch_stats']:,} BN statistics, D = {r['proj_out_dim']}, "
        f"global batch B = {r['global_batch']}."
    )
    print_communication(
        "Computed per step and replica, measured model",
        r["params"], r["batch_stats"], r["global_batch"], r["proj_out_dim"],
        [x["devices"] for x in rows],
    )  # fmt: skip
    params, batch_stats = resnet50_sizes()
    print(
        f"\nResNet-50 (r50 preset, 2-layer head to 128, 1000-class probe): "
        f"P = {params:,} ({4 * params / 1e6:.0f} MB fp32), {batch_stats:,} BN statistics."
    )
    for global_batch in (4096, 65536):
        print_communication(
            f"Computed per step and replica, ResNet-50, global batch {global_batch}, D = 128",
            params, batch_stats, global_batch, 128, [8, 32, 128, 512, 1024],
        )  # fmt: skip


def print_communication(title, params, batch_stats, global_batch, dim, counts) -> None:
    print(f"\n{title}\n")
    print("| replicas | gradient all-reduce MB | projection gather MB | BN statistics MB |")
    print("|---|---|---|---|")
    for n in counts:
        row = communication_row(n, params, batch_stats, global_batch, dim)
        print(
            f"| {n} | {row['gradients'] / 1e6:.2f} | {row['gather'] / 1e6:.3f} | "
            f"{row['batch_norm'] / 1e6:.3f} |"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("SCALING " + json.dumps(run_worker(args)), flush=True)
        return
    print(f"cpus={os.cpu_count()} loadavg_1m={os.getloadavg()[0]:.2f} command={sys.argv}")
    print_tables(run_all(args))


if __name__ == "__main__":
    main()
