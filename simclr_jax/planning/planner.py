"""One plan: compile a config's step for a target and put the program's facts beside the bounds.

`make_plan` returns a flat dict whose keys the command prints and writes as JSON (PLAN_KEYS are
the stable ones scripts may read). Memory, FLOPs, bytes and collectives are facts about the
compiled program; every time is a lower bound (planning/roofline.py). `fit` searches the largest
per-device batch (powers of two) whose program fits, `fit_chunks` the fewest accumulation chunks
at which the config's batch fits.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax.parallel import DATA_AXIS
from simclr_jax.planning import analytic, program, roofline, stages, targets

PLAN_KEYS = (
    "target", "num_devices", "num_processes", "per_device_batch", "memory_bytes", "fits",
    "flops_per_step_per_device", "flops_per_image", "analytic_flops_per_image",
    "bytes_accessed_per_step_per_device", "collectives", "step_time_bound_s",
    "images_per_s_bound", "epoch_time_bound_s", "run_device_hours_bound",
    "host_images_per_s_needed",
)  # fmt: skip
GPU_MEMORY_FRACTION = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION on a GPU
# XLA:TPU's two ways of refusing a program too large for HBM (the bytes it needed come first).
_TPU_OOM = (
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
    re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM"),
)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def mesh_for(target: targets.Target) -> Mesh:
    """A one-axis 'data' mesh over the target's compile-only devices."""
    return Mesh(np.asarray(targets.devices(target)), (DATA_AXIS,))


def capacity_bytes(target: targets.Target, override_gib: float | None = None) -> float:
    """What one device's program may use: its HBM, or on a GPU the fraction JAX preallocates
    (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set); override_gib replaces it."""
    if override_gib:
        return override_gib * 2**30
    if target.kind == "gpu":
        import os

        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
        return target.chip.hbm_bytes * fraction
    return target.chip.hbm_bytes


def make_plan(
    config: ml_collections.ConfigDict,
    target: targets.Target,
    *,
    mesh: Mesh | None = None,
    capacity_gib: float | None = None,
    host_rate: float | None = None,
) -> dict[str, Any]:
    """Compile `config`'s step for `target` and report facts and bounds (module docstring).

    host_rate: this machine's decode + crop images/s per core (planning/host_rate.py), or None
    to leave the host columns out.
    """
    mesh = mesh if mesh is not None else mesh_for(target)
    planned = stages.build(config, mesh)
    plan = _the_run(planned, target, mesh)
    plan.update(_program_facts(planned, target, plan["num_devices"], capacity_gib))
    plan.update(_bounds(planned, target, plan, host_rate))
    return plan


def _the_run(planned: stages.PlannedStep, target: targets.Target, mesh: Mesh) -> dict[str, Any]:
    """What is planned: the stage, the target, the batch and the schedule."""
    config, num_devices = planned.config, mesh.devices.size
    return {
        "target": target.name,
        "topology": target.topology,
        "device": target.chip.name,
        "stage": planned.stage,
        "num_devices": num_devices,
        "num_processes": len({d.process_index for d in mesh.devices.flat}),
        "global_batch": config.batch_size,
        "per_device_batch": config.batch_size // num_devices,
        "dtype": config.dtype,
        "num_examples": planned.data.num_examples,
        "total_steps": planned.schedule.total_steps,
        "epochs": config.num_epochs if not config.num_steps else None,
        "peak": {
            "flops": target.chip.peak_flops,
            "hbm_bandwidth": target.chip.hbm_bandwidth,
            "link_bandwidth": target.cross_host_bandwidth,
            "source": target.chip.source,
        },
    }


def _program_facts(
    planned: stages.PlannedStep, target: targets.Target, num_devices: int, capacity_gib
) -> dict[str, Any]:
    """The compiled program's memory, FLOPs, bytes and collectives (facts, per device)."""
    started = time.perf_counter()
    lowered = planned.lower()
    compiled, memory, oom = _compile(lowered)
    compile_s = time.perf_counter() - started
    memory["capacity"] = int(capacity_bytes(target, capacity_gib))
    cost = program.cost(lowered, compiled, target.kind)
    found = {} if compiled is None else program.collectives(compiled.as_text(), num_devices)
    analytic_per_image = analytic.flops_per_image(
        planned.stage, planned.config, planned.model, channels=planned.data.channels,
        teacher=planned.teacher,
    )  # fmt: skip
    return {
        "memory_bytes": memory,
        "fits": bool((not oom) and memory["total"] <= memory["capacity"]),
        "flops_per_step_per_device": cost["flops"],
        "flops_per_image": cost["flops"] * num_devices / planned.config.batch_size,
        "analytic_flops_per_image": analytic_per_image,
        "bytes_accessed_per_step_per_device": cost["bytes_accessed"],
        "cost_source": cost["source"],
        "collectives": {kind: c.as_dict() for kind, c in found.items()},
        "compile_s": compile_s,
        "compiler": compiler_versions(target.kind),
        "notes": list(planned.notes) + _notes(target, oom) + _chunk_notes(planned.config),
    }


