"""Build a checked SimCLRModel from ``config.model``: a bad value fails here, naming its field."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.checks import is_int, is_number, require
from simclr_jax.models import convnet
from simclr_jax.models.heads import PROJ_HEAD_MODES, num_head_layers
from simclr_jax.models.resnet import BLOCKS_PER_GROUP, total_stride
from simclr_jax.models.simclr import BACKBONES, FINE_TUNE_AFTER_BLOCK_RANGE, SimCLRModel

MODEL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SimCLRModel) if f.name not in ("parent", "name")
)


def _require(ok: bool, field: str, allowed: str, value: Any) -> None:
    require(ok, f"model.{field}", allowed, value)


def validate_model_fields(fields: Mapping[str, Any], *, image_size: int) -> None:
    """Raise ValueError naming the first field outside its allowed values."""
    unknown = sorted(set(fields) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; allowed fields: {list(MODEL_FIELDS)}")
    f = {f.name: f.default for f in dataclasses.fields(SimCLRModel) if f.name in MODEL_FIELDS}
    f.update(fields)
    _require(f["backbone"] in BACKBONES, "backbone", f"one of {list(BACKBONES)}", f["backbone"])
    if f["backbone"] == "convnet":
        _require(
            is_int(f["depth"]) and f["depth"] >= convnet.MIN_DEPTH,
            "depth",
            f"the number of 3x3 convs of the convnet, an integer >= {convnet.MIN_DEPTH}",
            f["depth"],
        )
        for name in ("sk_ratio", "se_ratio"):
            _require(f[name] == 0, name, "0 with backbone='convnet' (a ResNet option)", f[name])
    else:
        _require(
            f["depth"] in BLOCKS_PER_GROUP,
            "depth",
            f"one of {sorted(BLOCKS_PER_GROUP)}",
            f["depth"],
        )
    for name in ("width_multiplier", "base_width"):
        _require(is_int(f[name]) and f[name] >= 1, name, "an integer >= 1", f[name])
    for name in ("sk_ratio", "se_ratio"):
        _require(is_number(f[name]) and f[name] >= 0, name, "a number >= 0", f[name])
    _require(
        isinstance(f["cifar_stem"], bool), "cifar_stem", "True, False or None", f["cifar_stem"]
    )
    _require(
        f["proj_head_mode"] in PROJ_HEAD_MODES,
        "proj_head_mode",
        f"one of {PROJ_HEAD_MODES}",
        f["proj_head_mode"],
    )
    for name in ("num_proj_layers", "proj_out_dim", "num_classes"):
        _require(is_int(f[name]) and f[name] >= 1, name, "an integer >= 1", f[name])
    num_layers = num_head_layers(f["proj_head_mode"], f["num_proj_layers"])
    _require(
        is_int(f["ft_proj_selector"]) and -1 <= f["ft_proj_selector"] <= num_layers,
        "ft_proj_selector",
        f"an integer in -1..{num_layers} (-1 = the last head layer; proj_head_mode="
        f"{f['proj_head_mode']!r}, num_proj_layers={f['num_proj_layers']})",
        f["ft_proj_selector"],
    )
    _require(
        f["fine_tune_after_block"] in FINE_TUNE_AFTER_BLOCK_RANGE,
        "fine_tune_after_block",
        "an integer in -1..4 (-1 = nothing frozen, 0 = stem, k = up to block_group<k>)",
        f["fine_tune_after_block"],
    )
    _require(
        is_number(f["bn_momentum"]) and 0 <= f["bn_momentum"] < 1,
        "bn_momentum",
        "in [0, 1)",
        f["bn_momentum"],
    )
    _require(
        is_number(f["bn_epsilon"]) and f["bn_epsilon"] > 0, "bn_epsilon", "> 0", f["bn_epsilon"]
    )
    if f["backbone"] == "convnet":
        min_size, network = convnet.TOTAL_STRIDE, "the convnet"
    else:
        min_size = total_stride(f["cifar_stem"])
        network = f"a ResNet with the {'CIFAR' if f['cifar_stem'] else 'ImageNet'} stem"
    if not is_int(image_size) or image_size < min_size:
        raise ValueError(
            f"image_size must be an integer >= {min_size} (the total stride of {network}), "
            f"got {image_size!r}"
        )


def build_model(
    model_config: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    num_classes: int,
    image_size: int,
    axis_name: str | None = None,
    dtype: Any = jnp.float32,
    **overrides: Any,
) -> SimCLRModel:
    """SimCLRModel from ``config.model`` (+ keyword overrides), validated.

    ``cifar_stem=None`` means auto: the CIFAR stem for images of at most 32 pixels (as reference).
    ``dtype`` is the compute dtype (a dtype or its name, e.g. 'bfloat16'); parameters stay float32.
    ``global_bn=False`` in the config drops ``axis_name``: BatchNorm statistics stay per replica.
    """
    if isinstance(model_config, ml_collections.ConfigDict):
        model_config = model_config.to_dict()
    fields = dict(model_config)
    fields.update(overrides)
    global_bn = fields.pop("global_bn", True)
    _require(isinstance(global_bn, bool), "global_bn", "True or False", global_bn)
    # What trains is the run's business (models.frozen_tree), not the network's.
    freeze_head = fields.pop("freeze_head_in_linear_eval", False)
    _require(
        isinstance(freeze_head, bool), "freeze_head_in_linear_eval", "True or False", freeze_head
    )
    if not global_bn:
        axis_name = None
    fields.update(num_classes=num_classes, axis_name=axis_name, dtype=jnp.dtype(dtype))
    if fields.get("cifar_stem") is None:
        fields["cifar_stem"] = image_size <= 32
    validate_model_fields(fields, image_size=image_size)
    return SimCLRModel(**fields)


def build_for_run(
    config: ml_collections.ConfigDict,
    model_config: ml_collections.ConfigDict,
    num_classes: int,
    **overrides: Any,
) -> SimCLRModel:
    """The network a stage trains: `model_config` (config.model, a student's) at the run's image
    size and compute dtype (config.dataset.image_size, config.dtype), BN across replicas."""
    return build_model(
        model_config,
        num_classes=num_classes,
        image_size=config.dataset.image_size,
        axis_name="data",  # parallel.DATA_AXIS
        dtype=config.dtype,
        **overrides,
    )


def init_variables(
    model: SimCLRModel,
    *,
    seed: int,
    image_size: int,
    channels: int,
    sharding: Any = None,
) -> dict[str, Any]:
    """The model's variables from `seed` (BN in inference mode: no collectives), placed by `sharding`.

    On the CPU the initialiser is compiled without backend optimisation: LLVM spends tens of seconds
    optimising random-number code that runs once (same values to 1 ulp; benchmarks/RESULTS.md has
    the times). Accelerators compile it normally.
    """
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False), out_shardings=sharding)
    if isinstance(dummy, jax.core.Tracer):  # traced (jax.eval_shape: the planner's abstract state)
        return init(jax.random.key(seed), dummy)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.lower(jax.random.key(seed), dummy).compile(compiler_options=options)(
        jax.random.key(seed), dummy
    )
