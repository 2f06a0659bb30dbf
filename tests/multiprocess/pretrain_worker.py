"""One process of a multi-process pretraining run on CPU devices, as a real job would start it.

    SIMCLR_COORDINATOR_ADDRESS=localhost:PORT SIMCLR_NUM_PROCESSES=2 SIMCLR_PROCESS_ID=0 \
        python tests/multiprocess/pretrain_worker.py WORKDIR --devices=2 [--stop_at_step=2]

The process joins the job through simclr_jax.distributed (from the environment), pretrains the tiny
Fashion-MNIST config and writes `WORKDIR/batches.<process>.json`: for the first steps, the global
rows, dataset indices and an image checksum of every batch shard this process holds, so the parent
can check that the processes together built the same global batches as one process does.
"""

import argparse
import json
import os
import pathlib
import sys


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--devices", type=int, required=True, help="CPU devices in this process")
    parser.add_argument("--stop_at_step", type=int, default=None)
    parser.add_argument("--num_steps", type=int, default=4)
    return parser.parse_args()


def tiny_config(num_steps: int):
    from simclr_jax.configs import pretrain_fashion_mnist

    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.train_split = "train[:512]"
    config.dataset.eval_split = ""
    config.eval_batch_size = 32
    config.num_steps = num_steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.optim.base_lr = 0.05  # peak 0.28 (sqrt scaling, batch 32): the probe stays stable
    return config


def batch_shards(config, steps: int) -> dict[str, list]:
    """{step: [[first global row, dataset indices, image byte sum], ...]} for this process."""
    import numpy as np

    from simclr_jax import parallel
    from simclr_jax.data import pipeline, sources

    arrays = sources.load_split(config.dataset, config.dataset.train_split)
    data = pipeline.DeviceResidentData(
        arrays, global_batch=config.batch_size, seed=config.seed, mesh=parallel.make_mesh()
    )
    shards = {}
    for step in range(steps):
        batch = data.batch(step)
        shards[str(step)] = [
            [
                index.index[0].start or 0,
                np.asarray(index.data).tolist(),
                int(np.asarray(image.data, np.int64).sum()),
            ]
            for index, image in zip(
                batch["index"].addressable_shards, batch["image"].addressable_shards, strict=True
            )
        ]
    return shards


def main():
    args = parse_args()
    # The test's XLA flags (tests/devices.py: a cheap compile pipeline) + this process's devices.
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The clu writer would import TensorFlow (seconds per process); the JSONL writer is enough here.
    sys.modules["tensorflow"] = None

    from simclr_jax import distributed

    distributed.initialize()  # before anything touches a device

    import jax

    from simclr_jax import pretrain

    config = tiny_config(args.num_steps)
    pretrain.train_and_evaluate(config, str(args.workdir), stop_at_step=args.stop_at_step)
    shards = batch_shards(config, steps=2)
    out = args.workdir / f"batches.{jax.process_index()}.json"
    out.write_text(json.dumps(shards))


if __name__ == "__main__":
    main()
