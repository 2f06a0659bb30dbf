"""A generated image folder for measuring `simclr_jax.prepare` and streaming at scale.

    python benchmarks/make_image_folder.py --out=/work/data_200k --images=200000 [--classes=10]
        [--corrupt=20] [--min_side=64] [--max_side=512] [--workers=0]

train/class_XX/NNNNNNN.jpg: JPEGs of random height and width in [min_side, max_side], smooth
random colour fields (low-resolution noise, bilinearly upsampled, quality 85), so they compress
like photos rather than like noise. Plus `corrupt` unreadable files spread over the classes:
truncated JPEGs, empty files and random bytes. Image i depends only on (seed, i): the folder is the
same on every machine, and a rerun skips the files already there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import time

import numpy as np
from PIL import Image

CORRUPT_KINDS = ("truncated", "empty", "random_bytes")


def image_bytes(seed: int, index: int, min_side: int, max_side: int) -> bytes:
    rng = np.random.default_rng([seed, index])
    height, width = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def corrupt_bytes(seed: int, index: int, kind: str) -> bytes:
    if kind == "empty":
        return b""
    if kind == "random_bytes":
        return np.random.default_rng([seed, index, 1]).bytes(1000)
    good = image_bytes(seed, index, 64, 128)
    return good[: len(good) // 3]  # truncated


def write_range(out: str, start: int, stop: int, args) -> int:
    written = 0
    for index in range(start, stop):
        path = os.path.join(out, "train", f"class_{index % args.classes:02d}", f"{index:07d}.jpg")
        if os.path.exists(path):
            continue
        with open(path + ".tmp", "wb") as file:
            file.write(image_bytes(args.seed, index, args.min_side, args.max_side))
        os.replace(path + ".tmp", path)
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--corrupt", type=int, default=20)
    parser.add_argument("--min_side", type=int, default=64)
    parser.add_argument("--max_side", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    for c in range(args.classes):
        os.makedirs(os.path.join(args.out, "train", f"class_{c:02d}"), exist_ok=True)
    workers = args.workers or len(os.sched_getaffinity(0))
    chunk = 2000
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(write_range, args.out, s, min(s + chunk, args.images), args)
            for s in range(0, args.images, chunk)
        ]
        written = sum(job.result() for job in jobs)
    for k in range(args.corrupt):
        kind = CORRUPT_KINDS[k % len(CORRUPT_KINDS)]
        name = f"corrupt_{k:03d}_{kind}.jpg"
        path = os.path.join(args.out, "train", f"class_{k % args.classes:02d}", name)
        with open(path, "wb") as file:
            file.write(corrupt_bytes(args.seed, k, kind))
    print(
        f"{written} images written ({args.images} in all), {args.corrupt} corrupt files, "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