# The packages whose versions decide what a target's compile gives (one libtpu segfaults where a
# newer one compiles: benchmarks/RESULTS.md, "Planning").
COMPILER_PACKAGES = {
    "tpu": ("jax", "jaxlib", "libtpu"),
    "gpu": ("jax", "jaxlib", "jax-cuda12-plugin"),
}


def compiler_versions(kind: str) -> dict[str, str | None]:
    """The installed versions of the packages that compiled a plan for a `kind` target."""
    found = {}
    for name in COMPILER_PACKAGES.get(kind, ("jax", "jaxlib")):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _bounds(
    planned: stages.PlannedStep, target: targets.Target, plan: dict[str, Any], host_rate
) -> dict[str, Any]:
    """The roofline bound on the step and what follows from it (bounds, not measurements)."""
    link_bytes = sum(c["link_bytes"] for c in plan["collectives"].values())
    bound = roofline.step_bound(
        target, _flops_for_bound(planned.config, plan), plan["bytes_accessed_per_step_per_device"],
        link_bytes,
    )  # fmt: skip
    run = roofline.run_bounds(
        bound["step_s"], global_batch=plan["global_batch"], num_examples=plan["num_examples"],
        total_steps=plan["total_steps"], num_devices=plan["num_devices"],
        cores_per_chip=target.chip.cores_per_chip,
    )  # fmt: skip
    streamed = planned.data.precropped
    host_needed = run["images_per_s"] / plan["num_processes"] if streamed else 0.0
    return {
        "step_time_bound_s": bound["step_s"],
        "step_time_terms_s": {k: bound[f"{k}_s"] for k in ("compute", "memory", "collectives")},
        "limited_by": bound["limited_by"],
        "images_per_s_bound": run["images_per_s"],
        "epoch_time_bound_s": run["epoch_s"],
        "run_hours_bound": run["run_hours"],
        "run_device_hours_bound": run["run_device_hours"],
        "run_chip_hours_bound": run["run_chip_hours"],
        "host_images_per_s_needed": host_needed,
        "host_images_per_s_per_core": host_rate if streamed else None,
        "host_cores_needed": (host_needed / host_rate) if host_rate and host_needed else None,
    }


def _flops_for_bound(config: ml_collections.ConfigDict, plan: dict[str, Any]) -> float:
    """XLA's FLOPs, or with accumulation chunks the larger of XLA's and the analytic count: XLA's
    cost analysis counts a loop's body once, not once per chunk."""
    flops = plan["flops_per_step_per_device"]
    if config.accumulation_chunks > 1:
        per_device = config.batch_size / plan["num_devices"]
        flops = max(flops, plan["analytic_flops_per_image"] * per_device)
    return flops


