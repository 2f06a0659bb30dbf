"""``python -m simclr_jax.theory --out DIR [--smoke] [--FIELD VALUE ...]``.

Runs the sweep, writes ``DIR/results.json`` (config, one record per method x SNR x n x seed, the
boundary fit, wall time) and ``DIR/label_complexity.png``, and prints the tables. Every field of
``sweep.Config`` is a flag; tuples are comma-separated (``--snr_grid 0.1,0.2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import typing

from simclr_jax.theory import analysis, plots, sweep


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simclr_jax.theory",
        description="Two-layer-CNN case study: supervised training vs SimCLR pretraining + "
        "fine-tuning over SNR x labels x seeds.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny grid (seconds), for tests")
    hints = typing.get_type_hints(sweep.Config)
    for field in dataclasses.fields(sweep.Config):
        parser.add_argument(
            f"--{field.name}",
            type=_converter(field.name, hints[field.name]),
            default=None,
            help=f"default {field.default!r}",
        )
    return parser


def _converter(name: str, hint):
    """String -> value for a ``Config`` field, with an error that names the flag."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = set(typing.get_args(hint)) - {Ellipsis}
        return lambda text: tuple(_converter(name, item)(t) for t in text.split(",") if t)
    if hint is bool:

        def to_bool(text: str) -> bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"--{name} takes true or false, got {text!r}")
            return text.lower() in ("true", "1")

        return to_bool
    return hint


def config_from_args(args: argparse.Namespace) -> sweep.Config:
    """The smoke or default config with every given flag applied."""
    base = sweep.smoke_config() if args.smoke else sweep.default_config()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(sweep.Config)
        if getattr(args, f.name) is not None
    }
    cfg = dataclasses.replace(base, **overrides)
    cfg.validate()
    return cfg


def _round(value):
    """Six significant digits: more than the seed-to-seed spread of any metric."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def write_results(path: str, results: dict) -> None:
    """JSON with one record per line: compact, and a rerun diffs line by line."""
    head = {k: v for k, v in results.items() if k != "records"}
    lines = [json.dumps({k: _round(v) for k, v in r.items()}) for r in results["records"]]
    with open(path, "w") as f:
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "records": [\n  ')
        f.write(",\n  ".join(lines) + "\n ]\n}\n")


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns what it writes to ``results.json``."""
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        _parser().error(str(error))
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    records = sweep.run_sweep(cfg, log=lambda line: print(line, flush=True))
    boundary = analysis.supervised_boundary(records, cfg.success_error, cfg.q)
    wall = time.perf_counter() - start
    diverged = sum(r["diverged"] for r in records)
    if diverged:
        print(f"WARNING: {diverged} runs diverged (non-finite loss); lower --lr", file=sys.stderr)
    results = {
        "config": dataclasses.asdict(cfg),
        "boundary": boundary,
        "records": records,
        "wall_time_s": wall,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "command": " ".join(["python -m simclr_jax.theory"] + (argv or sys.argv[1:])),
    }
    write_results(os.path.join(args.out, "results.json"), results)
    plots.plot(records, cfg, boundary, os.path.join(args.out, "label_complexity.png"))
    print()
    print(analysis.report(records, cfg, boundary))
    print(f"\nsweep wall time {wall:.0f}s; wrote {args.out}/results.json and label_complexity.png")
    return results


if __name__ == "__main__":
    main()
