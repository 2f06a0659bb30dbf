"""Facts about a compiled program, per device: memory, FLOPs, bytes accessed and collectives.

These are XLA's own figures for the program it built, not estimates: `memory_analysis()` of the
executable, XLA's HLO cost analysis, and the collectives read off the optimized HLO text.

Where the figures come from, by target:
- TPU: the compiled executable's cost analysis (after fusion; per device).
- GPU: the compiled executable has no cost analysis without a device, and after optimization the
  convolutions are cuDNN custom calls whose FLOPs no analysis sees. FLOPs come from XLA's generic
  cost analysis of the lowered per-device program (before fusion), bytes accessed from the
  optimized program (without the convolutions' operands: a lower bound).

Collectives inside a loop body count once per iteration when XLA knows the trip count.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

import jax

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes a ring algorithm sends per device, as a multiple of the result's bytes, for a group of n.
_LINK_FACTOR = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\("
)
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(calls|body|to_apply|branch_computations)=\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    count: int  # executions per step
    bytes: float  # result bytes per device per step
    link_bytes: float  # bytes a ring algorithm sends per device per step

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "bytes": self.bytes, "link_bytes": self.link_bytes}


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes per device: arguments, temporaries, outputs, aliases (outputs that reuse argument
    buffers: the donated state), the program itself, XLA's peak, and the total at once.

    The total is the larger of the parts' sum and XLA's peak: XLA:TPU leaves the buffers of a
    loop's body (gradient accumulation's chunks) out of temp_size but counts them in its peak."""
    stats = compiled.memory_analysis()
    found = {
        "arguments": int(stats.argument_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "aliases": int(stats.alias_size_in_bytes),
        "generated_code": int(stats.generated_code_size_in_bytes),
    }
    found["total"] = (
        found["arguments"]
        + found["temporaries"]
        + found["outputs"]
        - found["aliases"]
        + found["generated_code"]
    )
    found["peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)  # 0: not reported
    found["total"] = max(found["total"], found["peak"])
    return found


def cost(
    lowered: jax.stages.Lowered, compiled: jax.stages.Compiled | None, kind: str
) -> dict[str, Any]:
    """{'flops', 'bytes_accessed', 'source'}: XLA's count per device (see the module docstring)."""
    if kind == "tpu" and compiled is not None:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list | tuple):  # older jax: one dict per device
            analysis = analysis[0]
        return {
            "flops": float(analysis["flops"]),
            "bytes_accessed": float(analysis["bytes accessed"]),
            "source": "XLA:TPU cost analysis of the compiled program",
        }
    flops = _generic_cost(lowered.compiler_ir("hlo").get_hlo_module())["flops"]
    accessed = None
    if compiled is not None:
        optimized = compiled.runtime_executable().hlo_modules()[0]
        accessed = _generic_cost(optimized)["bytes accessed"]
    return {
        "flops": float(flops),
        "bytes_accessed": None if accessed is None else float(accessed),
        "source": "XLA's HLO cost analysis: FLOPs of the lowered program (cuDNN convolutions "
        "are opaque after optimization); bytes of the optimized one, convolutions excluded",
    }


def _generic_cost(module: Any) -> dict[str, float]:
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)


def collectives(hlo_text: str, num_devices: int) -> dict[str, Collective]:
    """Count and bytes of each kind of collective in an optimized HLO module, per step."""
    bodies, entry = _computations(hlo_text)
    times = _executions(bodies, entry)
    found: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for name, lines in bodies.items():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            op, n = match["op"], _group_size(line, num_devices)
            size = _result_bytes(match["shape"], op, bool(match["start"]))
            runs = times.get(name, 0)
            found[op][0] += runs
            found[op][1] += runs * size
            found[op][2] += runs * size * _LINK_FACTOR[op](n)
    return {op: Collective(int(c), b, link) for op, (c, b, link) in sorted(found.items())}


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match:
                current = match["name"]
                bodies[current] = []
                entry = current if match["entry"] else entry
        elif line.strip() == "}":
            current = None
        else:
            bodies[current].append(line)
    return bodies, entry


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry (loop bodies times their
    known trip count; once where XLA does not know it)."""
    times: dict[str, int] = defaultdict(int)

    def visit(name: str, count: int, depth: int = 0) -> None:
        if depth > 64 or name not in bodies:
            return
        times[name] += count
        for line in bodies[name]:
            trip = _TRIP.search(line)
            for kind, callees in _CALLS.findall(line):
                repeat = int(trip[1]) if (trip and kind == "body") else 1
                for callee in re.findall(r"%([\w.\-]+)", callees):
                    visit(callee, count * repeat, depth + 1)

    visit(entry, 1)
    return times


def _result_bytes(shape: str, op: str, is_start: bool) -> float:
    arrays = [_BYTES[dtype] * _product(dims) for dtype, dims in _ARRAY.findall(shape)]
    if is_start and op in ("all-gather", "collective-permute", "all-to-all") and len(arrays) > 1:
        arrays = arrays[len(arrays) // 2 :]  # async start: (operands..., results...)
    return float(sum(arrays))


def _product(dims: str) -> int:
    total = 1
    for d in filter(None, dims.split(",")):
        total *= int(d)
    return total


def _group_size(line: str, num_devices: int) -> int:
    if match := _GROUPS_LIST.search(line):
        return max(1, len(match[1].split(",")))
    if match := _GROUPS_IOTA.search(line):
        return int(match[2])
    return num_devices