def fit(
    config: ml_collections.ConfigDict,
    target: targets.Target,
    *,
    mesh: Mesh | None = None,
    capacity_gib: float | None = None,
    max_per_device: int = 4096,
) -> dict[str, Any]:
    """The largest power-of-two per-device batch whose program fits, and its double's plan.

    Compiles are minutes for a large model, so the search starts from a line through two
    measured sizes (memory grows about linearly with the batch; XLA:TPU reports what a program
    that does not fit would need), then walks by doubling or halving until the batch fits and
    its double does not. Returns {'per_device_batch', 'global_batch', 'fits': the plan at that
    batch (None when not even 1 fits), 'next': the plan at twice it, 'tried': [(b, fits)]}.
    """
    mesh = mesh if mesh is not None else mesh_for(target)
    devices = mesh.devices.size
    plans: dict[int, dict[str, Any]] = {}
    tried: list[tuple[int, bool]] = []

    def fits(per_device: int) -> bool:
        if per_device not in plans:
            plan = make_plan(_with_batch(config, per_device * devices), target, mesh=mesh,
                             capacity_gib=capacity_gib)  # fmt: skip
            plans[per_device] = plan
            tried.append((per_device, plan["fits"]))
        return plans[per_device]["fits"]

    first = _power_of_two_at_most(max(1, config.batch_size // devices))
    second = min(max_per_device, first * 4) if fits(first) else max(1, first // 4)
    fits(second)
    best = min(max(_estimate(plans, first, second), 1), max_per_device)
    while not fits(best) and best > 1:
        best //= 2
    if not fits(best):
        best = 0
    else:
        while best < max_per_device and fits(best * 2):
            best *= 2
    return {
        "per_device_batch": best,
        "global_batch": best * devices,
        "fits": plans.get(best),
        "next": plans.get(best * 2) if best else plans.get(1),
        "tried": tried,
    }


def fit_chunks(
    config: ml_collections.ConfigDict,
    target: targets.Target,
    *,
    mesh: Mesh | None = None,
    capacity_gib: float | None = None,
) -> dict[str, Any]:
    """The smallest accumulation_chunks K (a power of two dividing the per-device batch) at which
    the config's batch fits, and the plan at K / 2 that does not.

    Memory is about a + b / K (the state and the whole batch's projections, plus one chunk's
    activations): a line through K = 1 and K = 4 in 1 / K gives a first guess, then the search
    walks by halving or doubling. Returns {'chunks' (0 when none fits), 'fits': the plan at it,
    'previous': the plan at K / 2, 'tried': [(K, fits)]}.
    """
    mesh = mesh if mesh is not None else mesh_for(target)
    per_device = config.batch_size // mesh.devices.size
    largest = per_device & -per_device  # the largest power of two dividing it
    plans: dict[int, dict[str, Any]] = {}
    tried: list[tuple[int, bool]] = []

    def fits(chunks: int) -> bool:
        if chunks not in plans:
            plan = make_plan(_with_chunks(config, chunks), target, mesh=mesh,
                             capacity_gib=capacity_gib)  # fmt: skip
            plans[chunks] = plan
            tried.append((chunks, plan["fits"]))
        return plans[chunks]["fits"]

    best = 1
    if not fits(1) and largest > 1:
        other = min(4, largest)
        fits(other)
        best = min(max(_chunks_estimate(plans, 1, other), 2), largest)
        while not fits(best) and best < largest:
            best *= 2
        while fits(best) and best > 1 and fits(best // 2):
            best //= 2
    found = fits(best)
    return {
        "chunks": best if found else 0,
        "fits": plans[best] if found else None,
        "previous": plans.get(best // 2) if found else plans[best],
        "tried": tried,
    }


def _chunks_estimate(plans: dict[int, dict[str, Any]], a: int, b: int) -> int:
    """The smallest power of two K with a line through two (1 / K, total) points under capacity."""
    total = {k: plans[k]["memory_bytes"]["total"] for k in (a, b)}
    capacity = plans[a]["memory_bytes"]["capacity"]
    slope = (total[a] - total[b]) / (1 / a - 1 / b)
    fixed = total[a] - slope / a
    if slope <= 0 or fixed >= capacity:
        return 2**30  # no K fits on this line: the caller tries its largest K
    return int(2 ** np.ceil(np.log2(max(1.0, slope / (capacity - fixed)))))


def _estimate(plans: dict[int, dict[str, Any]], a: int, b: int) -> int:
    """The largest power of two under the line through two measured (batch, total) points."""
    if a == b:
        return a
    total = {n: plans[n]["memory_bytes"]["total"] for n in (a, b)}
    capacity = plans[a]["memory_bytes"]["capacity"]
    slope = (total[a] - total[b]) / (a - b)
    if slope <= 0:
        return max(a, b)
    return _power_of_two_at_most(max(1, int((capacity - (total[a] - slope * a)) / slope)))


def _power_of_two_at_most(n: int) -> int:
    return 2 ** int(np.floor(np.log2(max(1, n))))


def _with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
    changed = copy.deepcopy(config)
    with changed.unlocked():
        changed.batch_size = batch
        if "memory" in changed and changed.memory.enabled and changed.memory.size < batch:
            changed.memory.size = batch  # the queue must hold one step's keys
    return changed


def _with_chunks(config: ml_collections.ConfigDict, chunks: int) -> ml_collections.ConfigDict:
    changed = copy.deepcopy(config)
    with changed.unlocked():
        changed.accumulation_chunks = chunks
    return changed


@contextlib.contextmanager
def _without_compilation_cache():
    """Compile-only executables cannot be loaded back from JAX's persistent cache (there is no
    device to load them on), so planning neither writes nor reads it."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _compile(lowered: jax.stages.Lowered) -> tuple[Any, dict[str, Any], bool]:
    """(compiled or None, memory dict, out of memory?): XLA:TPU refuses at compile time a
    program that does not fit, with the bytes it would have used (all of them, or its
    temporaries alone: then a total at least that large), which become the total."""
    try:
        with _without_compilation_cache():
            compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - only XLA:TPU's out-of-memory refusal is ours
        match = next(filter(None, (form.search(str(error)) for form in _TPU_OOM)), None)
        if match is None:
            raise
        used = float(match[1]) * _UNITS[match[2]]
        keys = ("arguments", "temporaries", "outputs", "aliases", "generated_code", "peak")
        return None, {**dict.fromkeys(keys), "total": int(used)}, True
    return compiled, program.memory(compiled), False


def _chunk_notes(config: ml_collections.ConfigDict) -> list[str]:
    if config.accumulation_chunks <= 1:
        return []
    return [
        f"accumulation_chunks={config.accumulation_chunks}: XLA counts each chunk loop's body "
        "once, so its FLOPs and bytes are per chunk there; the compute bound uses the analytic "
        "count, the memory bound stays XLA's (weaker)"
    ]


def _notes(target: targets.Target, oom: bool) -> list[str]:
    notes = []
    if oom:
        notes.append(
            "XLA:TPU refused the program at compile time (out of HBM): the total is the bytes "
            "it reported needing; the parts and the collectives are unknown"
        )
    if target.kind == "gpu":
        notes.append(
            "GPU compile without a device: no autotuning, so kernels and temporaries can differ "
            "from a compile on the real GPU"
        )
    if target.chip.cores_per_chip > 1:
        notes.append(
            f"{target.topology}: one JAX device per TensorCore ({target.chip.cores_per_chip} per "
            "chip) in libtpu's compile-only topology; figures are per core"
        )
    return notes
