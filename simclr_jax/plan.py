"""Will it fit, and how long: compile a stage's step for a TPU slice or GPU machine you do not have.

    python -m simclr_jax.plan --config=configs/pretrain_imagenet.py:r50_1x_sk1 --target=v5p:4x4x4
    python -m simclr_jax.plan --config=configs/pretrain_imagenet.py:r152_3x_sk1 --target=h100x8 --fit
    python -m simclr_jax.plan --config=configs/pretrain_imagenet.py:r50_1x_sk1 --target=h100x1 \
        --config.batch_size=4096 --fit_chunks
    python -m simclr_jax.plan --config=... --target=v4-128 --out=plan.json [--config.batch_size=...]

The step is the trainer's own (simclr_jax/planning/stages.py), compiled ahead of time from
abstract shapes for compile-only devices (libtpu for TPUs: the [tpu] extra; JAX's CUDA plugin for
GPUs: the [plan-gpu] extra). It prints memory per device against the device's HBM (FITS or DOES
NOT FIT), XLA's FLOPs beside the analytic count, the collectives, and a roofline bound on the step,
epoch and run time, with the host decode rate the input needs. --fit searches the largest batch
that fits; --fit_chunks the fewest accumulation chunks (config.accumulation_chunks) at which the
config's batch fits. Memory, FLOPs and collectives are
facts about the compiled program; every time is a lower bound, not a measurement.
"""

from __future__ import annotations

import json
import logging
import os

from absl import flags
from etils import epath
from ml_collections import config_flags

from simclr_jax import cli

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # plan here; compile for the target


def main(argv: list[str]) -> None:
    del argv
    from simclr_jax.data import catalog
    from simclr_jax.planning import host_rate, planner, report, targets

    values = flags.FLAGS
    target = targets.parse(values.target)
    rate = values.host_rate
    if rate is None and catalog.facts(values.config.dataset).streamed:
        logging.info("Measuring this machine's decode + crop rate per core")
        rate = host_rate.images_per_second_per_core(image_size=values.config.dataset.image_size)
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    logging.info("Compiling %s for %s (a large model takes minutes)", name, target.name)
    if values.fit and values.fit_chunks:
        raise ValueError("--fit and --fit_chunks search different things: give one")
    if values.fit_chunks:
        found = planner.fit_chunks(values.config, target, capacity_gib=values.capacity_gib)
        plan = found["fits"] or found["previous"]
        print(report.describe_fit_chunks(found))
        result = {**plan, "fit_chunks": {k: found[k] for k in ("chunks", "tried")}}
    elif values.fit:
        found = planner.fit(values.config, target, capacity_gib=values.capacity_gib)
        plan = found["fits"] or found["next"]
        print(report.describe_fit(found))
        result = {
            **plan,
            "fit": {k: found[k] for k in ("per_device_batch", "global_batch", "tried")},
        }
    else:
        result = planner.make_plan(
            values.config, target, capacity_gib=values.capacity_gib, host_rate=rate or None
        )
    print(report.describe(result))
    if values.out:
        epath.Path(values.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {values.out}")


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Any stage's config file.", lock_config=True)
    flags.declare_key_flag("config")
    flags.DEFINE_string(
        "target", None, "What to plan for: a TPU topology or type, or a GPU machine."
    )
    flags.DEFINE_bool("fit", False, "Search the largest power-of-two per-device batch that fits.")
    flags.DEFINE_bool(
        "fit_chunks",
        False,
        "Search the fewest accumulation_chunks (a power of two) at which the config's batch fits.",
    )
    flags.DEFINE_string("out", None, "Also write the plan as JSON here.")
    flags.DEFINE_float(
        "host_rate",
        None,
        "Decode + crop images/s per host core (default: measure it here; 0: skip).",
    )
    flags.DEFINE_float(
        "capacity_gib", None, "Memory a device may use, GiB (default: its HBM; 75% on a GPU)."
    )
    flags.mark_flags_as_required(["config", "target"])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
