"""One process of a multi-process run of the runner on a tiny stage, to test stop requests.

    SIMCLR_COORDINATOR_ADDRESS=localhost:PORT SIMCLR_NUM_PROCESSES=2 SIMCLR_PROCESS_ID=0 \
        python tests/multiprocess/runner_worker.py WORKDIR --num_steps=150

The stage is what the trainers hand train/runner.py, made small: a linear classifier of 4x4 images
trained by momentum SGD with gradients averaged over replicas (train/update.averaged_update), its
batches gathered on device from the step number (data/pipeline.DeviceResidentData). Each step
also waits STEP_SECONDS on the host, so a run lasts long enough to be interrupted mid-way. At the
end the process writes WORKDIR/result.<process>.json: the step it ended at and whether it stopped.

--hold_start_up: a resumed run writes WORKDIR/starting.<process> before its restore and waits
there until WORKDIR/go exists, so a test can send a signal during the start-up.
"""

import argparse
import json
import os
import pathlib
import sys
import time

STEP_SECONDS = 0.05
CLASSES, SIZE, EXAMPLES, BATCH = 4, 4, 256, 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--num_steps", type=int, default=150)
    parser.add_argument("--stop_at_step", type=int, default=None)
    parser.add_argument("--hold_start_up", action="store_true")
    return parser.parse_args()


def hold_start_up(workdir: pathlib.Path, process: int, limit_s: float = 300.0) -> None:
    """Says this process is starting up, then waits for the test's go (see the module doc)."""
    (workdir / f"starting.{process}").write_text("")
    deadline = time.monotonic() + limit_s
    while not (workdir / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {workdir / 'go'} within {limit_s} s")
        time.sleep(0.02)


def config(num_steps: int):
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            seed=0, batch_size=BATCH, num_steps=num_steps, keep_checkpoints=2,
            checkpoint_every_steps=10_000, log_every_steps=1,
            nonfinite="stop",
        )
    )  # fmt: skip


def stage(num_steps: int, mesh, hold_in: pathlib.Path | None = None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from simclr_jax import losses, optim
    from simclr_jax.data import pipeline
    from simclr_jax.data.arrays import ImageArrays
    from simclr_jax.train import runner
    from simclr_jax.train.state import TrainState
    from simclr_jax.train.update import averaged_update

    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, EXAMPLES).astype(np.int32)
    images = np.clip(
        labels[:, None, None, None] * 60 + rng.integers(0, 80, (EXAMPLES, SIZE, SIZE, 1)), 0, 255
    )
    data = pipeline.DeviceResidentData(
        ImageArrays(images.astype(np.uint8), labels, CLASSES), global_batch=BATCH, seed=0, mesh=mesh
    )
    schedule = optim.TrainSchedule(EXAMPLES // BATCH, num_steps, 0, 0.05)

    def init_state(resuming: bool) -> TrainState:
        if resuming and hold_in is not None:
            hold_start_up(hold_in, jax.process_index())
        params = {"w": jnp.zeros((SIZE * SIZE, CLASSES)), "b": jnp.zeros((CLASSES,))}
        tx = optax.sgd(schedule.learning_rate(), momentum=0.9)
        return TrainState.create(params=params, batch_stats={}, tx=tx)

    def step(state, batch):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 255.0

        def loss_fn(params):
            loss = losses.softmax_cross_entropy(x @ params["w"] + params["b"], batch["label"])
            return loss, ({"loss": loss}, state.batch_stats)

        return averaged_update(state, loss_fn)

    def batch_for_step(step: int):
        time.sleep(STEP_SECONDS)  # stands for a real step's work
        return data.batch(step)

    return runner.Stage("Toy", init_state, step, batch_for_step, schedule)


def main():
    args = parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.modules["tensorflow"] = None  # the JSONL writer is enough; TF would take seconds

    from simclr_jax import distributed

    distributed.initialize()  # before anything touches a device

    import jax

    from simclr_jax import parallel
    from simclr_jax.train import runner

    dp = parallel.DataParallel(parallel.make_mesh())
    hold_in = args.workdir if args.hold_start_up else None
    results = runner.run(
        config(args.num_steps),
        str(args.workdir),
        dp,
        stage(args.num_steps, dp.mesh, hold_in),
        stop_at_step=args.stop_at_step,
    )
    out = args.workdir / f"result.{jax.process_index()}.json"
    out.write_text(json.dumps({k: results.get(k) for k in ("step", "preempted_at_step")}))


if __name__ == "__main__":
    main()
