"""The SimCLR network's inference forward pass, written once over abstract operations (`Ops`).

The ONNX graph (onnx_graph.py) and the PyTorch module (torch_model.py) both run this walk, so the
two exports cannot disagree about the architecture; each backend only says what a convolution or
a pooling is. It mirrors models/resnet.py, models/convnet.py, models/heads.py and
models/simclr.py in inference mode (BatchNorm on its moving statistics), and layers are named by
their Flax module paths ('backbone/block_group1/block1/conv1'), so a backend finds a layer's
weights under the names the checkpoint gives them. No JAX here: PyTorch users import this.

The padding rules that exporters of TF-trained ResNets get wrong (tests/test_export.py makes
them fail on purpose):
  * convolutions use TF's "fixed" padding, (k - 1) // 2 before and the rest after: symmetric for
    the odd kernels of these networks, so torch's `padding=k // 2` is the same;
  * the stem's 3x3 / 2 max-pool uses TF's SAME padding, which for an even input side pads 0
    before and 1 after (`same_pads`); torch's MaxPool2d(3, 2, padding=1) pads 1 on both sides
    and so shifts every window by one pixel;
  * ResNet-D's stride-2 shortcut pads one zero row and column at the end and averages 2x2 windows
    counting them; its stride-1 shortcut averages only the real pixels of SAME windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from simclr_jax.resnet_layout import (  # noqa: F401 - the layout the backends walk
    BLOCKS_PER_GROUP,
    BOTTLENECK_DEPTHS,
    GROUP_STRIDES,
    STAGE_NAMES,
)

Pads = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


class Ops(Protocol):
    """What a backend provides. `x` is whatever the backend computes with (a tensor, a name)."""

    def has(self, path: str) -> bool: ...  # whether the network has a layer at `path`
    def conv(self, path: str, x: Any, stride: int = 1) -> Any: ...  # TF fixed padding
    def batch_norm(self, path: str, x: Any) -> Any: ...
    def dense(self, path: str, x: Any) -> Any: ...
    def relu(self, x: Any) -> Any: ...
    def sigmoid(self, x: Any) -> Any: ...
    def add(self, x: Any, y: Any) -> Any: ...
    def mul(self, x: Any, y: Any) -> Any: ...
    def spatial_size(self, x: Any) -> tuple[int, int]: ...
    def max_pool(self, x: Any, window: int, stride: int, pads: Pads) -> Any: ...  # -inf pads
    # Zero padding; count_pads: whether the padded zeros count in each window's average.
    def avg_pool(self, x: Any, window: int, stride: int, pads: Pads, count_pads: bool) -> Any: ...
    def edge_pad(self, x: Any, bottom: int, right: int) -> Any: ...  # repeat the last row/col
    def mean_hw(self, x: Any, keepdims: bool) -> Any: ...  # average over the spatial axes
    def split_channels(self, x: Any) -> tuple[Any, Any]: ...  # the two halves of the channels
    def softmax_pair(self, a: Any, b: Any) -> tuple[Any, Any]: ...  # softmax over {a, b}


def same_pads(size: int, window: int, stride: int) -> tuple[int, int]:
    """TF/XLA SAME padding of one axis: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def output_names(architecture: Mapping[str, Any]) -> list[str]:
    """The outputs an export can give: features, head_0..head_K, projection, logits."""
    heads = [f"head_{k}" for k in range(architecture["head_layers"] + 1)]
    return ["features", *heads, "projection", "logits"]


def check_output(output: str, architecture: Mapping[str, Any]) -> None:
    """A one-line ValueError unless `output` is one of output_names."""
    allowed = output_names(architecture)
    if output not in allowed:
        raise ValueError(
            f"--output={output!r} is not an output of this network; allowed: features, "
            f"projection, logits, head_0..head_{architecture['head_layers']}"
        )


def forward(
    ops: Ops, architecture: Mapping[str, Any], images: Any, wanted: Iterable[str]
) -> dict[str, Any]:
    """The `wanted` outputs (output_names) of the network on `images`, computing no more."""
    wanted = set(wanted)
    if architecture["backbone"] == "convnet":
        x = _convnet(ops, architecture, images)
    else:
        x = _resnet(ops, architecture, images)
    outputs = {"features": ops.mean_hw(x, keepdims=False)}
    layers = architecture["head_layers"]
    needed = _head_layers_needed(architecture, wanted)
    hidden = outputs["head_0"] = outputs["features"]
    for j in range(1, needed + 1):
        hidden = ops.batch_norm(f"head/bn{j}", ops.dense(f"head/dense{j}", hidden))
        if j < layers:
            hidden = ops.relu(hidden)
        outputs[f"head_{j}"] = hidden
    if "projection" in wanted:
        outputs["projection"] = outputs[f"head_{layers}"]
    if "logits" in wanted:
        x = outputs[f"head_{architecture['selected']}"]
        if architecture["classifier_input_norm"]:
            x = ops.batch_norm("classifier_norm", x)
        outputs["logits"] = ops.dense("classifier", x)
    return {name: outputs[name] for name in wanted}


