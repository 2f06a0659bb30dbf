"""One runner for every stage: a run's lifecycle from restore-or-initialise to the last save.

A stage (pretrain, finetune, distill) builds its pieces, a `Stage`: how to make the initial state,
the per-replica step and its extra replicated inputs, the batch of each step, the evaluators, the
schedule and the length. `run` does the rest the same way for all of them: the workdir lock, the
checkpoint manager, the comparison of a resumed run's config with the checkpoint's, restore or
initialise, the mapped step (with the non-finite guard, built once), writers and progress, the
step loop (train/loop.py), stop requests all processes agree on (train/preemption.py),
evaluation, results; and it closes everything on every exit path. A full disk ends the run with
one line saying so (train/disk_space.py); a finished run rerun returns its saved results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from simclr_jax import optim, parallel
from simclr_jax.train import checkpoint, config_history, disk_space, loop, metrics, preemption
from simclr_jax.train.workdir_lock import WorkdirLock


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a trainer hands the runner: its pieces, nothing about how a run is driven."""

    name: str  # 'Pretraining', ...: how the log names the run
    init_state: Callable[[bool], Any]  # resuming -> initial state (the restore target if resuming)
    step: Callable  # per-replica step(state, *replicated, batch) -> (state, metrics)
    batch_for_step: Callable[[int], Any]  # the global batch of a step
    schedule: optim.TrainSchedule  # the run's length and learning rate
    replicated: tuple = ()  # the step's extra inputs (a teacher's variables), dp.replicate'd
    evaluators: Sequence[Any] = ()  # train/evaluators.Evaluator, each with its cadence
    results: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # added at the end
    model: Any = None  # the network the step trains (the evaluators and the planner read it)


def map_step(
    dp: parallel.DataParallel, step: Callable, *, skip_nonfinite: bool, num_replicated: int = 0
) -> Callable:
    """A per-replica step mapped as every run maps it: guarded against non-finite updates
    (loop.guard_nonfinite), state and extra inputs replicated, state donated, batch sharded."""
    return dp.map(
        loop.guard_nonfinite(step, skip=skip_nonfinite),
        sharded_args=(False,) * (1 + num_replicated) + (True,),
        sharded_outputs=(False, False),
        donate_argnums=(0,),
    )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    dp: parallel.DataParallel,
    stage: Stage,
    *,
    stop_at_step: int | None = None,
    accept_config_changes: bool = False,
) -> dict[str, Any]:
    """Train `stage` in `workdir`, resuming from its newest checkpoint; returns the results.

    config fields read: keep_checkpoints, checkpoint_every_steps, log_every_steps,
    batch_size, nonfinite (and the whole config is saved with every
    checkpoint and as config.json). stop_at_step ends this run early, with a checkpoint.
    A resumed run whose config alters the run is refused unless accept_config_changes
    (train/config_history.py).
    """
    ckpt = None
    try:
        with contextlib.ExitStack() as exits:
            exits.enter_context(WorkdirLock(workdir))  # first: nothing else touches a live run
            ckpt = exits.enter_context(
                checkpoint.CheckpointManager(workdir, keep=config.keep_checkpoints, config=config)
            )
            exits.callback(ckpt.wait)  # runs before close, also when the run fails
            _check_config(ckpt, config, workdir, accept_config_changes)
            results = _run(config, workdir, dp, stage, ckpt, exits, stop_at_step)
    except Exception as error:
        if disk_space.is_disk_full(error):
            latest = None
            with contextlib.suppress(Exception):  # the manager may be closed: best effort
                latest = ckpt.latest_step()
            raise disk_space.disk_full_error(workdir, latest) from error
        raise
    results.update(stage.results)
    metrics.write_results_json(workdir, results, results["step"])
    return results


