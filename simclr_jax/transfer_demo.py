"""Transfer learning on a CPU: a Fashion-MNIST SimCLR network, evaluated on handwritten digits.

    python -m simclr_jax.transfer_demo [--workdir=demo_out]

1. The pretraining is WORKDIR/pretrain, the one `make demo` leaves. If it has no results.json
   yet, the demo preset of configs/pretrain_fashion_mnist.py runs (or resumes) there
   first.
2. On scikit-learn's digits (data/digits.py: 1,297 training labels, 500 test images, 28x28x1),
   the demo presets of configs/transfer_digits.py: linear evaluation of the frozen
   network, fine-tuning from the first projection-head layer, and the same network trained from
   scratch on the same labels for the same number of steps.

Each run is an ordinary `simclr_jax.finetune` run (the architecture comes from the pretraining
workdir) with its own workdir under WORKDIR/transfer_digits/; rerunning resumes or skips finished
runs. One markdown table is printed at the end. Needs scikit-learn (the [transfer] extra).
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags, logging

from simclr_jax import cli, finetune, pretrain, saved_run
from simclr_jax.configs import pretrain_fashion_mnist, transfer_digits
from simclr_jax.data import digits
from simclr_jax.demo import run_stage

FLAGS = flags.FLAGS
METHODS = (
    ("linear evaluation (frozen SimCLR network)", "demo_linear_eval", True),
    ("SimCLR, fine-tuned from head layer 1", "demo_finetune", True),
    ("same network from scratch, same labels and steps", "demo_scratch", False),
)


def is_finished(pretrain_dir: str) -> bool:
    """Whether `pretrain_dir` holds a finished run: results.json and a committed checkpoint (a run
    killed while saving leaves only a temporary checkpoint folder)."""
    if not os.path.exists(os.path.join(pretrain_dir, "results.json")):
        return False
    try:
        saved_run.read_run(pretrain_dir)
    except ValueError:
        return False
    return True


def ensure_pretraining(pretrain_dir: str) -> float:
    """Minutes spent pretraining: 0 when `pretrain_dir` holds a finished run (never retrained,
    whatever preset made it), else the demo preset runs or resumes there."""
    if is_finished(pretrain_dir):
        return 0.0
    logging.info("No finished pretraining in %s: running the demo preset", pretrain_dir)
    _, minutes = run_stage(
        "pretrain",
        pretrain.train_and_evaluate,
        pretrain_fashion_mnist.get_config("demo"),
        pretrain_dir,
    )
    return minutes


def transfer_rows(pretrain_dir: str, root: str) -> list[tuple[str, int, int, float, float]]:
    """(method, labels, steps, test top-1, minutes) of the three transfer_digits.py demo runs."""
    rows = []
    for name, preset, from_pretraining in METHODS:
        config = transfer_digits.get_config(preset)
        if from_pretraining:
            config.init_checkpoint = pretrain_dir
        result, minutes = run_stage(
            name, finetune.train_and_evaluate, config, os.path.join(root, preset)
        )
        rows.append((name, result["num_labeled"], result["step"], result["eval_top1"], minutes))
    return rows


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    pretrain_dir = os.path.join(FLAGS.workdir, "pretrain")
    pretrain_minutes = ensure_pretraining(pretrain_dir)
    rows = transfer_rows(pretrain_dir, os.path.join(FLAGS.workdir, "transfer_digits"))

    device = f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)"
    print(
        f"\nTransfer from Fashion-MNIST to scikit-learn's digits ({device}); test top-1 on the "
        f"{digits.TEST_SIZE} test digits"
    )
    with open(os.path.join(pretrain_dir, "results.json")) as file:
        pretrained = json.load(file)
    print(
        f"Pretraining {pretrain_dir}: {pretrained['step']} steps on Fashion-MNIST, its online "
        f"probe {100 * pretrained.get('eval_probe_top1', float('nan')):.1f}% on Fashion-MNIST test"
        + (f" (run here: {pretrain_minutes:.1f} min)" if pretrain_minutes else "")
    )
    print("\n| method | labels | steps | test top-1 | minutes |")
    print("|---|---|---|---|---|")
    for name, labels, steps, top1, minutes in rows:
        print(f"| {name} | {labels:,} | {steps} | {100 * top1:.2f}% | {minutes:.1f} |")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "demo_out", "The pretraining is WORKDIR/pretrain.")
    cli.run(main)
