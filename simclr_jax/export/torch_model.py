"""A simclr_jax network in PyTorch, from the file `python -m simclr_jax.export --format=torch`
writes. No JAX here: PyTorch users need only torch, safetensors and this package.

    from simclr_jax.export.torch_model import load
    net = load("r50.safetensors")             # in eval mode
    y = net(images)                           # float32 NCHW in [0, 1] -> the export's output
    outs = net.outputs(images, ["features", "projection"])

The layers are torch's own (Conv2d, BatchNorm2d/1d, Linear), named by the Flax module paths
('backbone.block_group1.block1.conv1.weight'), so `net.train()` fine-tunes it like any torch
model; BatchNorm keeps the run's epsilon and its momentum (torch's 0.1 = 1 - Flax's 0.9). The
forward pass is architecture.forward, the one the ONNX export runs too. `SamePadMaxPool2d` is
TF's SAME max-pool, for torchvision models loaded from a `--format=torchvision` file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simclr_jax.export import METADATA_KEY
from simclr_jax.export import architecture as arch_lib


class SimCLRNet(nn.Module):
    """The network of an exported file: layers built from the weights' shapes."""

    def __init__(
        self,
        architecture: Mapping[str, Any],
        shapes: Mapping[str, Sequence[int]],
        output: str = "features",
        bn_momentum: float = 0.9,
    ):
        super().__init__()
        arch_lib.check_output(output, architecture)
        self.architecture, self.output = dict(architecture), output
        layers: dict[str, dict[str, Sequence[int]]] = {}
        for key, shape in shapes.items():
            path, _, leaf = key.rpartition(".")
            layers.setdefault(path, {})[leaf] = shape
        for path, leaves in layers.items():
            self._add(path, self._layer(path, leaves, architecture, bn_momentum))
        last = f"head.bn{architecture['head_layers']}"
        if architecture["head_layers"]:  # the head's last BatchNorm has no offset (heads.py)
            self.get_submodule(last).bias.requires_grad_(False)

    @staticmethod
    def _layer(path: str, leaves: Mapping[str, Sequence[int]], architecture, momentum: float):
        if "running_mean" in leaves:
            kind = nn.BatchNorm2d if path.startswith("backbone.") else nn.BatchNorm1d
            return kind(
                leaves["running_mean"][0],
                eps=architecture["bn_epsilon"],
                momentum=1.0 - momentum,
                affine="weight" in leaves,
            )
        weight = leaves["weight"]
        if len(weight) == 2:
            return nn.Linear(weight[1], weight[0], bias="bias" in leaves)
        # Stride and padding come from the forward pass (F.conv2d); the module holds the weights.
        return nn.Conv2d(weight[1], weight[0], tuple(weight[2:]), bias="bias" in leaves)

    def _add(self, path: str, module: nn.Module) -> None:
        *parents, leaf = path.split(".")
        node: nn.Module = self
        for name in parents:
            if name not in node._modules:
                node.add_module(name, nn.ModuleDict())
            node = node._modules[name]
        node.add_module(leaf, module)

    def outputs(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named outputs (features, head_0.., projection, logits) of NCHW images in [0, 1]."""
        for name in names:
            arch_lib.check_output(name, self.architecture)
        return arch_lib.forward(_TorchOps(self), self.architecture, images, names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images, [self.output])[self.output]


class _TorchOps:
    """architecture.Ops on torch tensors (NCHW)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def _layer(self, path: str) -> nn.Module:
        return self.net.get_submodule(path.replace("/", "."))

    def has(self, path: str) -> bool:
        try:
            self._layer(path)
        except AttributeError:
            return False
        return True

    def conv(self, path: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        layer = self._layer(path)
        kh, kw = layer.weight.shape[2:]
        # TF fixed padding: (k - 1) // 2 before, the rest after.
        x = F.pad(x, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2))
        return F.conv2d(x, layer.weight, layer.bias, stride=stride)

    def batch_norm(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return self._layer(path)(x)

    def dense(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return self._layer(path)(x)

    relu = staticmethod(F.relu)
    sigmoid = staticmethod(torch.sigmoid)
    add = staticmethod(torch.add)
    mul = staticmethod(torch.mul)

    def spatial_size(self, x: torch.Tensor) -> tuple[int, int]:
        return int(x.shape[-2]), int(x.shape[-1])

    def max_pool(self, x: torch.Tensor, window: int, stride: int, pads) -> torch.Tensor:
        (top, bottom), (left, right) = pads
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, window, stride)

    def avg_pool(self, x, window: int, stride: int, pads, count_pads: bool) -> torch.Tensor:
        (top, bottom), (left, right) = pads
        summed = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), window, stride)
        if count_pads:
            return summed
        ones = torch.ones_like(x[:1, :1])
        counted = F.avg_pool2d(F.pad(ones, (left, right, top, bottom)), window, stride)
        return summed / counted

    def edge_pad(self, x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
        return F.pad(x, (0, right, 0, bottom), mode="replicate") if bottom or right else x

    def mean_hw(self, x: torch.Tensor, keepdims: bool) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=keepdims)

    def split_channels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = torch.chunk(x, 2, dim=1)
        return first, second

    def softmax_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = torch.softmax(torch.stack([a, b]), dim=0).unbind(0)
        return first, second


class SamePadMaxPool2d(nn.Module):
    """3x3 / 2 max-pool with TF's SAME padding (0 before and 1 after on an even side), the stem
    pool of simclr_jax and TF ResNets. Replaces torchvision's MaxPool2d(3, 2, padding=1):
    `model.maxpool = SamePadMaxPool2d()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        pads = (arch_lib.same_pads(height, 3, 2), arch_lib.same_pads(width, 3, 2))
        return _TorchOps(self).max_pool(x, 3, 2, pads)


def description(path: str) -> dict[str, Any]:
    """The JSON description an exported file carries (architecture, output, input, source)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} was not written by simclr_jax.export --format=torch")
    return json.loads(metadata[METADATA_KEY])


def load(path: str, *, output: str | None = None, device: str = "cpu") -> SimCLRNet:
    """The exported network of `path` (a .safetensors file) in eval mode; `output` overrides
    the one chosen at export."""
    from safetensors.torch import load_file

    described = description(path)
    state = load_file(path, device=device)
    net = SimCLRNet(
        described["architecture"],
        {key: tuple(value.shape) for key, value in state.items() if "num_batches" not in key},
        output or described["output"],
        bn_momentum=described.get("bn_momentum", 0.9),
    )
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()
