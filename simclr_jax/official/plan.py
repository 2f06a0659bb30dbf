"""Which of our networks a parsed checkpoint is, and where each of its variables goes.

The architecture is inferred from the variables alone: the trunk from the number of conv kernels
and batch norms and the stem's kernel size (every depth 18-200, with or without selective kernels,
ImageNet or CIFAR stem, is tried; exactly one fits), the width from the stem's channels, the
SK ratio from the squeeze convs, the head from its layers, the classes from the classifier. The
plan is then checked against the shapes of our model (`jax.eval_shape`: nothing is allocated):
a variable without a place, a shape that differs, or a model parameter the checkpoint lacks is an
error naming it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax.configs import base as base_config
from simclr_jax.models import build_model
from simclr_jax.models.card import SIMCLRV2_SK_RATIO
from simclr_jax.models.resnet import BLOCKS_PER_GROUP, BOTTLENECK_DEPTHS, SK_MIN_DIM
from simclr_jax.official import walk
from simclr_jax.official.parse import ConversionError, Parsed, Shape, listing
from simclr_jax.train import checkpoint

OFFICIAL_BASE_WIDTH = 64  # the official ResNets have 64 x width_multiplier stem channels
IMAGENET_CLASSES = 1000  # classifier added (zeros) when a checkpoint has none
IMAGE_SIZE = 224  # the released models' input size


@dataclasses.dataclass(frozen=True)
class Plan:
    """Our model's architecture fields and, for each of its variables, the checkpoint key to read."""

    model: dict[str, Any]  # architecture fields of config.model
    num_classes: int
    name: str  # e.g. 'r50_1x_sk1'
    sources: dict[str, str]  # our path ('params/backbone/stem/conv1/kernel') -> checkpoint key
    added: dict[str, str]  # our path -> why it is not read (created as zeros)
    shapes: dict[str, Shape]  # our path -> shape, for every variable of the model
    parsed: Parsed


def make_plan(parsed: Parsed) -> Plan:
    """Infer the architecture of `parsed`, map every variable, check every shape."""
    model, layers = _architecture(parsed)
    num_classes = IMAGENET_CLASSES
    if parsed.classifier is not None:
        num_classes = parsed.shapes[parsed.classifier["bias"]][0]
    sources = _sources(parsed, layers)
    added = {}
    if parsed.classifier is None:
        why = "the checkpoint has no linear classifier: zeros (fine-tuning replaces it)"
        added = {"params/classifier/kernel": why, "params/classifier/bias": why}
    shapes = model_shapes(model, num_classes)
    _check(parsed, sources, added, shapes, architecture_name(model))
    return Plan(model, num_classes, architecture_name(model), sources, added, shapes, parsed)


def architecture_name(model: dict[str, Any]) -> str:
    """The released models' naming: r<depth>_<width>x_sk<0|1> (base width noted when not 64)."""
    name = f"r{model['depth']}_{model['width_multiplier']}x_sk{int(model['sk_ratio'] > 0)}"
    if model["base_width"] != OFFICIAL_BASE_WIDTH:
        name += f"_base{model['base_width']}"
    return name


def model_shapes(model: dict[str, Any], num_classes: int) -> dict[str, Shape]:
    """{'params/...': shape, 'batch_stats/...': shape} of our model, from shapes only."""
    return dict(_model_shapes(tuple(sorted(model.items())), num_classes))


@functools.lru_cache(maxsize=16)  # tracing a ResNet-152 takes seconds; layouts share architectures
def _model_shapes(model: tuple[tuple[str, Any], ...], num_classes: int) -> dict[str, Shape]:
    network = build_model(dict(model), num_classes=num_classes, image_size=IMAGE_SIZE)
    dummy = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    init = functools.partial(network.init, train=False)
    return checkpoint.flat_shapes(jax.eval_shape(init, jax.random.key(0), dummy))


# ------------------------------------------------------------------------------ architecture


def _architecture(parsed: Parsed) -> tuple[dict[str, Any], list[walk.Layer]]:
    depth, sk, cifar_stem, layers = _trunk(parsed)
    convs = [layer for layer in layers if layer.kind == "conv"]
    stem_convs = sum(layer.path.startswith("backbone/stem/") for layer in convs)
    stem_channels = parsed.shapes[parsed.convs[stem_convs - 1]][-1]
    if stem_channels % OFFICIAL_BASE_WIDTH == 0:
        base_width, width = OFFICIAL_BASE_WIDTH, stem_channels // OFFICIAL_BASE_WIDTH
    else:  # not an official width: read as a narrower base (the test models are such)
        base_width, width = stem_channels, 1
    sk_ratio = _sk_ratio(parsed, convs, base_width * width) if sk else 0.0

    head = parsed.head
    defaults = base_config.model_config()
    model = dict(
        backbone="resnet",
        depth=depth,
        width_multiplier=width,
        base_width=base_width,
        sk_ratio=sk_ratio,
        se_ratio=0.0,
        cifar_stem=cifar_stem,
        proj_head_mode=parsed.head_mode,
        num_proj_layers=max(len(head), 1),
        proj_out_dim=parsed.shapes[head[-1]["kernel"]][-1] if head else defaults.proj_out_dim,
        bn_momentum=defaults.bn_momentum,
        bn_epsilon=defaults.bn_epsilon,  # 1e-5 as the official code (v1 and v2, TF1 and TF2)
    )
    return model, layers


