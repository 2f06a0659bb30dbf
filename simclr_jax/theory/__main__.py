"""``python -m simclr_jax.theory --out=DIR [--smoke] [--FIELD=VALUE ...]``.

Runs the sweep, writes ``DIR/results.json`` (config, one record per method x SNR x n x seed, the
boundary fit, wall time) and ``DIR/label_complexity.png``, and prints the tables. Every field of
``sweep.Config`` is a flag; tuples are comma-separated (``--snr_grid=0.1,0.2``). Flags are absl's,
as every simclr_jax command (simclr_jax.cli: a bad value is one line, exit status 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import typing
from collections.abc import Mapping
from typing import Any

from absl import flags

from simclr_jax import cli
from simclr_jax.theory import analysis, plots, sweep

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}


def define_flags() -> None:
    """--out, --smoke and one flag per field of sweep.Config (None: the config's value)."""
    flags.DEFINE_string("out", None, "Output directory (results.json, label_complexity.png).")
    flags.DEFINE_bool("smoke", False, "A tiny grid (seconds), for tests.")
    smoke, hints = sweep.smoke_config(), typing.get_type_hints(sweep.Config)
    for field in dataclasses.fields(sweep.Config):
        hint = hints[field.name]
        text = f"default {field.default!r}; with --smoke {getattr(smoke, field.name)!r}"
        if typing.get_origin(hint) is tuple:
            flags.DEFINE_list(field.name, None, text)
        else:
            _DEFINE.get(hint, flags.DEFINE_string)(field.name, None, text)
    flags.mark_flag_as_required("out")


def config_from_overrides(overrides: Mapping[str, Any], *, smoke: bool = False) -> sweep.Config:
    """The smoke or default config with the given fields changed (tuple fields may be lists of
    strings, as the command line gives them), validated; a bad value is a ValueError naming it."""
    base = sweep.smoke_config() if smoke else sweep.default_config()
    hints = typing.get_type_hints(sweep.Config)
    changes = {}
    for name, value in overrides.items():
        hint = hints[name]
        if typing.get_origin(hint) is tuple and value is not None:
            (item,) = set(typing.get_args(hint)) - {Ellipsis}
            try:
                value = tuple(item(text) for text in value)
            except ValueError:
                raise ValueError(f"--{name} takes {item.__name__} values, got {value!r}") from None
        changes[name] = value
    cfg = dataclasses.replace(base, **changes)
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


def run_experiment(cfg: sweep.Config, out: str, command: str = "") -> dict:
    """Run the experiment; returns what it writes to ``out/results.json``."""
    os.makedirs(out, exist_ok=True)
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
        "command": command,
    }
    write_results(os.path.join(out, "results.json"), results)
    plots.plot(records, cfg, boundary, os.path.join(out, "label_complexity.png"))
    print()
    print(analysis.report(records, cfg, boundary))
    print(f"\nsweep wall time {wall:.0f}s; wrote {out}/results.json and label_complexity.png")
    return results


def main() -> None:
    define_flags()

    def experiment(argv: list[str]) -> None:
        del argv
        values = flags.FLAGS
        fields = [field.name for field in dataclasses.fields(sweep.Config)]
        overrides = {name: values[name].value for name in fields if values[name].value is not None}
        cfg = config_from_overrides(overrides, smoke=values.smoke)
        run_experiment(cfg, values.out, " ".join(["python -m simclr_jax.theory", *sys.argv[1:]]))

    cli.run(experiment)


if __name__ == "__main__":
    main()
