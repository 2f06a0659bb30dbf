"""Model card: ``python -m simclr_jax.models [--depth=50 --width=2 --sk_ratio=0.0625] [--json]``.

Without --depth, prints the standard variants (SimCLRv2's r50..r152_3x_sk1 plus r18/r34/r200) with
parameter counts and forward GFLOPs, computed from shapes only (nothing is allocated or run).
"""

from __future__ import annotations

import json
from typing import Any

from absl import flags

from simclr_jax import cli
from simclr_jax.models.build import build_model
from simclr_jax.models.card import STANDARD_VARIANTS, describe, describe_variant, format_table
from simclr_jax.models.heads import PROJ_HEAD_MODES

CIFAR_STEM = {"auto": None, "true": True, "false": False}


def define_flags() -> None:
    flags.DEFINE_string(
        "variants",
        ",".join(STANDARD_VARIANTS),
        "Comma-separated standard variants (not with --depth).",
    )
    flags.DEFINE_integer("depth", None, "Describe one custom model of this depth.")
    flags.DEFINE_integer("width", 1, "Width multiplier (custom model).")
    flags.DEFINE_float("sk_ratio", 0.0, "Selective-kernel ratio (SimCLRv2: 0.0625).")
    flags.DEFINE_float("se_ratio", 0.0, "Squeeze-and-excitation ratio.")
    flags.DEFINE_integer("image_size", 224, "Input size.")
    flags.DEFINE_enum("cifar_stem", "auto", list(CIFAR_STEM), "auto: a CIFAR stem when <= 32 px.")
    flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")
    flags.DEFINE_enum("proj_head_mode", "nonlinear", list(PROJ_HEAD_MODES), "Projection head.")
    flags.DEFINE_integer("num_proj_layers", 3, "Projection head layers.")
    flags.DEFINE_integer("proj_out_dim", 128, "Projection output size.")
    flags.DEFINE_bool("no_flops", False, "Skip the FLOP count (faster).")
    flags.DEFINE_bool("json", False, "One JSON object per line instead of the table.")


def card_rows(values: Any) -> list[dict[str, Any]]:
    """The card's rows for the flag values (`values.depth`, ...): one custom model, or the
    standard variants; a bad architecture is a ValueError naming the field."""
    head = {
        "proj_head_mode": values.proj_head_mode,
        "num_proj_layers": values.num_proj_layers,
        "proj_out_dim": values.proj_out_dim,
        "se_ratio": values.se_ratio,
        "cifar_stem": CIFAR_STEM[values.cifar_stem],
    }
    flops, size = not values.no_flops, values.image_size
    if values.depth is not None:
        fields = dict(
            head, depth=values.depth, width_multiplier=values.width, sk_ratio=values.sk_ratio
        )
        model = build_model(fields, num_classes=values.num_classes, image_size=size)
        return [describe(model, size, flops=flops)]
    names = [name.strip() for name in values.variants.split(",") if name.strip()]
    return [
        describe_variant(name, image_size=size, num_classes=values.num_classes, flops=flops, **head)
        for name in names
    ]


def main() -> None:
    define_flags()

    def card(argv: list[str]) -> None:
        del argv
        rows = card_rows(flags.FLAGS)
        print("\n".join(map(json.dumps, rows)) if flags.FLAGS.json else format_table(rows))

    cli.run(card)


if __name__ == "__main__":
    main()
