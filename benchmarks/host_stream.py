"""The host's cost of streaming a prepared dataset: crops per second, and per core-second.

    python benchmarks/host_stream.py --name=gen200k --data_dir=/work/prep_200k \
        [--image_size=64] [--batch=256] [--steps=20] [--num_crops=2]

Reads the batches of steps 0, 1, ... with step_stream.StepStream (the trainers' path: records read
by index, decoded and cropped in tf.data) and nothing else. `images_per_s` is wall-clock;
`images_per_cpu_s` divides by the CPU time this process used (all its threads), so it is the rate
one host core sustains and does not depend on what else the machine runs. Run it under
`taskset -c 0` to hold it to one core.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `simclr_jax` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_jax.data.step_stream import StepStream  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_crops", type=int, default=2)
    args = parser.parse_args()
    stream = StepStream(
        args.name, args.split, global_batch=args.batch, image_size=args.image_size, seed=0,
        data_dir=args.data_dir, num_crops=args.num_crops, process_index=0, process_count=1,
    )  # fmt: skip
    for step in range(args.warmup):
        stream.batch(step)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for step in range(args.warmup, args.warmup + args.steps):
        stream.batch(step)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    images = args.batch * args.steps
    print(
        f"name={args.name} examples={stream.num_examples} image_size={args.image_size} "
        f"crops_per_image={args.num_crops} batch={args.batch} steps={args.steps} "
        f"cores={len(os.sched_getaffinity(0))} images_per_s={images / wall:.1f} "
        f"images_per_cpu_s={images / cpu:.1f} loadavg_1m={os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
