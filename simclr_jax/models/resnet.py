"""ResNet v1 backbones (depth 18-200) with SimCLRv2's selective kernels, ResNet-D and SE options.

The layer semantics follow google-research/simclr (tf2/resnet.py) so results are comparable with the
published models:

* convolutions have no bias, TF "fixed" padding ((k-1)//2 before, the rest after) and a
  truncated-normal fan-in initialiser (Keras ``VarianceScaling()``);
* BatchNorm after every convolution (momentum 0.9, epsilon 1e-5 by default); the last BN of each
  residual branch starts with gamma = 0 so every block begins as the identity;
* the first block of every group has a projection shortcut (the reference does this even where
  shapes match, e.g. the first block of a ResNet-18);
* ``sk_ratio > 0`` turns on SimCLRv2's ResNet-D stem (three 3x3 convs), the ResNet-D shortcut
  (average pool, then a stride-1 1x1 conv) and selective-kernel convolutions. The reference only
  uses SK convs in bottleneck blocks; here the basic blocks of ResNet-18/34 get one too (in place of
  their first 3x3 conv), so ``sk_ratio`` means the same thing at every depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.resnet_layout import (  # noqa: F401 - also read from here by the model code
    BLOCKS_PER_GROUP,
    BOTTLENECK_DEPTHS,
    GROUP_STRIDES,
    STAGE_NAMES,
)

SK_MIN_DIM = 32  # The reference never lets the SK mixing bottleneck go below 32 channels.

# Keras' VarianceScaling() default: scale 1, fan_in, truncated normal.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

ModuleFactory = Callable[..., nn.Module]


def conv_factory(dtype: Any, module: Callable[..., nn.Module] = nn.Conv) -> ModuleFactory:
    """Convolutions as every network here builds them: no bias, Keras' initialiser, float32
    parameters, computed in `dtype`."""
    return functools.partial(
        module, use_bias=False, kernel_init=conv_kernel_init, dtype=dtype, param_dtype=jnp.float32
    )


def norm_factory(
    *, use_running_average: bool, momentum: float, epsilon: float, axis_name, dtype: Any
) -> ModuleFactory:
    """BatchNorm as every network here builds it: float32 parameters, computed in `dtype`."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=use_running_average,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def fixed_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """TF-reference padding: independent of input size, so strided convs align like the original."""
    before = (kernel_size - 1) // 2
    after = kernel_size - 1 - before
    return ((before, after), (before, after))


def total_stride(cifar_stem: bool) -> int:
    """Downsampling factor from the input image to the last block group's feature map."""
    stem_stride = 1 if cifar_stem else 4
    return stem_stride * 2 ** (len(GROUP_STRIDES) - 1)


class SelectiveKernelConv(nn.Module):
    """SimCLRv2's selective-kernel 3x3 conv (https://arxiv.org/abs/1903.06586).

    One conv makes two 3x3 branches at once (2x channels, then split); a squeeze of their sum
    decides, per channel, a softmax mix of the two branches. Includes its own BN + ReLU, like the
    reference.
    """

    features: int
    strides: int
    sk_ratio: float
    conv: ModuleFactory
    norm: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(
            2 * self.features,
            (3, 3),
            strides=self.strides,
            padding=fixed_padding(3),
            name="conv",
        )(x)
        x = nn.relu(self.norm(name="bn")(x))
        branches = jnp.stack(jnp.split(x, 2, axis=-1))  # [2, B, H, W, C]

        squeezed = jnp.mean(branches.sum(axis=0), axis=(1, 2), keepdims=True)
        mid_dim = max(int(self.features * self.sk_ratio), SK_MIN_DIM)
        squeezed = self.conv(mid_dim, (1, 1), name="mix_reduce")(squeezed)
        squeezed = nn.relu(self.norm(name="bn_mix")(squeezed))
        logits = self.conv(2 * self.features, (1, 1), name="mix_expand")(squeezed)
        logits = jnp.stack(jnp.split(logits, 2, axis=-1))  # [2, B, 1, 1, C]
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=0).astype(x.dtype)
        return jnp.sum(branches * weights, axis=0)


