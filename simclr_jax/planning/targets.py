"""Hardware to plan for: TPU slices and GPU machines, their public numbers, and compile-only devices.

`--target` names a TPU slice by libtpu topology (`v5p:8x8x8`) or by Cloud TPU accelerator type
(`v4-128`, `v5litepod-256`, `v6e-64`), or a GPU machine as `[HOSTSx]GPUxCOUNT` (`h100x8`,
`a100-80gbx8`, `2xh100x8` for two hosts). `devices(target)` returns devices XLA compiles for
without the hardware: libtpu's compile-only topologies, and the CUDA plugin's deviceless
compilation from a target description written from the vendor's public numbers below.

The numbers are per JAX device as libtpu presents it: v3 and v4 compile-only topologies have one
device per TensorCore (two per chip; a real v4 slice runs one "megacore" device per chip), v5e,
v5p, v6e one per chip. `link_bandwidth` is the bandwidth a device gives an all-reduce: Google's
all-reduce bandwidth per pod divided by its chips, or half the bidirectional ICI bandwidth where
only that is published (the two agree for v5e and v6e); for GPUs half the bidirectional NVLink
bandwidth within a host, and the InfiniBand bandwidth per GPU across hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

GIB = 2**30
TPU_DOCS = "https://cloud.google.com/tpu/docs/"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One JAX device's public peak numbers (bf16 dense FLOP/s, HBM, all-reduce bandwidth)."""

    name: str
    peak_flops: float  # bf16 dense, per device
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s an all-reduce gets per device (see the module docstring)
    source: str
    cores_per_chip: int = 1  # JAX devices per chip in libtpu's compile-only topology


# TPU rows: the chip's numbers divided by cores_per_chip (one device per core).
TPU_CHIPS: dict[str, Chip] = {
    "v3": Chip("TPU v3 core", 123e12 / 2, 32 * GIB / 2, 900e9 / 2, 340e12 / 1024 / 2,
               TPU_DOCS + "v3: 123 TFLOP/s, 32 GiB, 900 GB/s per chip; all-reduce 340 TB/s "
               "per 1024-chip pod", 2),
    "v4": Chip("TPU v4 core", 275e12 / 2, 32 * GIB / 2, 1200e9 / 2, 1.1e15 / 4096 / 2,
               TPU_DOCS + "v4: 275 TFLOP/s, 32 GiB, 1200 GB/s per chip; all-reduce 1.1 PB/s "
               "per 4096-chip pod", 2),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 819e9, 51.2e12 / 256,
                TPU_DOCS + "v5e: 197 TFLOP/s, 16 GB, 819 GB/s; all-reduce 51.2 TB/s per "
                "256-chip pod"),
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2765e9, 1200e9 / 2,
                TPU_DOCS + "v5p: 459 TFLOP/s, 95 GB, 2765 GB/s; ICI 1200 GB/s bidirectional"),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1638e9, 102.4e12 / 256,
                TPU_DOCS + "v6e: 918 TFLOP/s, 32 GB, 1638 GB/s; all-reduce 102.4 TB/s per "
                "256-chip pod"),
}  # fmt: skip

_NVIDIA = "NVIDIA datasheet (dense bf16, no sparsity): "
INFINIBAND_PER_GPU = 400e9 / 8  # one 400 Gb/s NDR port per GPU (DGX/HGX H100-class nodes)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A GPU's public numbers and the architecture facts XLA's deviceless compiler needs."""

    chip: Chip
    description: str  # the device name XLA reports
    sms: int
    compute_capability: tuple[int, int]
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_bytes: int
    clock_ghz: float


GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        Chip("NVIDIA H100 SXM 80GB", 989e12, 80e9, 3.35e12, 900e9 / 2,
             _NVIDIA + "H100 SXM: 989 TFLOP/s, 80 GB HBM3, 3.35 TB/s, NVLink 900 GB/s"),
        "NVIDIA H100 80GB HBM3", 132, (9, 0), 233472, 232448, 50 * 2**20, 1.98,
    ),
    "h200": Gpu(
        Chip("NVIDIA H200 SXM 141GB", 989e12, 141e9, 4.8e12, 900e9 / 2,
             _NVIDIA + "H200 SXM: 989 TFLOP/s, 141 GB HBM3e, 4.8 TB/s, NVLink 900 GB/s"),
        "NVIDIA H200", 132, (9, 0), 233472, 232448, 50 * 2**20, 1.98,
    ),
    "a100-80gb": Gpu(
        Chip("NVIDIA A100 SXM 80GB", 312e12, 80e9, 2.039e12, 600e9 / 2,
             _NVIDIA + "A100 80GB SXM: 312 TFLOP/s, 80 GB HBM2e, 2039 GB/s, NVLink 600 GB/s"),
        "NVIDIA A100-SXM4-80GB", 108, (8, 0), 167936, 166912, 40 * 2**20, 1.41,
    ),
    "a100-40gb": Gpu(
        Chip("NVIDIA A100 SXM 40GB", 312e12, 40e9, 1.555e12, 600e9 / 2,
             _NVIDIA + "A100 40GB SXM: 312 TFLOP/s, 40 GB HBM2, 1555 GB/s, NVLink 600 GB/s"),
        "NVIDIA A100-SXM4-40GB", 108, (8, 0), 167936, 166912, 40 * 2**20, 1.41,
    ),
}  # fmt: skip

