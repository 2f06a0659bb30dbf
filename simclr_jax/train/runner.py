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

    def with_evaluators(self, evaluators: Sequence[Any]) -> Stage:
        return dataclasses.replace(self, evaluators=tuple(evaluators))


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


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a run is driven, read from its config once (the fields `run` reads, and no others)."""

    workdir: str
    keep_checkpoints: int
    checkpoint_every: int
    log_every: int
    batch_size: int
    nonfinite: str  # 'stop' or 'skip'
    tensorboard: bool
    stop_at_step: int | None = None  # end this run early, with a checkpoint
    accept_config_changes: bool = False  # resume although the config alters the run

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: str, **options: Any):
        return cls(
            workdir=workdir,
            keep_checkpoints=config.keep_checkpoints,
            checkpoint_every=config.checkpoint_every_steps,
            log_every=config.log_every_steps,
            batch_size=config.batch_size,
            nonfinite=config.nonfinite,
            tensorboard=config.get("tensorboard", True),
            **options,
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

    The whole config is saved with every checkpoint and as config.json; the fields that drive
    the run are RunSettings'. A resumed run whose config alters the run is refused unless
    accept_config_changes (train/config_history.py).
    """
    settings = RunSettings.from_config(
        config, workdir, stop_at_step=stop_at_step, accept_config_changes=accept_config_changes
    )
    with disk_space.reported(workdir) as saved_steps:
        with _open_workdir(settings, config) as ckpt:
            saved_steps.source = ckpt.latest_step
            results = _Run(settings, config, dp, stage, ckpt).train()
    results.update(stage.results)
    metrics.write_results_json(workdir, results, results["step"])
    return results


@contextlib.contextmanager
def _open_workdir(settings: RunSettings, config: ml_collections.ConfigDict):
    """The workdir's lock (first: nothing else touches a live run), its checkpoint manager and
    the resumed config's check; the last save finishes before the manager closes, also when the
    run fails."""
    with WorkdirLock(settings.workdir):
        keep = settings.keep_checkpoints
        with checkpoint.CheckpointManager(settings.workdir, keep=keep, config=config) as ckpt:
            try:
                _check_config(ckpt, config, settings)
                yield ckpt
            finally:
                ckpt.wait()


class _Run:
    """One run on an open workdir: restore or initialise, then the loop, closing what it opens."""

    def __init__(self, settings, config, dp, stage, ckpt):
        self.settings, self.config, self.dp, self.stage, self.ckpt = (
            settings, config, dp, stage, ckpt,
        )  # fmt: skip

    def train(self) -> dict[str, Any]:
        """The results of this run's last step (a finished run's saved results)."""
        settings, stage = self.settings, self.stage
        # Stop requests count from here: one during the restore or the compilation ends the run
        # after its first step, on every process.
        with preemption.StopRequests() as stops, contextlib.ExitStack() as closing:
            state = _restore_or_initialise(self.ckpt, stage, settings.workdir)
            start_step = int(state.step)
            if start_step >= stage.schedule.total_steps:
                logging.info(
                    "%s already finished at step %d in %s", stage.name, start_step,
                    settings.workdir,
                )  # fmt: skip
                return metrics.read_results_json(settings.workdir) or {"step": start_step}
            # The steps after the checkpoint run again (all of them if a run died before its
            # first checkpoint): their records from before go, so each step is logged once.
            metrics.drop_steps_after(settings.workdir, start_step)
            state = self.dp.replicate(state)
            metrics.write_config(settings.workdir, self.config)
            stops.start(start_step)
            writer = closing.enter_context(contextlib.closing(self._writer()))
            step_loop = self._step_loop(writer, stops)
            _log_start(stage, settings, self.dp, start_step, step_loop.settings.end_step)
            _, results = step_loop.run(state, start_step)
            self.ckpt.wait()  # while stop requests are still caught: the last save completes
            return results

    def _writer(self):
        return metrics.create_writer(
            self.settings.workdir,
            is_main=jax.process_index() == 0,
            tensorboard=self.settings.tensorboard,
            console=False,  # the loop's progress line shows each interval's metrics
        )

    def _step_loop(self, writer, stops) -> loop.StepLoop:
        """The loop with this run's periods, the mapped step built once and its inputs bound."""
        settings, stage, dp = self.settings, self.stage, self.dp
        mapped = map_step(
            dp, stage.step, skip_nonfinite=settings.nonfinite == "skip",
            num_replicated=len(stage.replicated),
        )  # fmt: skip
        total = stage.schedule.total_steps
        end = total if settings.stop_at_step is None else min(settings.stop_at_step, total)
        serial = parallel.waits_for_each_step(dp.mesh)

        def train_step(state, step: int):
            outputs = mapped(state, *stage.replicated, stage.batch_for_step(step))
            return jax.block_until_ready(outputs) if serial else outputs

        progress = metrics.Progress(
            total, writer=writer, every_steps=settings.log_every, first_step=stops.first_step,
            batch_size=settings.batch_size,
        )  # fmt: skip
        return loop.StepLoop(
            settings=loop.LoopSettings(
                total_steps=total,
                end_step=end,
                log_every=settings.log_every,
                checkpoint_every=settings.checkpoint_every,
                workdir=settings.workdir,
                stop_on_nonfinite=settings.nonfinite == "stop",
            ),  # fmt: skip
            train_step=train_step,
            first=dp.first,
            save=lambda step, state: self.ckpt.save(step, dp.unreplicate(state), force=True),
            evaluators=stage.evaluators,
            report=loop.Report(writer, progress, stage.schedule.learning_rate()),
            stops=stops,
        )


def _check_config(ckpt, config, settings: RunSettings) -> None:
    """A resumed run's config against the newest checkpoint's (config_history.check_resume)."""
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.config(step)
        except Exception:  # noqa: BLE001 - an unreadable step: the restore will set it aside
            continue
        new = checkpoint.config_to_json_dict(config)
        config_history.check_resume(
            settings.workdir, saved, new, step=step, accept=settings.accept_config_changes
        )
        return


def _restore_or_initialise(ckpt: checkpoint.CheckpointManager, stage: Stage, workdir: str) -> Any:
    resuming = ckpt.latest_step() is not None
    state = stage.init_state(resuming)
    if resuming:
        state = ckpt.restore(state)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    return state


def _log_start(stage: Stage, settings: RunSettings, dp, start_step: int, end_step: int) -> None:
    schedule = stage.schedule
    logging.info(
        "%s: steps %d..%d of %d (%d per epoch), batch %d on %d devices, peak lr %.4g",
        stage.name, start_step, end_step, schedule.total_steps, schedule.steps_per_epoch,
        settings.batch_size, dp.num_replicas, schedule.peak_lr,
    )  # fmt: skip