class SqueezeExcite(nn.Module):
    """Channel gating (https://arxiv.org/abs/1709.01507); reduced width int(filters * se_ratio)."""

    filters: int
    se_ratio: float
    conv: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        reduced = max(1, int(self.filters * self.se_ratio))
        squeezed = nn.relu(self.conv(reduced, (1, 1), use_bias=True, name="se_reduce")(squeezed))
        gate = self.conv(x.shape[-1], (1, 1), use_bias=True, name="se_expand")(squeezed)
        return jax.nn.sigmoid(gate) * x


def projection_shortcut(
    x: jax.Array,
    *,
    features: int,
    strides: int,
    resnet_d: bool,
    conv: ModuleFactory,
    norm: ModuleFactory,
) -> jax.Array:
    """1x1 conv + BN shortcut; ResNet-D (https://arxiv.org/abs/1812.01187) average-pools first.

    Must be called from inside a compact module: it registers 'proj_conv' and 'bn_proj' on it.
    """
    if resnet_d:
        if strides > 1:
            # Reference: pad one row/column at the end, then a VALID 2x2 average pool.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = nn.avg_pool(x, (2, 2), strides=(strides, strides), padding="VALID")
        else:
            # TF's SAME average pool averages only the real pixels at the border.
            x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)
        strides = 1
    x = conv(features, (1, 1), strides=strides, padding=fixed_padding(1), name="proj_conv")(x)
    return norm(name="bn_proj")(x)


class _Block(nn.Module):
    """What a residual block is given (BlockGroup builds them)."""

    features: int
    strides: int
    use_projection: bool
    sk_ratio: float
    se_ratio: float
    conv: ModuleFactory
    norm: ModuleFactory


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34). With SK the first (strided) one is a selective-kernel conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = _block_shortcut(self, x, self.features)
        y = _strided_3x3(self, x, conv_name="conv1", norm_name="bn1")
        y = self.conv(self.features, (3, 3), padding=fixed_padding(3), name="conv2")(y)
        y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
        return _residual_out(self, y, shortcut)


class BottleneckBlock(_Block):
    """1x1 -> 3x3 (strided; SK when sk_ratio > 0) -> 1x1 (4x features) bottleneck (ResNet-50+)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = 4 * self.features
        shortcut = _block_shortcut(self, x, out_features)
        y = self.conv(self.features, (1, 1), padding=fixed_padding(1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _strided_3x3(self, y, conv_name="conv2", norm_name="bn2")
        y = self.conv(out_features, (1, 1), padding=fixed_padding(1), name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
        return _residual_out(self, y, shortcut)


def _block_shortcut(block: _Block, x: jax.Array, out_features: int) -> jax.Array:
    """A block's shortcut: the identity, or its projection (ResNet-D's with selective kernels)."""
    if not block.use_projection:
        return x
    return projection_shortcut(
        x,
        features=out_features,
        strides=block.strides,
        resnet_d=block.sk_ratio > 0,
        conv=block.conv,
        norm=block.norm,
    )


def _strided_3x3(block: _Block, x: jax.Array, *, conv_name: str, norm_name: str) -> jax.Array:
    """A block's strided 3x3 convolution, BN and ReLU, or its selective kernels."""
    if block.sk_ratio > 0:
        return SelectiveKernelConv(
            block.features, block.strides, block.sk_ratio, block.conv, block.norm, name="sk_conv"
        )(x)
    y = block.conv(
        block.features, (3, 3), strides=block.strides, padding=fixed_padding(3), name=conv_name
    )(x)
    return nn.relu(block.norm(name=norm_name)(y))


def _residual_out(block: _Block, y: jax.Array, shortcut: jax.Array) -> jax.Array:
    """Squeeze-excitation when asked, then the residual sum and ReLU."""
    if block.se_ratio > 0:
        y = SqueezeExcite(block.features, block.se_ratio, block.conv, name="se")(y)
    return nn.relu(y + shortcut)


