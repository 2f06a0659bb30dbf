"""Model card: ``python -m simclr_jax.models [--depth 50 --width 2 --sk_ratio 0.0625] [--json]``.

Without --depth, prints the standard variants (SimCLRv2's r50..r152_3x_sk1 plus r18/r34/r200) with
parameter counts and forward GFLOPs, computed from shapes only (nothing is allocated or run).
"""

from __future__ import annotations

import argparse
import json
import sys

from simclr_jax.models.build import build_model
from simclr_jax.models.card import STANDARD_VARIANTS, describe, describe_variant, format_table
from simclr_jax.models.heads import PROJ_HEAD_MODES


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simclr_jax.models", description=__doc__)
    parser.add_argument(
        "--variants",
        default=",".join(STANDARD_VARIANTS),
        help="comma-separated standard variants (ignored with --depth)",
    )
    parser.add_argument("--depth", type=int, help="describe one custom model of this depth")
    parser.add_argument("--width", type=int, default=1, help="width multiplier (custom model)")
    parser.add_argument("--sk_ratio", type=float, default=0.0, help="SimCLRv2: 0.0625")
    parser.add_argument("--se_ratio", type=float, default=0.0)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument(
        "--cifar_stem",
        choices=("auto", "true", "false"),
        default="auto",
        help="auto: CIFAR stem when image_size <= 32",
    )
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--proj_head_mode", choices=PROJ_HEAD_MODES, default="nonlinear")
    parser.add_argument("--num_proj_layers", type=int, default=3)
    parser.add_argument("--proj_out_dim", type=int, default=128)
    parser.add_argument("--no_flops", action="store_true", help="skip the FLOP count (faster)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    head = {
        "proj_head_mode": args.proj_head_mode,
        "num_proj_layers": args.num_proj_layers,
        "proj_out_dim": args.proj_out_dim,
        "se_ratio": args.se_ratio,
        "cifar_stem": {"auto": None, "true": True, "false": False}[args.cifar_stem],
    }
    try:
        if args.depth is not None:
            fields = dict(
                head, depth=args.depth, width_multiplier=args.width, sk_ratio=args.sk_ratio
            )
            model = build_model(fields, num_classes=args.num_classes, image_size=args.image_size)
            rows = [describe(model, args.image_size, flops=not args.no_flops)]
        else:
            rows = [
                describe_variant(
                    name.strip(),
                    image_size=args.image_size,
                    num_classes=args.num_classes,
                    flops=not args.no_flops,
                    **head,
                )
                for name in args.variants.split(",")
                if name.strip()
            ]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
