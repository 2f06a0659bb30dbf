"""Flax weights as PyTorch state dicts (NumPy only): torch_model's names, or torchvision's.

Conv kernels go from Flax's HWIO to torch's OIHW, dense kernels [in, out] to Linear's
[out, in]; BatchNorm's scale/bias/mean/var become weight/bias/running_mean/running_var (with
torch's num_batches_tracked), and a BatchNorm without an offset gets a zero bias.

torchvision (`--format=torchvision`): its ResNet-50/101/152 have our layers at the same places
(stride in the 3x3 conv, a projection shortcut in the first block of every group, the same
7x7/2 stem conv padded by 3, BatchNorm epsilon 1e-5), except the stem's max-pool: torchvision
pads it symmetrically, TF SAME pads 0 before and 1 after on an even side (224 px -> 112), so
windows shift by one pixel. Its keys load as they are; `model.maxpool =
torch_model.SamePadMaxPool2d()` makes the outputs equal. Refused: ResNet-18/34 (torchvision's
first block has no projection shortcut where ours has one), selective kernels / ResNet-D,
squeeze-excitation, widths other than 1x, the CIFAR stem and the convnet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from simclr_jax.export import architecture as arch_lib

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_state(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch_model.SimCLRNet's state dict, from {'params/a/b/kernel': array, ...}."""
    state: dict[str, np.ndarray] = {}
    norms = {
        key.rsplit("/", 1)[0].split("/", 1)[1] for key in weights if key.startswith("batch_stats/")
    }
    for key, value in weights.items():
        _, path, leaf = _split(key)
        layer = path.replace("/", ".")
        if path in norms:
            state[f"{layer}.{_BN_NAMES[leaf]}"] = value
        elif leaf == "kernel":
            state[f"{layer}.weight"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        else:
            state[f"{layer}.{leaf}"] = value
    for path in norms:
        layer = path.replace("/", ".")
        if f"{layer}.weight" in state and f"{layer}.bias" not in state:
            state[f"{layer}.bias"] = np.zeros_like(state[f"{layer}.weight"])
        state[f"{layer}.num_batches_tracked"] = np.zeros((), np.int64)
    return c_ordered(state)


def c_ordered(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every array in C order, sorted by key: safetensors.numpy writes an array's memory as it is
    (a transposed view would be saved scrambled); np.ascontiguousarray would turn scalars 1-D."""
    return {key: np.asarray(state[key], order="C") for key in sorted(state)}


def _split(key: str) -> tuple[str, str, str]:
    collection, rest = key.split("/", 1)
    path, leaf = rest.rsplit("/", 1)
    return collection, path, leaf


def torchvision_refusal(architecture: Mapping[str, Any]) -> str | None:
    """Why torchvision's ResNet cannot hold this network, or None when it can."""
    if architecture["backbone"] != "resnet":
        return "the network is the convnet, not a ResNet"
    reasons = []
    if architecture["depth"] not in arch_lib.BOTTLENECK_DEPTHS:
        reasons.append(
            f"ResNet-{architecture['depth']}'s first block has a projection shortcut that "
            "torchvision's has not"
        )
    if architecture["sk"]:
        reasons.append("selective kernels and the ResNet-D stem/shortcuts are not torchvision's")
    if architecture["se"]:
        reasons.append("squeeze-excitation is not torchvision's")
    if architecture["width_multiplier"] != 1 or architecture["base_width"] != 64:
        reasons.append("torchvision's ResNets are 1x (base width 64)")
    if architecture["cifar_stem"]:
        reasons.append("the CIFAR stem (3x3/1, no max-pool) is not torchvision's 7x7/2 stem")
    return "; ".join(reasons) or None


def torchvision_state(
    weights: Mapping[str, np.ndarray], architecture: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], bool]:
    """(torchvision ResNet state dict, whether it has the classifier as `fc`).

    `fc` is written when the classifier reads the backbone's features (a pretraining probe's
    input BatchNorm folded into it); one that reads a projection-head layer has no place in
    torchvision's ResNet, and the head is left out in any case.
    """
    refusal = torchvision_refusal(architecture)
    if refusal:
        raise ValueError(f"--format=torchvision: {refusal}; use --format=torch")
    ours = torch_state(weights)
    state = {}
    for key, value in ours.items():
        name = _torchvision_name(key)
        if name is not None:
            state[name] = value
    with_fc = architecture["selected"] == 0
    if with_fc:
        state["fc.weight"], state["fc.bias"] = _folded_classifier(weights, architecture)
    return c_ordered(state), with_fc


def _torchvision_name(key: str) -> str | None:
    parts = key.split(".")
    if parts[0] != "backbone":
        return None
    if parts[1] == "stem":
        return ".".join(parts[2:])
    group, block, layer, leaf = parts[1:]
    index = int(block.removeprefix("block")) - 1
    layer = {"proj_conv": "downsample.0", "bn_proj": "downsample.1"}.get(layer, layer)
    return f"layer{group.removeprefix('block_group')}.{index}.{layer}.{leaf}"


def _folded_classifier(weights, architecture) -> tuple[np.ndarray, np.ndarray]:
    """fc's (weight [classes, features], bias): the classifier, its input BatchNorm folded in."""
    kernel = weights["params/classifier/kernel"].astype(np.float64)
    bias = weights["params/classifier/bias"].astype(np.float64)
    if architecture["classifier_input_norm"]:
        mean = weights["batch_stats/classifier_norm/mean"].astype(np.float64)
        var = weights["batch_stats/classifier_norm/var"].astype(np.float64)
        inverse = 1.0 / np.sqrt(var + architecture["bn_epsilon"])
        bias = bias - (mean * inverse) @ kernel
        kernel = kernel * inverse[:, None]
    return kernel.T.astype(np.float32), bias.astype(np.float32)