class Stem(nn.Module):
    """CIFAR stem (3x3/1, no pool), ImageNet stem (7x7/2 + max-pool) or ResNet-D (three 3x3s)."""

    features: int
    cifar_stem: bool
    resnet_d: bool
    conv: ModuleFactory
    norm: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.cifar_stem:
            x = self.conv(self.features, (3, 3), padding=fixed_padding(3), name="conv1")(x)
            return nn.relu(self.norm(name="bn1")(x))
        if self.resnet_d:
            half = max(1, self.features // 2)
            x = self.conv(half, (3, 3), strides=2, padding=fixed_padding(3), name="conv1")(x)
            x = nn.relu(self.norm(name="bn1")(x))
            x = self.conv(half, (3, 3), padding=fixed_padding(3), name="conv2")(x)
            x = nn.relu(self.norm(name="bn2")(x))
            x = self.conv(self.features, (3, 3), padding=fixed_padding(3), name="conv3")(x)
            x = nn.relu(self.norm(name="bn3")(x))
        else:
            x = self.conv(self.features, (7, 7), strides=2, padding=fixed_padding(7), name="conv1")(
                x
            )
            x = nn.relu(self.norm(name="bn1")(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


class BlockGroup(nn.Module):
    """`num_blocks` residual blocks; the first one strides and projects its shortcut."""

    block: type[nn.Module]
    features: int
    num_blocks: int
    strides: int
    sk_ratio: float
    se_ratio: float
    conv: ModuleFactory
    norm: ModuleFactory

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_blocks):
            x = self.block(
                features=self.features,
                strides=self.strides if i == 0 else 1,
                use_projection=i == 0,
                sk_ratio=self.sk_ratio,
                se_ratio=self.se_ratio,
                conv=self.conv,
                norm=self.norm,
                name=f"block{i + 1}",
            )(x)
        return x


class Trunk(nn.Module):
    """What every backbone is given besides its shape: which stages are frozen (0 = stem, 1..4
    = the next four stages; -1 none), BatchNorm's constants and replica axis, the compute
    dtype. Its output: every stage's activations and the float32 pooled 'features'."""

    fine_tune_after_block: int = -1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32


class ResNet(Trunk):
    """ResNet v1 trunk. Returns every stage's output and the float32 global-average-pooled features.

    ``fine_tune_after_block = k`` freezes stages 0..k (0 = stem, 1..4 = block groups): their
    outputs get a ``stop_gradient`` and their BatchNorms use the running statistics even when
    ``train=True``, so neither their parameters' gradients nor their batch statistics move.
    (Weight decay in the optimizer would still move the parameters: mask it with
    ``simclr_jax.models.frozen_mask``.)
    """

    depth: int = 50
    width_multiplier: int = 1
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    cifar_stem: bool = False
    base_width: int = (
        64  # channels of block_group1's 3x3 convs at 1x (64 = standard; small for tests)
    )

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        if self.depth not in BLOCKS_PER_GROUP:
            raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_GROUP)}, got {self.depth!r}")
        block = BottleneckBlock if self.depth in BOTTLENECK_DEPTHS else BasicBlock
        base = self.base_width * self.width_multiplier
        conv = conv_factory(self.dtype)
        outputs: dict[str, jax.Array] = {}
        x = images.astype(self.dtype)
        for index, name in enumerate(STAGE_NAMES):
            frozen = index <= self.fine_tune_after_block
            norm = norm_factory(
                use_running_average=frozen or not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                axis_name=self.axis_name,
                dtype=self.dtype,
            )
            if index == 0:
                stage = Stem(base, self.cifar_stem, self.sk_ratio > 0, conv, norm, name=name)
            else:
                group = index - 1
                stage = BlockGroup(
                    block=block,
                    features=base * 2**group,
                    num_blocks=BLOCKS_PER_GROUP[self.depth][group],
                    strides=GROUP_STRIDES[group],
                    sk_ratio=self.sk_ratio,
                    se_ratio=self.se_ratio,
                    conv=conv,
                    norm=norm,
                    name=name,
                )
            x = stage(x)
            if frozen:
                x = jax.lax.stop_gradient(x)
            outputs[name] = x
        outputs["features"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return outputs
