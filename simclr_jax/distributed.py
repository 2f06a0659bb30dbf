"""Multi-host start-up: join the job with `jax.distributed.initialize` before any device is touched.

Every process of a multi-host job runs the same program and calls `initialize()` first. Where the
cluster already says who is who, JAX's own detection fills in the details: the metadata server on a
Cloud TPU VM, the SLURM variables under `srun`, Open MPI under `mpirun`. Elsewhere (a GPU cluster
without a scheduler, several processes on one machine) the coordinator address, process count and
process id come from flags or the environment. A lone process with none of this set starts as usual.

Settings, first found wins: the flags (`define_flags`), then SIMCLR_COORDINATOR_ADDRESS /
SIMCLR_NUM_PROCESSES / SIMCLR_PROCESS_ID, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID. `--distributed` (or SIMCLR_DISTRIBUTED) picks the mode: 'auto' (default: detect),
'off', 'tpu', 'slurm' or 'manual' (all three settings required).

`plan()` only reads the environment, so the rules are testable without starting anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax
from absl import flags

MODES = ("auto", "off", "tpu", "slurm", "manual")
# Any of these means "this is a Cloud TPU VM or a TPU pod in GKE": jax then reads the rest itself.
TPU_ENV_VARS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "CLOUD_TPU_TASK_ID",
    "TPU_WORKER_ID",
)
TPU_DEVICE_FILE = "/dev/accel0"  # TPU v2-v4 chips on a TPU VM
# What jax's SLURM detector reads (jax/_src/clusters/slurm_cluster.py).
SLURM_ENV_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_SETTINGS = {  # field -> (flag, environment variables in priority order)
    "coordinator_address": (
        "--coordinator_address",
        ("SIMCLR_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    ),
    "num_processes": ("--num_processes", ("SIMCLR_NUM_PROCESSES", "JAX_NUM_PROCESSES")),
    "process_id": ("--process_id", ("SIMCLR_PROCESS_ID", "JAX_PROCESS_ID")),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the job: `how` names the source, the rest go to jax as given.

    how: 'single' (no multi-process job), 'manual' (all settings given), or the cluster whose
    detection fills in what is None: 'tpu', 'slurm', 'ompi'.
    """

    how: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def joins(self) -> bool:
        return self.how != "single"

    def initialize_kwargs(self) -> dict:
        kwargs = {k: v for k, v in dataclasses.asdict(self).items() if k != "how" and v is not None}
        if self.how == "slurm":
            kwargs["cluster_detection_method"] = "slurm"
        return kwargs


def plan(
    environ: Mapping[str, str] | None = None,
    *,
    mode: str | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Plan:
    """Decide how to start from arguments (flags) and the environment; raises on half settings."""
    env = os.environ if environ is None else environ
    mode = (mode or env.get("SIMCLR_DISTRIBUTED") or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"--distributed / SIMCLR_DISTRIBUTED must be one of {MODES}, got {mode!r}")
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    settings = {name: _setting(name, value, env) for name, value in given.items()}
    if mode == "off":
        return Plan("single")
    _check_values(settings)
    missing = [name for name, value in settings.items() if value is None]
    if mode == "manual" or (mode == "auto" and not missing):
        if missing:
            raise ValueError(f"--distributed=manual needs {_describe(missing)}")
        return Plan("manual", **settings)
    if mode == "slurm" and not _slurm_present(env):
        unset = [name for name in SLURM_ENV_VARS if name not in env]
        raise ValueError(
            f"--distributed=slurm but {', '.join(unset)} are unset: start every process with srun"
        )
    if mode == "auto":
        mode = _detect_cluster(env)
        if mode is None and len(missing) < len(settings):
            raise ValueError(
                f"incomplete multi-process settings: {_describe(missing)} "
                "(or run under a cluster JAX detects: Cloud TPU, SLURM's srun, Open MPI's mpirun)"
            )
    return Plan(mode or "single", **settings)


def initialize(**overrides) -> Plan:
    """Join the multi-process job the flags and environment describe; a no-op for one process.

    Keyword arguments override the flags (mode, coordinator_address, num_processes, process_id).
    Must run before anything touches a device; calling it again is harmless.
    """
    settings = {**_flag_settings(), **overrides}
    chosen = plan(**settings)
    if not chosen.joins or jax.distributed.is_initialized():
        return chosen
    # CPU processes talk through gloo (jax 0.10's default; older releases had none).
    if getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("Joining a multi-process job (%s): %s", chosen.how, chosen.initialize_kwargs())
    jax.distributed.initialize(**chosen.initialize_kwargs())
    logging.info(
        "Process %d of %d with %d of %d devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return chosen


def define_flags() -> None:
    """The start-up flags, for entry points that want them (defined once, in their __main__)."""
    flags.DEFINE_enum("distributed", None, MODES, "Multi-process start-up (default: auto).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-process).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


def _flag_settings() -> dict:
    """The start-up flags' values when an entry point defined and parsed them."""
    values = flags.FLAGS
    if "distributed" not in values or not values.is_parsed():
        return {}
    return {
        "mode": values.distributed,
        "coordinator_address": values.coordinator_address,
        "num_processes": values.num_processes,
        "process_id": values.process_id,
    }


def _setting(name: str, value, env: Mapping[str, str]):
    """The argument if given, else the first of the setting's environment variables that is set."""
    if value is not None and value != "":
        return value
    flag, variables = _SETTINGS[name]
    for variable in variables:
        text = env.get(variable, "").strip()
        if not text:
            continue
        if name == "coordinator_address":
            return text
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{variable} must be an integer, got {text!r}") from None
    return None


def _check_values(settings: dict) -> None:
    address, count, index = (settings[k] for k in _SETTINGS)
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"coordinator address must be 'host:port' (e.g. 10.0.0.1:1234), got {address!r}"
            )
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be >= 1, got {count}")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        raise ValueError(f"process_id must be in [0, num_processes={count}), got {index}")


def _describe(names: list[str]) -> str:
    """'num_processes (--num_processes or SIMCLR_NUM_PROCESSES or JAX_NUM_PROCESSES)' per name."""
    parts = []
    for name in names:
        flag, variables = _SETTINGS[name]
        parts.append(f"{name} ({' or '.join((flag, *variables))})")
    return ", ".join(parts)


def _slurm_present(env: Mapping[str, str]) -> bool:
    return all(env.get(name) for name in SLURM_ENV_VARS)


def _detect_cluster(env: Mapping[str, str]) -> str | None:
    """'tpu', 'slurm' or 'ompi' when the environment is a multi-process job JAX can detect."""
    if any(env.get(name) for name in TPU_ENV_VARS) or os.path.exists(TPU_DEVICE_FILE):
        return "tpu"
    # A SLURM allocation with one task (an interactive shell, `srun -n1`) is a single process.
    if _slurm_present(env) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    return None