# Cloud TPU accelerator types name cores (v3, v4, v5p) or chips (v5litepod, v6e); the
# slices' shapes as the Cloud TPU docs list them, by chip count.
_SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16",
              512: "16x32", 1024: "32x32"}  # fmt: skip
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}  # fmt: skip
_ACCELERATOR_TYPES = {  # prefix -> (generation, counts cores, shapes)
    "v3": ("v3", True, _SHAPES_2D),
    "v4": ("v4", True, _SHAPES_3D), "v5p": ("v5p", True, _SHAPES_3D),
    "v5litepod": ("v5e", False, _SHAPES_2D), "v5e": ("v5e", False, _SHAPES_2D),
    "v6e": ("v6e", False, _SHAPES_2D),
}  # fmt: skip
_TOPOLOGY = re.compile(r"^(v3|v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})(_twisted|_untwisted)?$")
_ACCELERATOR = re.compile(r"^(v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)$")
_GPU = re.compile(r"^(?:(\d+)x)?(" + "|".join(map(re.escape, GPUS)) + r")x(\d+)$")
FORMS = (
    "a TPU topology GEN:SHAPE (v3:4x4, v4:4x4x4, v5e:16x16, v5p:8x8x8, v6e:8x8), a Cloud TPU "
    "accelerator type (v3-32, v4-128, v5p-128, v5litepod-256, v6e-64), or a GPU machine "
    f"[HOSTSx]GPUxCOUNT with GPU one of {sorted(GPUS)} (h100x8, a100-80gbx8, 2xh100x8)"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed --target: what to compile for and the numbers of one of its devices."""

    name: str  # as the user wrote it
    kind: str  # 'tpu' or 'gpu'
    topology: str  # libtpu's 'v5p:8x8x8', or the CUDA plugin's 'SLICESxHOSTSxGPUS'
    chip: Chip
    hosts: int = 1  # GPU machines: hosts, whose all-reduce crosses InfiniBand
    gpu: Gpu | None = None

    @property
    def cross_host_bandwidth(self) -> float:
        """The all-reduce bandwidth per device once a collective spans hosts."""
        if self.kind == "gpu" and self.hosts > 1:
            return min(self.chip.link_bandwidth, INFINIBAND_PER_GPU)
        return self.chip.link_bandwidth


def parse(text: str) -> Target:
    """A Target from --target; a ValueError naming the accepted forms for anything else."""
    name = text.strip().lower()
    if match := _TOPOLOGY.match(name):
        generation = match[1]
        return Target(text, "tpu", name, TPU_CHIPS[generation])
    if match := _ACCELERATOR.match(name):
        generation, counts_cores, shapes = _ACCELERATOR_TYPES[match[1]]
        count = int(match[2])
        chips = count // 2 if counts_cores else count
        if chips not in shapes or (counts_cores and count % 2):
            raise ValueError(
                f"--target={text!r}: no {match[1]} slice of {count} "
                f"{'cores' if counts_cores else 'chips'}; the slices are "
                f"{', '.join(f'{match[1]}-{c * 2 if counts_cores else c}' for c in shapes)}"
            )
        return Target(text, "tpu", f"{generation}:{shapes[chips]}", TPU_CHIPS[generation])
    if match := _GPU.match(name):
        hosts, gpu, per_host = int(match[1] or 1), GPUS[match[2]], int(match[3])
        return Target(text, "gpu", f"1x{hosts}x{per_host}", gpu.chip, hosts=hosts, gpu=gpu)
    raise ValueError(f"--target={text!r} is not a target; use {FORMS}")


def devices(target: Target) -> Sequence[Any]:
    """Compile-only devices of `target` (every host's), in libtpu's or the plugin's order."""
    from jax.experimental import topologies

    if target.kind == "tpu":
        require_tpu_compiler()
        # No TPU VM to ask, and no chip to guard (several planners or test workers may share
        # libtpu). Set only while libtpu starts: left in the environment, TPU_WORKER_HOSTNAMES
        # would make this process's children believe they run on a TPU pod.
        with _environment(TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1"):
            return topologies.get_topology_desc(target.topology, "tpu").devices
    require_gpu_compiler()
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=gpu_target_config(target.gpu), topology=target.topology
    )
    return topology.devices


# What libtpu reads at start-up, and what it sets in the process's C environment while it makes
# compile-only devices (invisible to os.environ, inherited by every child process): left there,
# they tell JAX, and simclr_jax.distributed, that a child runs on a TPU pod.
_LIBTPU_ENVIRONMENT = (
    "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID",
    "CLOUD_TPU_ACCELERATOR_TYPE", "TPU_ACCELERATOR_TYPE", "TPU_PROCESS_ADDRESSES",
    "TPU_SKIP_MDS_QUERY",
)  # fmt: skip


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Set the variables that are unset; afterwards take away every libtpu start-up variable
    this process did not have before, from os.environ and from the C environment alike."""
    had = {name for name in _LIBTPU_ENVIRONMENT if name in os.environ}
    os.environ.update({name: value for name, value in variables.items() if name not in had})
    try:
        yield
    finally:
        for name in set(_LIBTPU_ENVIRONMENT) - had:
            os.environ.pop(name, None)
            os.unsetenv(name)  # also when only libtpu's setenv knew it


def require_tpu_compiler() -> None:
    """libtpu, or a one-line error saying how to install it."""
    if importlib.util.find_spec("libtpu") is None:
        import jax

        raise ImportError(
            "planning for a TPU needs libtpu, which is not installed: pip install "
            f"'jax[tpu]=={jax.__version__}' (or this package's [tpu] extra)"
        )


def gpu_compiler_installed() -> bool:
    """Whether JAX's CUDA plugin (the [plan-gpu] extra) can compile for GPUs here."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def require_gpu_compiler() -> None:
    """The CUDA plugin, or a one-line error saying how to install it."""
    if not gpu_compiler_installed():
        import jax

        raise ImportError(
            "planning for a GPU needs JAX's CUDA plugin, which is not installed: pip install "
            f"'jax-cuda12-plugin=={jax.__version__}' 'jax-cuda12-pjrt=={jax.__version__}' (or "
            "this package's [plan-gpu] extra; no GPU or CUDA libraries are needed)"
        )


def gpu_target_config(gpu: Gpu) -> str:
    """XLA's GpuTargetConfigProto (text format) for deviceless compilation, from `gpu`'s public
    architecture facts (CUDA programming guide limits that every recent NVIDIA GPU shares)."""
    major, minor = gpu.compute_capability
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.chip.hbm_bandwidth)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {int(gpu.chip.hbm_bytes)}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 patch: 0 }}
device_description_str: "{gpu.description}"
"""
