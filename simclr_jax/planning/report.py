"""The plan as text: what a user reads before spending a pod-week."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def describe(plan: dict[str, Any]) -> str:
    """A short report: the run, memory (FITS or not), FLOPs, collectives, bounds, host, notes."""
    memory = plan["memory_bytes"]
    lines = [
        f"Plan for {plan['stage']} on {plan['target']} ({plan['topology']}): "
        f"{plan['num_devices']} x {plan['device']}, {plan['num_processes']} process(es)",
        f"  batch {plan['global_batch']:,} ({plan['per_device_batch']:,} per device), "
        f"{plan['dtype']}; {plan['num_examples']:,} images per epoch, "
        f"{plan['total_steps']:,} steps" + _epochs(plan),
        "Memory per device (XLA, the compiled program):",
        "  " + _memory_parts(memory),
        f"  total {_gib(memory['total'])} of {_gib(memory['capacity'])}: "
        + ("FITS" if plan["fits"] else "DOES NOT FIT"),
        "Work per step per device (XLA):",
        f"  {plan['flops_per_step_per_device'] / 1e12:.3f} TFLOP; per image "
        f"{plan['flops_per_image'] / 1e9:.2f} GFLOP (analytic "
        f"{plan['analytic_flops_per_image'] / 1e9:.2f}, XLA/analytic "
        f"{plan['flops_per_image'] / plan['analytic_flops_per_image']:.3f})",
        "  " + _accessed(plan["bytes_accessed_per_step_per_device"]),
        "  collectives: " + _collectives(plan["collectives"]),
        "Bounds (peak numbers, perfect overlap; no run is faster, real runs are slower):",
        "  step >= " + _terms(plan) + f" = {plan['step_time_bound_s'] * 1e3:.2f} ms "
        f"({plan['limited_by']})",
        f"  <= {plan['images_per_s_bound']:,.0f} images/s; epoch >= "
        f"{_duration(plan['epoch_time_bound_s'])}; the run >= {_duration(plan['run_hours_bound'] * 3600)}"
        f" = {plan['run_device_hours_bound']:,.1f} device-hours "
        f"({plan['run_chip_hours_bound']:,.1f} chip-hours)",
    ]
    lines += _host(plan)
    lines += [f"Note: {note}" for note in plan["notes"]]
    lines.append(f"Peak numbers: {plan['peak']['source']}")
    return "\n".join(lines)


def describe_fit(found: dict[str, Any]) -> str:
    tried = ", ".join(f"{b}: {'fits' if ok else 'no'}" for b, ok in found["tried"])
    if not found["per_device_batch"]:
        return f"Fit: not even 1 image per device fits (tried per-device batch {tried})"
    nxt = found["next"]
    beyond = (
        f"; {found['per_device_batch'] * 2} per device needs {_gib(nxt['memory_bytes']['total'])}"
        if nxt
        else ""
    )
    best = found["fits"]
    return (
        f"Fit: the largest power-of-two batch that fits is {found['per_device_batch']} per device "
        f"(global {found['global_batch']:,}), {_gib(best['memory_bytes']['total'])} of "
        f"{_gib(best['memory_bytes']['capacity'])}{beyond} (tried {tried})"
    )


def describe_fit_chunks(found: dict[str, Any]) -> str:
    tried = ", ".join(f"{k}: {'fits' if ok else 'no'}" for k, ok in found["tried"])
    if not found["chunks"]:
        needs = _gib(found["previous"]["memory_bytes"]["total"])
        return f"Fit: no accumulation_chunks makes this batch fit ({needs} at most chunks; tried {tried})"
    best, before = found["fits"], found["previous"]
    beyond = (
        f"; {found['chunks'] // 2} needs {_gib(before['memory_bytes']['total'])}" if before else ""
    )
    return (
        f"Fit: the fewest accumulation_chunks at which batch {best['global_batch']:,} fits is "
        f"{found['chunks']} ({best['per_device_batch'] // found['chunks']:,} images per device per "
        f"chunk), {_gib(best['memory_bytes']['total'])} of {_gib(best['memory_bytes']['capacity'])}"
        f"{beyond} (tried {tried})"
    )


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / GIB:.2f} GiB"


def _memory_parts(memory: dict[str, Any]) -> str:
    names = ("arguments", "temporaries", "outputs", "aliases", "generated_code", "peak")
    return ", ".join(
        f"{name.replace('_', ' ')} {_gib(memory.get(name))}" for name in names if name in memory
    )


def _accessed(value: float | None) -> str:
    if value is None:
        return "bytes accessed: unknown"
    return f"{value / 1e9:.2f} GB accessed from HBM"


def _collectives(found: dict[str, Any]) -> str:
    if not found:
        return "none (or unknown)"
    return ", ".join(
        f"{kind} {c['count']} x ({c['bytes'] / 1e6:.1f} MB in all, {c['link_bytes'] / 1e6:.1f} "
        "MB over links)"
        for kind, c in found.items()
    )


def _terms(plan: dict[str, Any]) -> str:
    terms = plan["step_time_terms_s"]
    return "max(" + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in terms.items()) + ")"


def _epochs(plan: dict[str, Any]) -> str:
    return f" ({plan['epochs']:g} epochs)" if plan.get("epochs") else ""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _host(plan: dict[str, Any]) -> list[str]:
    needed = plan["host_images_per_s_needed"]
    if not needed:
        return ["Host: the dataset lives on the devices; hosts send indices only"]
    line = f"Host: each of {plan['num_processes']} host(s) must decode and crop >= {needed:,.0f} images/s"
    rate = plan.get("host_images_per_s_per_core")
    if rate:
        line += (
            f"; this machine does {rate:,.0f} per core, so >= {plan['host_cores_needed']:.1f} "
            "cores per host"
        )
    return [line]
