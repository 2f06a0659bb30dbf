"""A lower bound on the step time from the compiled program's facts and the chip's peak numbers.

step >= max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth, collective bytes / link
bandwidth), per device. Each term assumes its resource runs at its public peak and overlaps
perfectly with the others, so the bound is what the hardware cannot beat, not a prediction: a
real step also pays for imperfect overlap, kernel efficiency and input. Everything derived from it
(images/s, epoch and run time, device-hours) is a bound of the same kind.
"""

from __future__ import annotations

from typing import Any

from simclr_jax.planning.targets import Target


def step_bound(
    target: Target, flops: float, bytes_accessed: float | None, link_bytes: float
) -> dict[str, Any]:
    """{'compute_s', 'memory_s', 'collectives_s', 'step_s', 'limited_by'} per device per step."""
    terms = {
        "compute": flops / target.chip.peak_flops,
        "memory": (bytes_accessed or 0.0) / target.chip.hbm_bandwidth,
        "collectives": link_bytes / target.cross_host_bandwidth,
    }
    limited_by = max(terms, key=terms.get)
    return {
        "compute_s": terms["compute"],
        "memory_s": terms["memory"],
        "collectives_s": terms["collectives"],
        "step_s": terms[limited_by],
        "limited_by": limited_by,
    }


def run_bounds(
    step_s: float,
    *,
    global_batch: int,
    num_examples: int,
    total_steps: int,
    num_devices: int,
    cores_per_chip: int,
) -> dict[str, float]:
    """Images/s, epoch and whole-run time and device-hours implied by a step-time bound."""
    images_per_s = global_batch / step_s
    run_hours = total_steps * step_s / 3600
    return {
        "images_per_s": images_per_s,
        "epoch_s": num_examples / images_per_s,
        "run_hours": run_hours,
        "run_device_hours": run_hours * num_devices,
        "run_chip_hours": run_hours * num_devices / cores_per_chip,
    }
