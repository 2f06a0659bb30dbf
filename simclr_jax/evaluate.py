"""The evaluation job: every new checkpoint of a workdir evaluated once, beside its training run.

    python -m simclr_jax.evaluate --workdir=/tmp/fm [--config=...] [--timeout_s=3600]

As the reference's `--mode=eval` job: it polls the workdir, and for each new checkpoint reports
the probe's exact top-1/top-5 and the kNN monitor (a pretraining run) or the classifier's exact
top-1/top-5 and kNN (a fine-tuned or distilled run), under the metric names of the evaluation
inside training, in `workdir/eval/` (metrics.jsonl, TensorBoard, results.json). It goes on where
it stopped when restarted and exits after the run's final step (train/checkpoint_follower.py).

It needs no config: the workdir's checkpoint says how the run was made. `--config` replaces that
saved config, say to point dataset.data_dir elsewhere or to change eval_batch_size; the network
always comes from the checkpoint. It only reads the training run's files, so it may run on
another machine that sees the same workdir (a bucket), or on the training host's CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging

from simclr_jax import cli, optim, parallel, saved_run
from simclr_jax.configs import base
from simclr_jax.data import stage_data
from simclr_jax.train import checkpoint, checkpoint_follower, evaluators


def build(
    run: saved_run.SavedRun, config: ml_collections.ConfigDict
) -> tuple[Callable[[int], dict[str, Any]], int]:
    """(evaluate_step(step) -> metrics, the run's final step) for `run`'s stage: the evaluators
    its config declares, built as training builds them (train/evaluators.from_config)."""
    if not config.dataset.eval_split:
        raise ValueError(
            f"{run.workdir} has no dataset.eval_split to evaluate on: give a --config with one"
        )
    config = with_evals(config, run.stage)
    dp = parallel.from_config(config, ("eval_batch_size",))
    model = saved_run.build_from_run(run, dtype=config.dtype)
    if run.stage == "pretrain":
        data = stage_data.pretraining_data(config, dp.mesh)
    elif run.stage == "finetune":
        data = stage_data.labeled_data(config, dp.mesh, channels=run.channels)
    else:
        data = stage_data.distillation_data(config, dp.mesh, run.num_classes)
    found = evaluators.from_config(config, dp, model, data)
    final_step = optim.train_schedule(config, data.num_examples).total_steps
    target = saved_run.abstract_variables(model, run.image_size, run.channels)

    def evaluate_step(step: int) -> dict[str, Any]:
        variables = dp.replicate(checkpoint.restore_weights(run.workdir, target, step=step))
        metrics: dict[str, Any] = {}
        for evaluator in found:
            metrics.update(evaluator(variables))
        return metrics

    return evaluate_step, final_step


def with_evals(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """A run saved before config.evals existed: its stage's evaluators today (base.*_config),
    with the kNN fields it had (config.knn). Said in the log, not silently."""
    if "evals" in config:
        return config
    defaults = {"pretrain": base.pretrain_config, "finetune": base.finetune_config}
    evals = defaults.get(stage, base.distill_config)().evals
    for name, value in (config.get("knn") or {}).items():
        if name in evals.knn:
            evals.knn[name] = value
    logging.info("The run's config predates config.evals: evaluating with %s", evals.to_dict())
    updated = ml_collections.ConfigDict(config.to_dict())
    updated.evals = evals
    return updated


def wait_for_run(workdir: str, *, poll_s: float, timeout_s: float | None) -> saved_run.SavedRun:
    """The workdir's newest checkpoint, waiting for the first one (a run that just started).

    A workdir that does not exist is a mistake (a typo), not a run to wait for: it fails now."""
    if not checkpoint.absolute_path(workdir).is_dir():
        raise ValueError(
            f"--workdir={workdir!r} does not exist: name the workdir of a training run "
            "(started or finished)"
        )
    start, told = time.monotonic(), False
    while True:
        try:
            return saved_run.read_run(workdir, field="--workdir")
        except saved_run.NoCheckpointYetError:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise
        if not told:
            told = True
            limit = f"at most {timeout_s:g} s" if timeout_s is not None else "no time limit"
            logging.info(
                "Waiting for the first checkpoint in %s (looking every %g s, %s: --timeout_s)",
                workdir, poll_s, limit,
            )  # fmt: skip
        time.sleep(poll_s)


def evaluate_workdir(
    workdir: str,
    config: ml_collections.ConfigDict | None = None,
    *,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Evaluates each new checkpoint of `workdir` once until its final step; the last metrics.

    `config` None: the config saved with the newest checkpoint. timeout_s: stop after that long
    without a new checkpoint (None: wait for the final step however long it takes).
    """
    run = wait_for_run(workdir, poll_s=poll_s, timeout_s=timeout_s)
    if config is None:
        config = ml_collections.ConfigDict(run.config)
    evaluate_step, final_step = build(run, config)
    return checkpoint_follower.run(
        workdir,
        evaluate_step,
        final_step=final_step,
        poll_s=poll_s,
        timeout_s=timeout_s,
        checkpoint_every=run.config.get("checkpoint_every_steps", 0),
        keep=run.config.get("keep_checkpoints"),
    )


def main() -> None:
    """The command line (flags are defined here only, so importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, cli.config_help("The run's config (default: the one saved in the workdir)"),
        lock_config=True,
    )  # fmt: skip
    flags.declare_key_flag("config")
    flags.DEFINE_string("workdir", None, "The training run's workdir (checkpoints are read here).")
    flags.DEFINE_float("poll_s", 30.0, "Seconds between looks for a new checkpoint.")
    flags.DEFINE_float(
        "timeout_s", 0.0, "Stop after this long without a new checkpoint (0: wait for the end)."
    )

    def job(values: flags.FlagValues) -> dict[str, Any]:
        return evaluate_workdir(
            values.workdir, values.config, poll_s=values.poll_s, timeout_s=values.timeout_s or None
        )

    cli.run_job(job, required=("workdir",))


if __name__ == "__main__":
    main()
