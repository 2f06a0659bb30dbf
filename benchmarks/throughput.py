"""Pretraining-step throughput: median step time, images/s, XLA FLOPs and model-FLOP utilisation.

    python benchmarks/throughput.py --preset tiny                       # CPU smoke run, seconds
    python benchmarks/throughput.py --preset tiny --data device,views,host
    python benchmarks/throughput.py --preset r50 --data device,views --peak_tflops 989
    python benchmarks/throughput.py --preset r18_cifar --dtype float32 --batch 256

One image = two views. --batch is per device (the global batch is batch x devices). Data variants:
  device  uint8 images resident on the devices, batches gathered and augmented there (the real path
          of pretrain.train_and_evaluate for fixed-size datasets);
  host    two crops per image from the host tf.data pipeline (step_stream.StepStream, the path for
          variable-size images), copied to the devices each step; colour, flip and blur on device.
          Offline it reads tfds's mock data (tiny JPEGs): pass --tfds_data_dir for real images;
  views   two ready-made float views: the model, loss and optimizer alone.
With device and views both run, `augmentation_share` = 1 - views / device (step-time medians).

Every line of results is `key=value` pairs. FLOPs are XLA's count for one call of the compiled
per-device program (cost_analysis); mfu = flops / median step time / --peak_tflops.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from simclr_jax import parallel, pretrain, validation  # noqa: E402
from simclr_jax.data import pipeline  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(common.PRESETS), default="tiny")
    for name, kind in [
        ("depth", int), ("width", int), ("sk_ratio", float), ("base_width", int),
        ("image_size", int), ("batch", int), ("proj_out_dim", int), ("num_proj_layers", int),
        ("warmup", int), ("steps", int),
    ]:  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=None, help="overrides the preset")
    parser.add_argument("--dtype", choices=validation.DTYPES, default=None)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument(
        "--data", default="device", help=f"comma-separated from {common.DATA_VARIANTS}, or 'all'"
    )
    parser.add_argument("--num_devices", type=int, default=0, help="first N devices (0 = all)")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=H100_BF16_DENSE_TFLOPS,
        help="per-device peak for the MFU (default: H100 SXM dense bf16)",
    )
    parser.add_argument("--tfds_name", default="imagenet2012", help="host variant dataset")
    parser.add_argument("--tfds_data_dir", default="", help="host variant: '' = tfds mock data")
    parser.add_argument(
        "--cache_dir",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(common.DEFAULT_CACHE_DIR)),
        help="persistent compilation cache ('' = off); reruns skip the compiles",
    )
    args = parser.parse_args(argv)
    for key, value in common.PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    variants = common.DATA_VARIANTS if args.data == "all" else tuple(args.data.split(","))
    unknown = sorted(set(variants) - set(common.DATA_VARIANTS))
    if unknown:
        parser.error(f"--data: unknown variant(s) {unknown}; choose from {common.DATA_VARIANTS}")
    args.variants = variants
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    common.enable_compilation_cache(args.cache_dir)
    devices = jax.devices()[: args.num_devices or None]
    mesh = parallel.make_mesh(devices)
    global_batch = args.batch * len(devices)
    config = common.bench_config(
        depth=args.depth,
        width=args.width,
        sk_ratio=args.sk_ratio,
        base_width=args.base_width,
        image_size=args.image_size,
        global_batch=global_batch,
        dtype=args.dtype,
        proj_out_dim=args.proj_out_dim,
        num_proj_layers=args.num_proj_layers,
    )
    print(
        f"platform={jax.default_backend()} device_kind={devices[0].device_kind!r} "
        f"devices={len(devices)} cpus={os.cpu_count()} loadavg_1m={os.getloadavg()[0]:.2f} "
        f"jax={jax.__version__} python={platform.python_version()}"
    )
    print(
        f"preset={args.preset} depth={args.depth} width={args.width} sk_ratio={args.sk_ratio} "
        f"base_width={args.base_width} image_size={args.image_size} per_device_batch={args.batch} "
        f"global_batch={global_batch} dtype={args.dtype} warmup={args.warmup} steps={args.steps}"
    )
    model, state, dp = common.build(config, mesh, channels=args.channels)
    size = args.image_size
    variants, contexts = [], []
    arrays = common.synthetic_arrays(max(2 * global_batch, 64), size, args.channels)
    data = pipeline.DeviceResidentData(arrays, global_batch=global_batch, seed=0, mesh=mesh)
    for name in args.variants:
        start = time.perf_counter()
        if name == "views":
            step = common.map_step(dp, common.make_views_train_step(model, config), config)
            # The views the device variant's first step makes: both first losses must agree.
            batch = common.augmented_views(config, data.batch(0))
            next_batch = lambda i, batch=batch: batch
        elif name == "device":
            step = common.map_step(dp, pretrain.make_train_step(model, config), config)
            next_batch, batch = data.batch, data.batch(0)
        else:
            step = common.map_step(dp, pretrain.make_train_step(model, config), config)
            try:
                context = common.host_batches(
                    global_batch, size, tfds_name=args.tfds_name, data_dir=args.tfds_data_dir
                )
                host_iter = context.__enter__()
            except ImportError as err:
                print(f"variant=host skipped=1 reason={str(err).split(':')[0]!r}")
                continue
            contexts.append(context)
            next_batch = lambda i, it=host_iter: pipeline.to_global_batch(next(it), mesh)
            batch = next_batch(0)
        compiled = step.lower(state, batch).compile()
        # Each variant trains its own copy (the steps donate their state).
        own_state = jax.tree.map(lambda x: x.copy(), state)
        variant = common.make_variant(name, compiled, own_state, next_batch)
        variant.compile_s = time.perf_counter() - start
        variants.append(variant)

    common.time_round_robin(variants, warmup=args.warmup, steps=args.steps)
    report(variants, args, global_batch)
    for context in contexts:
        context.__exit__(None, None, None)


def report(variants, args, global_batch: int) -> None:
    medians = {}
    for v in variants:
        median = v.median_s
        medians[v.name] = median
        flops = common.xla_flops(v.compiled)
        memory = common.memory_bytes(v.compiled)
        images_per_s = global_batch / median
        fields = {
            "variant": v.name,
            "median_step_ms": common.fmt(1e3 * median),
            "min_step_ms": common.fmt(1e3 * min(v.times)),
            "images_per_s": common.fmt(images_per_s),
            "s_per_50k_images": common.fmt(50_000 / images_per_s),
            "xla_gflop_per_step": common.fmt(flops / 1e9),
            "achieved_tflops": common.fmt(flops / median / 1e12),
            "mfu": common.fmt(flops / median / (args.peak_tflops * 1e12)),
            "temp_mb": common.fmt(memory.get("temp", 0) / 2**20),
            "argument_mb": common.fmt(memory.get("argument", 0) / 2**20),
            "compile_s": common.fmt(v.compile_s),
            "timed_steps": len(v.times),
        }
        print(" ".join(f"{k}={val}" for k, val in fields.items()))
    if "device" in medians and "views" in medians:
        share = 1.0 - medians["views"] / medians["device"]
        print(f"augmentation_share={common.fmt(share)} (1 - views/device, median step times)")
        first = {v.name: v.first_loss for v in variants}
        diff = abs(first["views"] - first["device"]) / abs(first["device"])
        print(
            f"views_first_loss_rel_diff={diff:.3e} (views step vs library step on the same "
            f"views: {first['views']:.6g} vs {first['device']:.6g})"
        )
    print(f"loadavg_1m_end={os.getloadavg()[0]:.2f} peak_tflops={args.peak_tflops}")


if __name__ == "__main__":
    main()