def _head_layers_needed(architecture: Mapping[str, Any], wanted: set[str]) -> int:
    """How many projection-head layers the wanted outputs need."""
    needed = [0]
    for name in wanted:
        if name == "projection":
            needed.append(architecture["head_layers"])
        elif name == "logits":
            needed.append(architecture["selected"])
        elif name.startswith("head_"):
            needed.append(int(name.removeprefix("head_")))
    return max(needed)


def _conv_bn(ops: Ops, path: str, conv: str, bn: str, x: Any, stride: int = 1, relu=True) -> Any:
    x = ops.batch_norm(f"{path}/{bn}", ops.conv(f"{path}/{conv}", x, stride))
    return ops.relu(x) if relu else x


def _resnet(ops: Ops, architecture: Mapping[str, Any], x: Any) -> Any:
    x = _stem(ops, architecture, x)
    bottleneck = architecture["depth"] in BOTTLENECK_DEPTHS
    for group, blocks in enumerate(BLOCKS_PER_GROUP[architecture["depth"]]):
        for i in range(blocks):
            path = f"backbone/block_group{group + 1}/block{i + 1}"
            stride = GROUP_STRIDES[group] if i == 0 else 1
            shortcut = _projection(ops, architecture, path, x, stride) if i == 0 else x
            if bottleneck:
                y = _conv_bn(ops, path, "conv1", "bn1", x)
                y = _strided_3x3(ops, architecture, path, y, stride, "conv2", "bn2")
                y = _conv_bn(ops, path, "conv3", "bn3", y, relu=False)
            else:
                y = _strided_3x3(ops, architecture, path, x, stride, "conv1", "bn1")
                y = _conv_bn(ops, path, "conv2", "bn2", y, relu=False)
            if ops.has(f"{path}/se"):
                y = _squeeze_excite(ops, f"{path}/se", y)
            x = ops.relu(ops.add(y, shortcut))
    return x


def _stem(ops: Ops, architecture: Mapping[str, Any], x: Any) -> Any:
    path = "backbone/stem"
    if architecture["cifar_stem"]:
        return _conv_bn(ops, path, "conv1", "bn1", x)
    if architecture["resnet_d"]:
        x = _conv_bn(ops, path, "conv1", "bn1", x, stride=2)
        x = _conv_bn(ops, path, "conv2", "bn2", x)
        x = _conv_bn(ops, path, "conv3", "bn3", x)
    else:
        x = _conv_bn(ops, path, "conv1", "bn1", x, stride=2)
    height, width = ops.spatial_size(x)
    return ops.max_pool(x, 3, 2, (same_pads(height, 3, 2), same_pads(width, 3, 2)))


def _projection(ops: Ops, architecture: Mapping[str, Any], path: str, x: Any, stride: int) -> Any:
    if architecture["resnet_d"]:
        if stride > 1:
            x = ops.avg_pool(x, 2, stride, ((0, 1), (0, 1)), count_pads=True)
        else:
            height, width = ops.spatial_size(x)
            pads = (same_pads(height, 2, 1), same_pads(width, 2, 1))
            x = ops.avg_pool(x, 2, 1, pads, count_pads=False)
        stride = 1
    return ops.batch_norm(f"{path}/bn_proj", ops.conv(f"{path}/proj_conv", x, stride))


def _strided_3x3(ops: Ops, architecture, path: str, x: Any, stride: int, conv: str, bn: str):
    """The block's strided 3x3 conv + BN + ReLU, or its selective-kernel conv."""
    if not architecture["sk"]:
        return _conv_bn(ops, path, conv, bn, x, stride)
    path = f"{path}/sk_conv"
    first, second = ops.split_channels(_conv_bn(ops, path, "conv", "bn", x, stride))
    squeezed = ops.mean_hw(ops.add(first, second), keepdims=True)
    squeezed = _conv_bn(ops, path, "mix_reduce", "bn_mix", squeezed)
    weight_first, weight_second = ops.softmax_pair(
        *ops.split_channels(ops.conv(f"{path}/mix_expand", squeezed))
    )
    return ops.add(ops.mul(first, weight_first), ops.mul(second, weight_second))


def _squeeze_excite(ops: Ops, path: str, x: Any) -> Any:
    squeezed = ops.relu(ops.conv(f"{path}/se_reduce", ops.mean_hw(x, keepdims=True)))
    return ops.mul(ops.sigmoid(ops.conv(f"{path}/se_expand", squeezed)), x)


def _convnet(ops: Ops, architecture: Mapping[str, Any], x: Any) -> Any:
    convs = (1, 1, 1, architecture["depth"] - 3)
    strides = (2, 2, 1, 1)
    for name, count, stride in zip(STAGE_NAMES[:4], convs, strides, strict=True):
        for k in range(count):
            x = _conv_bn(ops, f"backbone/{name}", f"conv{k + 1}", f"bn{k + 1}", x, stride)
            stride = 1
    height, width = ops.spatial_size(x)
    x = ops.avg_pool(ops.edge_pad(x, height % 2, width % 2), 2, 2, ((0, 0), (0, 0)), True)
    return _conv_bn(ops, "backbone/block_group4", "conv1", "bn1", x)
