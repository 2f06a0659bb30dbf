"""A plain convnet shaped for the CPU: the backbone of the embedded demo (`model.backbone='convnet'`).

Why not a narrow ResNet: on a CPU, XLA computes the weight gradient of narrow, high-resolution 3x3
convolutions at a few percent of the machine's matmul rate (and those of 3x3 convolutions on 2x2
maps at less), while wide convolutions at low resolution and 1x1 convolutions run near it
(benchmarks/cpu_efficiency.py measures both). So this network leaves the input resolution at
once and does its work at 7x7:

    stem          3x3 conv, stride 2, C          (28 px -> 14)
    block_group1  3x3 conv, stride 2, 2C         (14 -> 7)
    block_group2  3x3 conv, 4C                   (7)
    block_group3  depth - 3 3x3 convs, 4C        (7)
    block_group4  2x2 average pool, 1x1 conv, 16C (7 -> 4)
    features      global average pool: 16C dims

C = base_width * width_multiplier; every conv is followed by BatchNorm and ReLU. `depth` counts the
3x3 convolutions (>= 4). The wide last 1x1 layer gives the linear classifier 16C features for the
price of a matrix product. Stages carry the ResNet's names, so `fine_tune_after_block` freezes them
the same way (outputs stop-gradient'ed, BatchNorm in inference mode).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.resnet import (
    STAGE_NAMES,
    Trunk,
    conv_factory,
    fixed_padding,
    norm_factory,
)

MIN_DEPTH = 4  # stem, block_group1, block_group2 and at least one conv in block_group3
TOTAL_STRIDE = 8  # the input side must be at least this (two stride-2 convs and the pool)


class ConvNet(Trunk):
    """The CPU-shaped trunk. Returns every stage's output and the float32 pooled features."""

    depth: int = MIN_DEPTH
    base_width: int = 32
    width_multiplier: int = 1

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        if self.depth < MIN_DEPTH:
            raise ValueError(f"a convnet's depth must be >= {MIN_DEPTH}, got {self.depth!r}")
        width = self.base_width * self.width_multiplier
        # (stage, [(features, kernel, stride), ...]) in the order above.
        layers = [
            [(width, 3, 2)],
            [(2 * width, 3, 2)],
            [(4 * width, 3, 1)],
            [(4 * width, 3, 1)] * (self.depth - 3),
            [(16 * width, 1, 1)],
        ]
        outputs: dict[str, jax.Array] = {}
        x = images.astype(self.dtype)
        for index, (name, stage_layers) in enumerate(zip(STAGE_NAMES, layers, strict=True)):
            frozen = index <= self.fine_tune_after_block
            if name == STAGE_NAMES[-1]:
                x = _average_pool_2x2(x)
            x = _Stage(
                tuple(stage_layers),
                use_running_average=frozen or not train,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name=name,
            )(x)
            if frozen:
                x = jax.lax.stop_gradient(x)
            outputs[name] = x
        outputs["features"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return outputs


class _Stage(nn.Module):
    """Conv + BatchNorm + ReLU layers, each given as (features, kernel, stride)."""

    layers: tuple[tuple[int, int, int], ...]
    use_running_average: bool
    bn_momentum: float
    bn_epsilon: float
    axis_name: str | None
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = norm_factory(
            use_running_average=self.use_running_average,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )
        for k, (features, kernel, stride) in enumerate(self.layers):
            module = _PointwiseConv if (kernel, stride) == (1, 1) else nn.Conv
            x = conv_factory(self.dtype, module)(
                features, (kernel, kernel), strides=stride, padding=fixed_padding(kernel),
                name=f"conv{k + 1}",
            )(x)  # fmt: skip
            x = nn.relu(norm(name=f"bn{k + 1}")(x))
        return x


class _PointwiseConv(nn.Module):
    """A 1x1 convolution written as the matrix product it is (same parameter as nn.Conv's).

    XLA:CPU computes nn.Conv's 1x1 weight gradient at a third of its matmul rate; as a dot over
    the pixels it is one GEMM, forward and backward. It takes nn.Conv's arguments so that _Stage
    builds either the same way; _Stage uses it only where they mean a 1x1, stride-1 layer without
    bias (kernel_size, strides, padding and use_bias are then fixed, and not read).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int
    padding: Any
    use_bias: bool
    kernel_init: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])


def _average_pool_2x2(x: jax.Array) -> jax.Array:
    """Halve the side (an odd side is padded by repeating its last row and column first)."""
    height, width = x.shape[1], x.shape[2]
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
