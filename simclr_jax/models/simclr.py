"""The composed SimCLR model: backbone (ResNet, or the CPU-shaped convnet) -> projection head ->
linear classifier."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.convnet import ConvNet
from simclr_jax.models.heads import (
    ProjectionHead,
    linear_classifier,
    num_head_layers,
    selected_layer,
)
from simclr_jax.models.resnet import STAGE_NAMES, ResNet

FINE_TUNE_AFTER_BLOCK_RANGE = range(-1, len(STAGE_NAMES))  # -1 (nothing frozen) .. 4
BACKBONES = ("resnet", "convnet")


def architecture(default: Any) -> Any:
    """A SimCLRModel field that shapes the network (a field declared so is an architecture field)."""
    return dataclasses.field(default=default, metadata={"architecture": True})


class SimCLRModel(nn.Module):
    """SimCLR v1/v2 network.

    Outputs (dict): 'stem', 'block_group1'..'block_group4' (compute dtype), 'features' (pooled,
    float32), 'head_0' (= features) .. 'head_K' (each projection layer), 'projection' (= 'head_K'),
    'logits'. The classifier reads ``head_<ft_proj_selector>``; ``classifier_stop_gradient`` keeps
    an online linear probe from training the encoder during pretraining.
    """

    # Architecture: the network's shape (ARCHITECTURE_FIELDS below lists these fields).
    # 'resnet' (the reference's) or 'convnet' (shaped for a CPU: models/convnet.py).
    backbone: str = architecture("resnet")
    # ResNet depth: 18, 34, 50, 101, 152 or 200; a convnet's: its number of 3x3 convs (>= 4).
    depth: int = architecture(50)
    width_multiplier: int = architecture(1)  # integer channel multiplier (SimCLRv2's 1x/2x/3x).
    # Selective-kernel ratio; 0 = off, SimCLRv2 uses 0.0625 (ResNet only).
    sk_ratio: float = architecture(0.0)
    se_ratio: float = architecture(0.0)  # squeeze-excitation ratio; 0 = off (ResNet only).
    cifar_stem: bool = architecture(False)  # 3x3 stride-1 stem conv, no max-pool (ResNet only).
    base_width: int = architecture(64)  # channels of the first block group before the multiplier.
    proj_head_mode: str = architecture("nonlinear")  # 'none', 'linear' or 'nonlinear'.
    num_proj_layers: int = architecture(3)  # layers of the nonlinear head (v1: 2, v2: 3).
    proj_out_dim: int = architecture(128)  # output width of the projection head.
    bn_momentum: float = architecture(0.9)  # BatchNorm moving-average decay.
    bn_epsilon: float = architecture(1e-5)  # BatchNorm epsilon.
    # What a run makes of it: the classifier, its input, what trains.
    num_classes: int = 10
    # Classifier input: 0 = backbone output, k = k-th head layer, -1 = the last head layer.
    ft_proj_selector: int = 0
    classifier_stop_gradient: bool = False
    # A BatchNorm without scale or shift on the classifier's input (the online probe's, by
    # default): a linear classifier learns standardised features much faster (MAE's linear probe).
    classifier_input_norm: bool = False
    zero_init_logits_layer: bool = False  # start the classifier at zero.
    fine_tune_after_block: int = -1  # freeze stages up to k: -1 none, 0 stem, 1..4 block groups.
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        num_layers = num_head_layers(self.proj_head_mode, self.num_proj_layers)
        try:
            selected = selected_layer(self.ft_proj_selector, num_layers)
        except ValueError as error:
            raise ValueError(
                f"{error} (proj_head_mode={self.proj_head_mode!r}, "
                f"num_proj_layers={self.num_proj_layers})"
            ) from None
        norm_kwargs = dict(
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )
        outputs = self._backbone(norm_kwargs)(images, train=train)
        hiddens = ProjectionHead(
            proj_head_mode=self.proj_head_mode,
            num_proj_layers=self.num_proj_layers,
            proj_out_dim=self.proj_out_dim,
            name="head",
            **norm_kwargs,
        )(outputs["features"], train=train)
        for k, hidden in enumerate(hiddens):
            outputs[f"head_{k}"] = hidden
        outputs["projection"] = hiddens[-1]

        classifier_input = hiddens[selected]
        if self.classifier_stop_gradient:
            classifier_input = jax.lax.stop_gradient(classifier_input)
        if self.classifier_input_norm:
            classifier_input = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                use_scale=False,
                use_bias=False,
                axis_name=self.axis_name,
                name="classifier_norm",
            )(classifier_input.astype(jnp.float32))
        classifier = linear_classifier(self.num_classes, zero_init=self.zero_init_logits_layer)
        outputs["logits"] = classifier(classifier_input)
        return outputs

    def _backbone(self, norm_kwargs: dict[str, Any]) -> nn.Module:
        common = dict(
            depth=self.depth,
            width_multiplier=self.width_multiplier,
            base_width=self.base_width,
            fine_tune_after_block=self.fine_tune_after_block,
            name="backbone",
            **norm_kwargs,
        )
        if self.backbone == "convnet":
            return ConvNet(**common)
        if self.backbone != "resnet":
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        return ResNet(
            sk_ratio=self.sk_ratio, se_ratio=self.se_ratio, cifar_stem=self.cifar_stem, **common
        )


# The fields that describe the network's shape, the one list of them: a checkpoint's saved config
# gives them to runs that start from it (fine-tuning, distillation), config.model_config() takes
# their defaults from here, and a new one is one `architecture(...)` field above.
ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SimCLRModel) if f.metadata.get("architecture")
)


def architecture_defaults() -> dict[str, Any]:
    """{field: SimCLRModel's default} for every architecture field."""
    return {
        f.name: f.default for f in dataclasses.fields(SimCLRModel) if f.name in ARCHITECTURE_FIELDS
    }


def frozen_mask(tree: Any, fine_tune_after_block: int) -> Any:
    """Pytree of bools, True for leaves inside a frozen backbone stage (stem .. block_group<k>).

    Works on ``params``, ``batch_stats`` or the whole variables dict (it matches the path
    ``.../backbone/<stage>/...``). Use it to zero the optimizer's updates of frozen stages: the
    model's stop_gradient zeroes their gradients, but weight decay would still shrink them.
    """
    if fine_tune_after_block not in FINE_TUNE_AFTER_BLOCK_RANGE:
        raise ValueError(
            f"fine_tune_after_block must be in -1..{len(STAGE_NAMES) - 1}, "
            f"got {fine_tune_after_block!r}"
        )
    frozen_stages = set(STAGE_NAMES[: fine_tune_after_block + 1])

    def is_frozen(path: tuple[Any, ...], _: Any) -> bool:
        keys = [getattr(entry, "key", None) for entry in path]
        return any(
            outer == "backbone" and inner in frozen_stages
            for outer, inner in zip(keys, keys[1:], strict=False)
        )

    return jax.tree_util.tree_map_with_path(is_frozen, tree)


LINEAR_EVAL_BLOCK = len(STAGE_NAMES) - 1  # fine_tune_after_block that freezes the whole backbone


def frozen_tree(
    tree: Any,
    *,
    fine_tune_after_block: int,
    ft_proj_selector: int,
    freeze_head_in_linear_eval: bool = False,
) -> Any:
    """Pytree of bools over params or batch_stats: True where a run must not change a value.

    Frozen: backbone stages up to fine_tune_after_block (frozen_mask); projection-head layers
    above ft_proj_selector (they feed nothing; none with -1, the last layer); and, for linear
    evaluation (fine_tune_after_block=4) with freeze_head_in_linear_eval, everything but the
    classifier. Without it (the reference) linear evaluation trains the head layers up to the
    selector, as the reference stops the gradient only at the ResNet output.
    """
    backbone = frozen_mask(tree, fine_tune_after_block)
    linear_eval = fine_tune_after_block == LINEAR_EVAL_BLOCK and freeze_head_in_linear_eval

    def frozen(path: tuple[Any, ...], in_frozen_stage: bool) -> bool:
        names = [jax.tree_util.keystr((key,), simple=True) for key in path]
        if names and names[0] == "classifier":
            return False
        if in_frozen_stage or linear_eval:
            return True
        if "head" in names[:-1]:
            layer = re.search(r"(\d+)$", names[names.index("head") + 1])
            return layer is not None and 0 <= ft_proj_selector < int(layer.group(1))
        return False

    return jax.tree_util.tree_map_with_path(frozen, backbone)


def keep_frozen_stats(frozen: Any, old: Any, new: Any) -> Any:
    """New BN statistics, except the old ones (bit for bit) wherever `frozen` says so."""
    return jax.tree.map(lambda is_frozen, o, n: o if is_frozen else n, frozen, old, new)
