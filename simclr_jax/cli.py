"""The command line every stage shares: `python -m simclr_jax.<stage> --config=... --workdir=...`.

Flags are defined only when a stage runs as a program, so the stages stay importable side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from simclr_jax import distributed


def run_stage(train_and_evaluate: Callable[..., dict[str, Any]], what: str) -> None:
    """Define the common flags, join a multi-process job if one is described, run, print results."""
    config_flags.DEFINE_config_file("config", None, f"{what} config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
    flags.DEFINE_integer("stop_at_step", None, "End this run at this step (rerun to resume).")
    distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv) -> None:
        del argv
        logging.getLogger().setLevel(logging.INFO)
        distributed.initialize()
        values = flags.FLAGS
        results = train_and_evaluate(
            values.config, values.workdir, stop_at_step=values.stop_at_step
        )
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})

    app.run(main)
