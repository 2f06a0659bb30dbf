"""Model card: parameter counts and forward FLOPs of a model, without allocating or running it.

Shapes come from ``jax.eval_shape`` of ``init``; FLOPs from XLA's cost analysis of the *lowered*
(not compiled, not executed) eval-mode forward at batch 1, so even the 795M-parameter r152_3x_sk1
costs only seconds. XLA counts a multiply-add as 2 FLOPs and skips taps on zero padding (ResNet-50
at 224 px: ~8 GFLOPs here; the "4.1 G" of papers counts multiply-adds).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax.models.build import build_model
from simclr_jax.models.simclr import SimCLRModel

SIMCLRV2_SK_RATIO = 0.0625


@dataclasses.dataclass(frozen=True)
class Variant:
    depth: int
    width_multiplier: int
    sk_ratio: float
    published_params_m: int | None = None  # SimCLRv2 README / paper Table 1, "Param (M)"


def _variant(depth: int, width: int, sk: int, published: int | None = None) -> tuple[str, Variant]:
    return f"r{depth}_{width}x_sk{sk}", Variant(depth, width, SIMCLRV2_SK_RATIO * sk, published)


STANDARD_VARIANTS: dict[str, Variant] = dict(
    [
        _variant(18, 1, 0),
        _variant(34, 1, 0),
        _variant(50, 1, 0, 24),
        _variant(50, 1, 1, 35),
        _variant(50, 2, 0, 94),
        _variant(50, 2, 1, 140),
        _variant(101, 1, 0, 43),
        _variant(101, 1, 1, 65),
        _variant(101, 2, 0, 170),
        _variant(101, 2, 1, 257),
        _variant(152, 1, 0, 58),
        _variant(152, 1, 1, 89),
        _variant(152, 2, 0, 233),
        _variant(152, 2, 1, 354),
        _variant(152, 3, 1, 795),
        _variant(200, 1, 0),
    ]
)


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_variables(model: SimCLRModel, image_size: int, channels: int = 3) -> Any:
    """Shapes/dtypes of ``model.init`` (no memory allocated, nothing computed)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def forward_flops(model: SimCLRModel, variables: Any, image_size: int, channels: int = 3) -> float:
    """XLA's FLOP estimate for one image through the eval-mode forward (heads included)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returned one dict per device
        analysis = analysis[0]
    return float(analysis["flops"])


def describe(
    model: SimCLRModel, image_size: int, *, name: str = "custom", flops: bool = True
) -> dict:
    """One model-card row: parameter counts per part (params only, like torchvision) and GFLOPs."""
    variables = abstract_variables(model, image_size)
    params = variables["params"]
    row: dict[str, Any] = {
        "name": name,
        "depth": model.depth,
        "width_multiplier": model.width_multiplier,
        "sk_ratio": model.sk_ratio,
        "se_ratio": model.se_ratio,
        "cifar_stem": model.cifar_stem,
        "image_size": image_size,
        "backbone_params": count(params["backbone"]),
        "backbone_bn_stats": count(variables["batch_stats"]["backbone"]),
        "head_params": count(params.get("head", {})),  # absent when proj_head_mode="none"
        "classifier_params": count(params["classifier"]),
    }
    row["gflops"] = forward_flops(model, variables, image_size) / 1e9 if flops else None
    return row


def describe_variant(
    name: str, *, image_size: int = 224, num_classes: int = 1000, flops: bool = True, **fields: Any
) -> dict:
    """Row for a named standard variant (e.g. 'r152_3x_sk1'), with its published size when known."""
    if name not in STANDARD_VARIANTS:
        raise ValueError(f"variant must be one of {list(STANDARD_VARIANTS)}, got {name!r}")
    variant = STANDARD_VARIANTS[name]
    model = build_model(
        {
            "depth": variant.depth,
            "width_multiplier": variant.width_multiplier,
            "sk_ratio": variant.sk_ratio,
            "cifar_stem": None,
            **fields,
        },
        num_classes=num_classes,
        image_size=image_size,
    )
    row = describe(model, image_size, name=name, flops=flops)
    row["published_params_m"] = variant.published_params_m
    return row


def format_table(rows: list[dict]) -> str:
    """Text table. 'all vars' adds BN running statistics, as SimCLRv2's "Param (M)" counts them."""
    header = (
        f"{'model':<14}{'img':>5}{'backbone':>14}{'all vars (M)':>14}{'published':>11}"
        f"{'head':>12}{'classifier':>12}{'GFLOPs':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        all_vars = (r["backbone_params"] + r["backbone_bn_stats"]) / 1e6
        published = r.get("published_params_m")
        gflops = r.get("gflops")
        lines.append(
            f"{r['name']:<14}{r['image_size']:>5}{r['backbone_params']:>14,}{all_vars:>14.2f}"
            f"{published if published is not None else '-':>11}{r['head_params']:>12,}"
            f"{r['classifier_params']:>12,}{gflops if gflops is not None else float('nan'):>10.2f}"
        )
    return "\n".join(lines)
