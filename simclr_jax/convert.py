"""Import a released google-research/simclr checkpoint as a simclr_jax workdir.

    python -m simclr_jax.convert \\
        --checkpoint=gs://simclr-checkpoints/simclrv2/pretrained/r50_1x_sk0/model.ckpt-250228 \\
        --workdir=/tmp/r50_1x_sk0 [--kind=auto|tf1|tf2] [--stage=auto|pretrain|finetune]

Reads a TF1 checkpoint (a `model.ckpt-N` prefix or its folder) or a TF2 SavedModel folder with
TensorFlow (the `[tfds]` extra), infers the architecture from the variables, maps every variable
onto our parameters and BatchNorm statistics, and writes a workdir like any of our runs: a
pretraining run (pretrained models) or a fine-tuning run (fine-tuned models), so
`finetune --config.init_checkpoint=DIR`, `distill --config.teacher_checkpoint=DIR`,
`load_encoder(DIR)` and `embed --workdir=DIR` take it as they are. Optimizer slots, the step
counter and the EMA copy (`--ema` reads that copy instead) are not part of the model: they are
listed in DIR/conversion.json. A variable that has no place, or a shape that differs, is an error
naming it.

Which stage: the TF1 files say it through their optimizer slots (the official fine-tuning trains
the classifier, not the projection head); a SavedModel holds no slots, so it is read as a
pretrained model unless --stage=finetune. A fine-tuned classifier is assumed to read the first
head layer (--ft_proj_selector=1, the official 1%/10% recipe; the checkpoint does not record it).
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from absl import flags

from simclr_jax import cli
from simclr_jax.configs import base as base_config
from simclr_jax.models.heads import num_head_layers
from simclr_jax.official import ConversionError, Parsed, Plan, make_plan, parse
from simclr_jax.official.plan import IMAGE_SIZE
from simclr_jax.official.reader import KINDS, Reader
from simclr_jax.train import checkpoint, metrics

STAGES = ("auto", "pretrain", "finetune")
REPORT_FILE = "conversion.json"
LINEAR_EVAL_BLOCK = 4  # fine_tune_after_block of a run that trained only the classifier


def choose_stage(parsed: Parsed, requested: str = "auto") -> tuple[str, str]:
    """('pretrain' | 'finetune', why): from the optimizer slots unless `requested`."""
    if requested not in STAGES:
        raise ConversionError(f"--stage must be one of {STAGES}, got {requested!r}")
    if requested != "auto":
        return requested, "--stage"
    trained = parsed.trained_scopes
    if "head_contrastive" in trained:
        return "pretrain", "the projection head has optimizer slots (trained contrastively)"
    if "head_supervised" in trained:
        return "finetune", "the classifier has optimizer slots, the projection head none"
    if parsed.classifier is None:
        return "pretrain", "no classifier"
    return "pretrain", "no optimizer slots tell; pass --stage=finetune for a fine-tuned model"


def run_config(
    plan: Plan, stage: str, *, ft_proj_selector: int, fine_tune_after_block: int = -1
) -> ml_collections.ConfigDict:
    """The config a run of `stage` would have saved for this network on ImageNet at 224 px."""
    config = base_config.pretrain_config() if stage == "pretrain" else base_config.finetune_config()
    config.dataset.name = "imagenet2012"
    config.dataset.source = "tfds"
    config.dataset.eval_split = "validation"
    config.dataset.image_size = IMAGE_SIZE
    for name, value in plan.model.items():
        config.model[name] = value
    config.model.ft_proj_selector = ft_proj_selector
    config.model.fine_tune_after_block = fine_tune_after_block
    return config


def read_variables(reader: Reader, plan: Plan) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy arrays."""
    tree: dict[str, Any] = {}
    leaves = {path: reader.float32(key) for path, key in plan.sources.items()}
    leaves.update({path: np.zeros(plan.shapes[path], np.float32) for path in plan.added})
    for path, value in leaves.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def convert(
    checkpoint_path: str,
    workdir: str,
    *,
    kind: str = "auto",
    stage: str = "auto",
    ft_proj_selector: int | None = None,
    ema: bool = False,
) -> dict[str, Any]:
    """Convert `checkpoint_path` into a new workdir; returns the report (also DIR/conversion.json)."""
    target = checkpoint.absolute_path(workdir)
    if (target / "checkpoints").exists() and any((target / "checkpoints").iterdir()):
        raise ConversionError(f"{workdir} already holds checkpoints: convert into a new folder")
    reader = Reader(checkpoint_path, kind)
    plan = make_plan(parse(reader.shapes, reader.kind, ema=ema))
    parsed = plan.parsed
    stage, why = choose_stage(parsed, stage)
    layers = num_head_layers(plan.model["proj_head_mode"], plan.model["num_proj_layers"])
    if ft_proj_selector is None:
        ft_proj_selector = 1 if stage == "finetune" and layers else 0
    if not 0 <= ft_proj_selector <= layers:
        raise ConversionError(f"--ft_proj_selector must be in 0..{layers}, got {ft_proj_selector}")
    linear_eval = stage == "finetune" and parsed.trained_scopes == {"head_supervised"}
    config = run_config(
        plan,
        stage,
        ft_proj_selector=ft_proj_selector,
        fine_tune_after_block=LINEAR_EVAL_BLOCK if linear_eval else -1,
    )
    step = reader.step(parsed.step_key)
    variables = read_variables(reader, plan)
    state = {"step": np.asarray(step, np.int32), **variables}
    # Through the project's manager, so converted workdirs get whatever every checkpoint gets.
    with checkpoint.CheckpointManager(target, keep=1, config=config, async_save=False) as manager:
        manager.save(step, state, force=True)
        manager.wait()
    metrics.write_config(target, config, is_main=True)

    report = {
        "source": checkpoint_path,
        "prefix": reader.prefix,
        "kind": reader.kind,
        "step": step,
        "architecture": plan.name,
        "stage": stage,
        "stage_reason": why,
        "ft_proj_selector": ft_proj_selector,
        "ema": ema,
        "model": plan.model,
        "num_classes": plan.num_classes,
        "variables_read": len(plan.sources),
        "parameters": sum(math.prod(s) for p, s in plan.shapes.items() if p.startswith("params/")),
        "ignored": dict(collections.Counter(why for _, why in parsed.ignored)),
        "ignored_keys": [key for key, _ in parsed.ignored],
        "added": plan.added,
    }
    (target / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict[str, Any], workdir: str) -> str:
    """A few lines for the terminal."""
    lines = [
        f"{report['architecture']} ({report['kind']}, step {report['step']}, "
        f"{report['parameters'] / 1e6:.1f}M parameters, {report['num_classes']} classes) -> "
        f"{workdir} as a {report['stage']} run ({report['stage_reason']}; classifier reads "
        f"head_{report['ft_proj_selector']})",
        f"read {report['variables_read']} variables; ignored {len(report['ignored_keys'])}:",
    ]
    lines += [f"  {count} {why}" for why, count in report["ignored"].items()]
    lines += [f"added {path}: {why}" for path, why in report["added"].items()]
    lines.append(f"details: {os.path.join(workdir, REPORT_FILE)}")
    return "\n".join(lines)


def main() -> None:
    """The command line (errors the user can fix in one line: simclr_jax.cli)."""
    flags.DEFINE_string("checkpoint", None, "model.ckpt-N prefix, its folder, or a SavedModel.")
    flags.DEFINE_string("workdir", None, "New folder for the converted run.")
    flags.DEFINE_enum("kind", "auto", list(KINDS), "Checkpoint format.")
    flags.DEFINE_enum("stage", "auto", list(STAGES), "Write a pretraining or a fine-tuning run.")
    flags.DEFINE_integer("ft_proj_selector", None, "Classifier input (default: 1 if fine-tuned).")
    flags.DEFINE_bool("ema", False, "Read the ema_model/ copy of the network.")
    flags.mark_flags_as_required(["checkpoint", "workdir"])

    def run(argv: list[str]) -> None:
        del argv
        values = flags.FLAGS
        report = convert(
            values.checkpoint,
            values.workdir,
            kind=values.kind,
            stage=values.stage,
            ft_proj_selector=values.ft_proj_selector,
            ema=values.ema,
        )
        print(summary(report, values.workdir))

    cli.run(run)


if __name__ == "__main__":
    main()
