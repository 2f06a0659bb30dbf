"""The "will it fit, and how long" table: the planner over SimCLRv2's models and the targets.

    python benchmarks/plan_table.py --out benchmarks/plans            # compile every cell (hours)
    python benchmarks/plan_table.py --out benchmarks/plans --table    # the markdown from the JSONs

Each cell is one `python -m simclr_jax.plan` process (its JSON lands in --out), so a failed or
interrupted cell costs only itself and a rerun skips the cells already there. GPU cells need the
[plan-gpu] packages on PYTHONPATH or installed (`make plan-gpu`). Memory, FLOPs and collectives
are facts about the compiled programs; every time in the table is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("r50_1x_sk0", "r50_1x_sk1", "r101_2x_sk1", "r152_3x_sk1")
TARGETS = ("v3:4x4", "v4:4x4x4", "v5e:16x16", "v5p:4x4x4", "v6e:8x8", "h100x8")
EXTRA = (  # (name, config, target): the official README's anchor and one GPU's CIFAR-10
    ("v1_r50_1x_sk0", "configs/pretrain_imagenet.py:v1", "v3:4x4"),
    ("cifar10_r18", "configs/pretrain_cifar10.py:reference", "h100x1"),
)
# Gradient accumulation: ResNet-50 at the papers' batch of 4096 on one GPU box, one TPU host, one GPU.
CHUNKS = (1, 2, 4, 8, 16)
CHUNK_TARGETS = ("h100x8", "v4:2x2x1", "h100x1")


def cells() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(cell, config, target, config overrides) for every cell of the tables."""
    found = [
        (f"{model}@{target}", f"configs/pretrain_imagenet.py:{model}", target, ())
        for model in MODELS
        for target in TARGETS
    ]
    found += [(f"{name}@{target}", config, target, ()) for name, config, target in EXTRA]
    return found + [
        (f"r50_1x_sk0_b4096_k{k}@{target}", "configs/pretrain_imagenet.py:r50_1x_sk0", target,
         ("--config.batch_size=4096", f"--config.accumulation_chunks={k}"))
        for target in CHUNK_TARGETS
        for k in CHUNKS
    ]  # fmt: skip


def file_name(cell: str) -> str:
    return cell.replace(":", "_").replace("@", "__") + ".json"


def compile_cells(out: Path, host_rate: float, timeout_s: int, only: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for cell, config, target, overrides in cells():
        path = out / file_name(cell)
        if path.exists() or (only and only not in cell):
            continue
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "simclr_jax.plan", f"--config={ROOT / config}",
             f"--target={target}", f"--out={path}", f"--host_rate={host_rate}", *overrides],
            capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )  # fmt: skip
        status = "ok" if done.returncode == 0 else "FAILED: " + done.stderr.strip()[-300:]
        print(f"{cell}: {time.time() - started:.0f} s, {status}", flush=True)


def table(out: Path) -> str:
    rows = [
        "| model | target | devices | fits? | HBM per device (GiB) | TFLOP per step per device "
        "| XLA / analytic FLOPs | epoch >= | 100 epochs >= (device-h) | 800 epochs >= (device-h) "
        "| limited by | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, _, target, overrides in cells():
        if overrides:
            continue
        path = out / file_name(cell)
        if not path.exists():
            rows.append(f"| {cell.split('@')[0]} | {target} | (not compiled) |" + " |" * 9)
            continue
        plan = json.loads(path.read_text())
        memory = plan["memory_bytes"]
        step_h = plan["step_time_bound_s"] / 3600
        per_epoch = plan["num_examples"] / plan["global_batch"]
        hours = {e: step_h * per_epoch * e * plan["num_devices"] for e in (100, 800)}
        rows.append(
            f"| {cell.split('@')[0]} | {target} | {plan['num_devices']} | "
            f"{'yes' if plan['fits'] else '**no**'} | {_at_least(memory)}{memory['total'] / 2**30:.1f} of "
            f"{memory['capacity'] / 2**30:.1f} | {plan['flops_per_step_per_device'] / 1e12:.2f} | "
            f"{plan['flops_per_image'] / plan['analytic_flops_per_image']:.3f} | "
            f"{plan['epoch_time_bound_s']:.0f} s | {hours[100]:,.0f} | {hours[800]:,.0f} | "
            f"{plan['limited_by']} | {plan['compile_s']:.0f}{_libtpu(plan)} |"
        )
    return "\n".join(rows)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _at_least(memory: dict) -> str:
    """'>= ' where XLA:TPU refused the program and reported only what it needed (no parts)."""
    return ">= " if memory.get("arguments") is None else ""


def chunk_table(out: Path) -> str:
    """Gradient accumulation's memory and compute bound per K (ResNet-50, batch 4096). The
    compute term, not the whole bound: XLA counts a chunk loop's body once, so its bytes (the
    memory term) are one chunk's; the compute term uses the analytic FLOPs when K > 1."""
    rows = [
        "| target | K | images per device per chunk | total per device (GiB) | XLA peak (GiB) "
        "| fits? | compute term >= (s) | compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell, _, target, overrides in cells():
        path = out / file_name(cell)
        if not overrides or not path.exists():
            continue
        plan = json.loads(path.read_text())
        k = int(overrides[-1].split("=")[1])
        memory = plan["memory_bytes"]
        rows.append(
            f"| {target} | {k} | {plan['per_device_batch'] // k} | "
            f"{_at_least(memory)}{memory['total'] / 2**30:.2f} of {memory['capacity'] / 2**30:.1f} | "
            f"{_gib(memory.get('peak'))} | {'yes' if plan['fits'] else '**no**'} | "
            f"{plan['step_time_terms_s']['compute']:.4f} | {plan['compile_s']:.0f} |"
        )
    return "\n".join(rows)


def _libtpu(plan: dict) -> str:
    """The libtpu that compiled a TPU cell, where its JSON records one (plans made before the
    planner recorded its compiler used the [tpu] extra's libtpu)."""
    version = plan.get("compiler", {}).get("libtpu")
    return f" (libtpu {version})" if version else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "plans")
    parser.add_argument("--table", action="store_true", help="print the table from the JSONs")
    parser.add_argument("--host_rate", type=float, default=0.0, help="images/s per core (0: skip)")
    parser.add_argument("--timeout_s", type=int, default=7200)
    parser.add_argument("--only", default=None, help="compile only cells whose name has this")
    args = parser.parse_args()
    if args.table:
        print(table(args.out) + "\n\n" + chunk_table(args.out))
    else:
        compile_cells(args.out, args.host_rate, args.timeout_s, args.only)


if __name__ == "__main__":
    main()
