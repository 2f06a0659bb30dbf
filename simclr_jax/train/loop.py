"""The step loop every stage shares: metrics, progress, checkpoints, evaluation, preemption.

It owns what must behave the same in pretraining, fine-tuning and distillation: a run stopped by SIGTERM
or SIGINT finishes its step, saves, and returns; a non-finite loss stops the run naming the step, before a
bad state is ever checkpointed; metrics are averaged over each logging interval with one host copy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from simclr_jax.train import metrics as metrics_lib


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def guard_nonfinite(step_fn: Callable, *, skip: bool) -> Callable:
    """Wrap a per-replica step to flag (and optionally drop) updates that are not finite.

    A step is bad when its loss or the updated parameters hold NaN/inf. The parameters matter as much
    as the loss: the loss of step k is computed before its update, so a blown-up update would only
    show one step later, after it could have been checkpointed. The flag comes from replica-averaged
    values, so every replica agrees. With skip=True a bad step keeps the old state (the step counter
    still advances, so data and augmentation stay tied to the step number).
    """

    def guarded(state, *inputs):
        new_state, step_metrics = step_fn(state, *inputs)
        finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(
            optax.tree.norm(new_state.params)
        )
        step_metrics = dict(step_metrics, nonfinite=1.0 - finite.astype(jnp.float32))
        if skip:
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = kept.replace(step=new_state.step)
        return new_state, step_metrics

    return guarded


def first_nonfinite_step(history: list[dict[str, jax.Array]], first_step: int) -> int | None:
    """Step number of the first step flagged by guard_nonfinite (one host copy)."""
    if not history or "nonfinite" not in history[0]:
        return None
    flags = jax.device_get(jnp.stack([h["nonfinite"] for h in history]))
    for offset, flag in enumerate(flags.reshape(len(history), -1)[:, 0]):
        if flag > 0:
            return first_step + offset
    return None


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Average per-step metrics over a logging interval."""
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
    return {k: float(v.mean()) for k, v in stacked.items()}


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long the loop runs, how often it logs and saves, where results go, what a non-finite
    loss does."""

    total_steps: int
    end_step: int  # this run stops here (== total_steps unless told to stop early)
    log_every: int
    checkpoint_every: int
    workdir: str  # results.json goes here
    stop_on_nonfinite: bool = True  # False: the step's update was dropped (nonfinite='skip')


@dataclasses.dataclass(frozen=True)
class Report:
    """Where each logging interval goes: the metric writer, the progress line, and the schedule
    whose learning rate is logged beside the metrics."""

    writer: Any
    progress: metrics_lib.Progress
    learning_rate: Callable[[int], Any]


@dataclasses.dataclass
class _Interval:
    """The per-step metrics of the logging interval in progress, on the devices."""

    start: int
    pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StepLoop:
    """The steps of one run: train, log, save, evaluate, stop (train/runner.py builds it).

    `train_step(state, step)` runs the mapped step on that step's batch; `first` turns a
    replicated output into one copy; `save(step, state)` checkpoints; `stops.stop_after(step)`
    says, the same on every process, whether a stop was requested. The loop alone decides when to save: every
    checkpoint_every steps, at the end, and at a stop. After the first step (which compiles) the
    loop runs under jax.transfer_guard("disallow"); what must cross (the schedule's value, a
    checkpoint, an evaluation) is allowed where it happens.
    """

    settings: LoopSettings
    train_step: Callable[[Any, int], tuple[Any, dict[str, jax.Array]]]
    first: Callable[[Any], Any]
    save: Callable[[int, Any], Any]
    evaluators: Sequence[Any]  # train/evaluators.Evaluator: each knows when it is due
    report: Report
    stops: Any  # preemption.StopRequests
    interval: _Interval = dataclasses.field(default_factory=lambda: _Interval(0))

    def run(self, state: Any, start_step: int) -> tuple[Any, dict[str, Any]]:
        """Steps start_step..end_step (or to a stop); the state and the latest metrics."""
        results: dict[str, Any] = {}
        self.interval = _Interval(start_step)
        done = start_step
        for step in range(start_step, self.settings.end_step):
            guard = "allow" if step == start_step else "disallow"
            with jax.transfer_guard(guard):
                state, step_metrics = self.train_step(state, step)
                self.interval.pending.append(self.first(step_metrics))
                done = step + 1
                # One answer per step: a request arriving later is seen after the next step.
                stopping = self.stops.stop_after(done)
                self._after_step(done, state, stopping, results)
            if stopping:
                logging.warning(
                    "Stopped by %s after step %d with a checkpoint; rerun the same command to "
                    "resume.",
                    self.stops.reason,
                    done,
                )
                results["preempted_at_step"] = done
                break
        self.report.writer.flush()
        results["step"] = done
        return state, results

    def _after_step(self, done: int, state: Any, stopping: bool, results: dict) -> None:
        settings = self.settings
        save_now = done % settings.checkpoint_every == 0 or done == settings.end_step or stopping
        logged = None
        if done % settings.log_every == 0 or save_now:
            logged = self._log(done)
            results.update(logged)
        self.report.progress(done, metrics=logged)  # one line: these metrics and the rates
        if save_now:
            with jax.transfer_guard("allow"):
                self.save(done, state)
        due = [e for e in self.evaluators if e.due(done, settings.total_steps)]
        eval_now = bool(due)
        if due:
            found: dict[str, float] = {}
            with jax.transfer_guard("allow"):
                for evaluator in due:
                    found.update(evaluator(state))
            self.report.writer.write_scalars(done, found)
            logging.info("Evaluation at step %d: %s", done, metrics_lib.format_scalars(found))
            results.update(found)
        if save_now or eval_now:
            metrics_lib.write_results_json(settings.workdir, results, done)

    def _log(self, done: int) -> dict[str, float]:
        """The interval's mean metrics, written; raises first if a step was not finite."""
        interval = self.interval
        bad = first_nonfinite_step(interval.pending, interval.start + 1)
        if bad is not None and self.settings.stop_on_nonfinite:
            raise NonFiniteLossError(
                f"the loss or the parameters became NaN/inf at step {bad}; stopping without "
                f"saving it. The last checkpoint (step <= {interval.start}) is kept. Lower "
                "the learning rate, or set --config.nonfinite=skip to drop such steps"
            )
        summary = mean_metrics(interval.pending)
        with jax.transfer_guard("allow"):  # the schedule is evaluated from a host integer
            summary["learning_rate"] = float(self.report.learning_rate(done - 1))
        self.report.writer.write_scalars(done, summary)
        self.interval = _Interval(done)
        return summary
