"""Multi-process start-up: the rules that pick how a process joins a job, and a real job.

The real job: 2 processes x 2 CPU devices on localhost (`jax.distributed` with gloo collectives, a
coordinator on a free port), started the way a cluster would start it: every process runs
tests/multiprocess/pretrain_worker.py with its SIMCLR_PROCESS_ID. The pair runs 2 steps, stops, is
restarted and continues to step 4 from the checkpoint both processes wrote; global batches, losses
and parameters must match an uninterrupted 1 process x 4 devices run on the same batch and seed.
Each launch has a deadline and one failing process ends its partner at once, so a hang fails the
test within minutes instead of blocking CI.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess" / "pretrain_worker.py"
STEPS = 4
LAUNCH_TIMEOUT_S = 300  # a cold compile on a loaded 2-core machine; a hang ends here
_JOB_VARIABLES = ("SIMCLR_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                  "TPU_", "CLOUD_TPU_", "OMPI_")  # fmt: skip


# ------------------------------------------------------------ start-up rules (no processes started)

SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
}


def test_a_lone_process_starts_without_a_job():
    assert distributed.plan({}) == distributed.Plan("single")
    assert not distributed.plan({}).joins
    # One SLURM task (an interactive allocation) is a lone process too.
    assert distributed.plan(dict(SLURM, SLURM_NTASKS="1")).how == "single"


def test_explicit_settings_from_flags_then_ours_then_jax_variables():
    ours = {
        "SIMCLR_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "SIMCLR_NUM_PROCESSES": "4",
        "SIMCLR_PROCESS_ID": "3",
    }
    jax_env = {
        "JAX_COORDINATOR_ADDRESS": "10.9.9.9:99",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    assert distributed.plan(ours) == distributed.Plan("manual", "10.0.0.1:1234", 4, 3)
    assert distributed.plan(jax_env) == distributed.Plan("manual", "10.9.9.9:99", 2, 1)
    assert distributed.plan({**jax_env, **ours}).coordinator_address == "10.0.0.1:1234"
    from_flags = distributed.plan(ours, coordinator_address="h:1", num_processes=8, process_id=0)
    assert from_flags == distributed.Plan("manual", "h:1", 8, 0)
    assert from_flags.initialize_kwargs() == {
        "coordinator_address": "h:1",
        "num_processes": 8,
        "process_id": 0,
    }


def test_half_specified_settings_name_what_is_missing():
    with pytest.raises(ValueError, match="num_processes .*SIMCLR_NUM_PROCESSES.*process_id"):
        distributed.plan({"SIMCLR_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.plan({}, mode="manual", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="SIMCLR_NUM_PROCESSES must be an integer"):
        distributed.plan({"SIMCLR_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="process_id must be in"):
        distributed.plan({}, coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="host:port"):
        distributed.plan({}, coordinator_address="localhost", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="SIMCLR_DISTRIBUTED must be one of"):
        distributed.plan({"SIMCLR_DISTRIBUTED": "mpi"})
    with pytest.raises(ValueError, match="start every process with srun"):
        distributed.plan({}, mode="slurm")


def test_clusters_jax_detects_are_left_to_jax():
    tpu = distributed.plan({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
    assert tpu == distributed.Plan("tpu") and tpu.initialize_kwargs() == {}
    assert distributed.plan({}, mode="tpu").how == "tpu"
    slurm = distributed.plan(SLURM)
    assert slurm.how == "slurm"
    assert slurm.initialize_kwargs() == {"cluster_detection_method": "slurm"}
    # A setting given explicitly wins over the detected one; jax fills in the rest.
    assert distributed.plan(SLURM, coordinator_address="gpu003:5555").initialize_kwargs() == {
        "coordinator_address": "gpu003:5555",
        "cluster_detection_method": "slurm",
    }
    assert distributed.plan({"OMPI_COMM_WORLD_SIZE": "8"}).how == "ompi"
    assert distributed.plan(SLURM, mode="off") == distributed.Plan("single")


# ------------------------------------------------- 2 processes x 2 devices vs 1 process x 4 devices


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def launch(workdir: pathlib.Path, *, processes: int, devices: int, stop_at_step=None) -> None:
    """Run the worker as `processes` processes of one job; fail fast if any of them fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VARIABLES)}
    if processes > 1:
        env["SIMCLR_COORDINATOR_ADDRESS"] = f"localhost:{free_port()}"
        env["SIMCLR_NUM_PROCESSES"] = str(processes)
        # On CPU, jax's persistent-cache keys differ between processes and only process 0 writes:
        # process 0 would load the step while process 1 compiles it, and gloo gives up on a
        # collective whose peer is more than 30 s late. Compiling in step keeps them together.
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    command = [sys.executable, str(WORKER), str(workdir), f"--devices={devices}"]
    if stop_at_step is not None:
        command.append(f"--stop_at_step={stop_at_step}")
    workdir.mkdir(parents=True, exist_ok=True)
    logs = [workdir / f"log.{i}.txt" for i in range(processes)]
    procs = []
    for i, log in enumerate(logs):
        env_i = dict(env, SIMCLR_PROCESS_ID=str(i)) if processes > 1 else env
        with open(log, "a") as out:
            procs.append(
                subprocess.Popen(command, env=env_i, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"process {failed[0]} failed" if failed else f"timeout {LAUNCH_TIMEOUT_S}s"
                pytest.fail(f"{why}:\n{logs[failed[0] if failed else 0].read_text()[-3000:]}")
            time.sleep(0.2)
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"process {i} failed:\n{logs[i].read_text()[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def read_state(workdir: pathlib.Path, step: int) -> dict:
    """The checkpointed train state as NumPy arrays, whatever devices wrote it."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def global_batches(workdir: pathlib.Path, processes: int) -> dict[str, list]:
    """{step: [(first row, indices, image checksum), ...]} from every process, by global row."""
    merged: dict[str, list] = {}
    for i in range(processes):
        for step, shards in json.loads((workdir / f"batches.{i}.json").read_text()).items():
            merged.setdefault(step, []).extend(tuple(map(_hashable, shard)) for shard in shards)
    return {step: sorted(shards) for step, shards in merged.items()}


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def test_two_processes_train_like_one_and_resume_together(tmp_path):
    """One test, not several sharing a fixture: under pytest-xdist a module fixture would run
    (and train) once per worker."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch(one, processes=1, devices=4)
    launch(two, processes=2, devices=2, stop_at_step=2)
    assert sorted(read_losses(two)) == [1, 2], "the first 2 x 2 run should stop at step 2"
    launch(two, processes=2, devices=2)

    check_global_batches(one, two)
    check_losses(one, two)
    check_checkpoints(two)
    check_parameters(one, two)


def check_global_batches(one: pathlib.Path, two: pathlib.Path) -> None:
    reference, pieced = global_batches(one, 1), global_batches(two, 2)
    assert sorted(reference) == ["0", "1"]
    assert len(reference["0"]) == 4 and len(pieced["0"]) == 4  # one shard per device
    assert pieced == reference, "the processes together built other global batches"
    assert reference["0"] != reference["1"]


def check_losses(one: pathlib.Path, two: pathlib.Path) -> None:
    expected, got = read_losses(one), read_losses(two)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    # One step differs only in rounding: 1 x 4 and 2 x 2 devices sum across devices in other
    # orders. Training then amplifies it (about 10x a step at this size: BatchNorm's gradients
    # are mostly cancellation), so later steps get a looser bound; a wrong batch, an unaveraged
    # gradient or a lost optimizer state changes the loss by percent.
    for step, rel in ((1, 1e-5), (2, 1e-5), (3, 1e-3), (4, 1e-3)):
        assert got[step] == pytest.approx(expected[step], rel=rel), f"loss at step {step}"


def check_checkpoints(two: pathlib.Path) -> None:
    steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, STEPS]
    state = two / "checkpoints" / str(STEPS) / "state"
    writers = {p.name for p in (state / "array_metadatas").iterdir()}
    assert writers == {"process_0", "process_1"}, "both processes write every checkpoint"
    assert (two / "results.json").exists()


def check_parameters(one: pathlib.Path, two: pathlib.Path) -> None:
    """All parameters as one vector, so the tensors rounding noise moves most (BatchNorm biases)
    do not decide alone; the actual differences are about 30x and 5x below the bounds."""
    before, after = _flat_params(one, 2), _flat_params(one, STEPS)
    got_before, got_after = _flat_params(two, 2), _flat_params(two, STEPS)
    assert np.linalg.norm(got_before - before) <= 1e-3 * np.linalg.norm(before)
    # After the restart: close on the scale of what steps 3-4 changed (see check_losses).
    # Resuming without the optimizer's momentum, or at the wrong step, misses by far more.
    moved = np.linalg.norm(after - before)
    assert moved > 1e-3 * np.linalg.norm(before), "steps 3-4 hardly changed the parameters"
    assert np.linalg.norm(got_after - after) <= 0.1 * moved


def _flat_params(workdir: pathlib.Path, step: int) -> np.ndarray:
    state = read_state(workdir, step)
    assert int(state["step"]) == step
    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    return np.concatenate([np.ravel(leaf) for _, leaf in sorted(leaves, key=lambda x: str(x[0]))])
