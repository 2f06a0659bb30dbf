"""Our layers in the order the official code creates them (google-research/simclr resnet.py).

Official variables carry creation counters, not positions (`base_model/conv2d_17`,
`base_model/batch_normalization_12`, or a TF2 key index), so a checkpoint is read by walking the
network in creation order: stem convs, then per block [shortcut conv + BN in a group's first
block], 1x1 conv + BN, 3x3 conv + BN (selective kernel: 3x3 conv to 2x + BN, 1x1 squeeze conv +
BN, 1x1 expand conv without BN), 1x1 conv + BN. Our module names follow models/resnet.py.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from simclr_jax.models.resnet import BLOCKS_PER_GROUP, BOTTLENECK_DEPTHS

Kind = Literal["conv", "bn"]


class Layer(NamedTuple):
    kind: Kind
    path: str  # module path under 'params' (and 'batch_stats' for a BN), e.g. 'backbone/stem/conv1'


def stem_layers(*, resnet_d: bool, cifar_stem: bool) -> list[Layer]:
    """The CIFAR stem (one 3x3 conv) wins over SK's ResNet-D stem, in the official code and ours."""
    if resnet_d and not cifar_stem:
        names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    else:
        names = ("conv1", "bn1")
    return [Layer(_kind(name), f"backbone/stem/{name}") for name in names]


def block_layers(prefix: str, *, bottleneck: bool, sk: bool, first: bool) -> list[Layer]:
    """One residual block's conv and BN layers, shortcut first (as the official code makes them)."""
    shortcut = ("proj_conv", "bn_proj") if first else ()
    if not bottleneck:  # official ResNet-18/34 blocks: two 3x3 convs (no SK conv, see below)
        names = ("conv1", "bn1", "conv2", "bn2")
    elif sk:
        sk_names = ("sk_conv/conv", "sk_conv/bn", "sk_conv/mix_reduce", "sk_conv/bn_mix")
        names = ("conv1", "bn1", *sk_names, "sk_conv/mix_expand", "conv3", "bn3")
    else:
        names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    return [Layer(_kind(name), f"{prefix}/{name}") for name in (*shortcut, *names)]


def _kind(name: str) -> Kind:
    return "bn" if name.rsplit("/", 1)[-1].startswith("bn") else "conv"


def backbone_layers(depth: int, *, sk: bool, cifar_stem: bool) -> list[Layer]:
    """Every conv and BN of the trunk in official creation order.

    Official ResNet-18/34 with sk_ratio > 0 use no selective-kernel conv (only the ResNet-D stem
    and shortcut), while ours put one in each basic block: that combination has no counterpart.
    """
    bottleneck = depth in BOTTLENECK_DEPTHS
    if sk and not bottleneck:
        raise ValueError(f"ResNet-{depth} with selective kernels differs from the official network")
    layers = stem_layers(resnet_d=sk, cifar_stem=cifar_stem)
    for group, blocks in enumerate(BLOCKS_PER_GROUP[depth], start=1):
        for block in range(1, blocks + 1):
            prefix = f"backbone/block_group{group}/block{block}"
            layers += block_layers(prefix, bottleneck=bottleneck, sk=sk, first=block == 1)
    return layers


def count(layers: list[Layer], kind: Kind) -> int:
    return sum(layer.kind == kind for layer in layers)