def _trunk(parsed: Parsed) -> tuple[int, bool, bool, list[walk.Layer]]:
    """(depth, sk, cifar_stem, layers): the one trunk whose conv/BN counts and stem kernel fit."""
    if not parsed.convs:
        raise ConversionError("the checkpoint holds no convolution kernel: not a ResNet")
    n_conv, n_bn = len(parsed.convs), len(parsed.norms)
    first = parsed.shapes[parsed.convs[0]]
    fits = []
    for depth in BLOCKS_PER_GROUP:
        for sk in (False, True):
            if sk and depth not in BOTTLENECK_DEPTHS:
                continue
            for cifar_stem in (False, True):
                layers = walk.backbone_layers(depth, sk=sk, cifar_stem=cifar_stem)
                stem_kernel = 3 if sk or cifar_stem else 7
                if (walk.count(layers, "conv"), walk.count(layers, "bn")) == (n_conv, n_bn) and (
                    first[:2] == (stem_kernel, stem_kernel)
                ):
                    fits.append((depth, sk, cifar_stem, layers))
    if len(fits) != 1:
        raise ConversionError(
            f"{n_conv} conv kernels and {n_bn} batch norms (first kernel {first}) fit "
            f"{'no' if not fits else len(fits)} ResNet (depth 18-200, with or without selective "
            "kernels): variables are missing, or this is not a SimCLR checkpoint"
        )
    return fits[0]


def _sk_ratio(parsed: Parsed, convs: list[walk.Layer], base: int) -> float:
    """0.0625 (all released models) when every squeeze conv fits it, else the ratio they show."""
    squeezes = {}  # filters of a group -> (key, mid channels) of its first block's squeeze conv
    for layer, key in zip(convs, parsed.convs, strict=True):
        if layer.path.endswith("block1/sk_conv/mix_reduce"):
            group = int(layer.path.split("block_group")[1][0])
            squeezes[base * 2 ** (group - 1)] = (key, parsed.shapes[key][-1])

    def fits(ratio: float) -> bool:
        return all(mid == max(int(f * ratio), SK_MIN_DIM) for f, (_, mid) in squeezes.items())

    if fits(SIMCLRV2_SK_RATIO):
        return SIMCLRV2_SK_RATIO
    widest = max(squeezes)
    ratio = squeezes[widest][1] / widest
    if not fits(ratio):
        key, mid = squeezes[widest]
        raise ConversionError(f"{key}: {mid} channels fit no selective-kernel ratio")
    return ratio


# ------------------------------------------------------------------------------------- mapping


def _sources(parsed: Parsed, layers: list[walk.Layer]) -> dict[str, str]:
    """Our path -> checkpoint key, pairing each family in creation order."""
    sources = {}
    convs = [layer for layer in layers if layer.kind == "conv"]
    norms = [layer for layer in layers if layer.kind == "bn"]
    for layer, key in zip(convs, parsed.convs, strict=True):
        sources[f"params/{layer.path}/kernel"] = key
    for layer, roles in zip(norms, parsed.norms, strict=True):
        sources.update(_norm(layer.path, roles))
    for j, roles in enumerate(parsed.head, start=1):
        sources[f"params/head/dense{j}/kernel"] = roles["kernel"]
        sources.update(_norm(f"head/bn{j}", {k: v for k, v in roles.items() if k != "kernel"}))
    if parsed.classifier is not None:
        for role, key in parsed.classifier.items():
            sources[f"params/classifier/{role}"] = key
    return sources


def _norm(path: str, roles: dict[str, str]) -> dict[str, str]:
    collection = {"scale": "params", "bias": "params", "mean": "batch_stats", "var": "batch_stats"}
    return {f"{collection[role]}/{path}/{role}": key for role, key in roles.items()}


def _check(parsed: Parsed, sources, added, shapes, name: str) -> None:
    problems = []
    for path, key in sources.items():
        if path not in shapes:
            problems.append(f"{key}: has no place in our {name} (would be {path})")
        elif parsed.shapes[key] != shapes[path]:
            problems.append(
                f"{key}: shape {parsed.shapes[key]}, but {path} of {name} is {shapes[path]}"
            )
    problems += [
        f"{path}: our {name} needs it and the checkpoint has nothing for it"
        for path in shapes
        if path not in sources and path not in added
    ]
    if problems:
        raise ConversionError(
            listing(f"the checkpoint does not fit the inferred {name} ({len(problems)}):", problems)
        )