def _run(config, workdir, dp, stage, ckpt, exits, stop_at_step) -> dict[str, Any]:
    """Restore or initialise, then the loop; the results of this run's last step."""
    # Stop requests count from here: one during the restore or the compilation ends the run
    # after its first step, on every process.
    stops = exits.enter_context(preemption.StopRequests())
    state = _restore_or_initialise(ckpt, stage, workdir)
    start_step = int(state.step)
    if start_step >= stage.schedule.total_steps:
        logging.info("%s already finished at step %d in %s", stage.name, start_step, workdir)
        return metrics.read_results_json(workdir) or {"step": start_step}
    # The steps after the checkpoint run again (all of them if a run died before its first
    # checkpoint): their records from before go, so metrics.jsonl keeps each step once.
    metrics.drop_steps_after(workdir, start_step)
    state = dp.replicate(state)
    metrics.write_config(workdir, config)
    stops.start(start_step)
    writer = metrics.create_writer(
        workdir,
        is_main=jax.process_index() == 0,
        tensorboard=config.get("tensorboard", True),
        console=False,  # the loop's progress line shows each interval's metrics
    )
    exits.callback(writer.close)
    step_loop = _step_loop(config, workdir, dp, stage, ckpt, writer, stops, stop_at_step)
    _log_start(stage, config, dp, start_step, step_loop.settings.end_step)
    _, results = step_loop.run(state, start_step)
    ckpt.wait()  # while stop requests are still caught: the last save completes
    return results


def _check_config(ckpt, config, workdir: str, accept: bool) -> None:
    """A resumed run's config against the newest checkpoint's (config_history.check_resume)."""
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.config(step)
        except Exception:  # noqa: BLE001 - an unreadable step: the restore will set it aside
            continue
        new = checkpoint.config_to_json_dict(config)
        config_history.check_resume(workdir, saved, new, step=step, accept=accept)
        return


def _restore_or_initialise(ckpt: checkpoint.CheckpointManager, stage: Stage, workdir: str) -> Any:
    resuming = ckpt.latest_step() is not None
    state = stage.init_state(resuming)
    if resuming:
        state = ckpt.restore(state)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    return state


def _log_start(stage: Stage, config, dp, start_step: int, end_step: int) -> None:
    schedule = stage.schedule
    logging.info(
        "%s: steps %d..%d of %d (%d per epoch), batch %d on %d devices, peak lr %.4g",
        stage.name, start_step, end_step, schedule.total_steps, schedule.steps_per_epoch,
        config.batch_size, dp.num_replicas, schedule.peak_lr,
    )  # fmt: skip


def _step_loop(config, workdir, dp, stage, ckpt, writer, stops, stop_at_step) -> loop.StepLoop:
    """The loop with this config's periods, the mapped step built once and its inputs bound."""
    mapped = map_step(
        dp,
        stage.step,
        skip_nonfinite=config.nonfinite == "skip",
        num_replicated=len(stage.replicated),
    )
    total = stage.schedule.total_steps
    settings = loop.LoopSettings(
        total_steps=total,
        end_step=total if stop_at_step is None else min(stop_at_step, total),
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps,
    )
    progress = metrics.Progress(
        total,
        writer=writer,
        every_steps=config.log_every_steps,
        first_step=stops.first_step,
        batch_size=config.batch_size,
    )
    serial = parallel.waits_for_each_step(dp.mesh)

    def train_step(state, batch):
        outputs = mapped(state, *stage.replicated, batch)
        return jax.block_until_ready(outputs) if serial else outputs

    return loop.StepLoop(
        settings=settings,
        train_step=train_step,
        batch_for_step=stage.batch_for_step,
        first=dp.first,
        save=lambda step, state: ckpt.save(step, dp.unreplicate(state), force=True),
        evaluators=stage.evaluators,
        writer=writer,
        progress=progress,
        learning_rate=stage.schedule.learning_rate(),
        workdir=workdir,
        stops=stops,
        stop_on_nonfinite=config.nonfinite == "stop",
    )
