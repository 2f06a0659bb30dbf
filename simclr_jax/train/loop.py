"""The step loop every stage shares: metrics, progress, checkpoints, evaluation, preemption.

It owns what must behave the same in pretraining, fine-tuning and distillation: a run stopped by SIGTERM
or SIGINT finishes its step, saves, and returns; a non-finite loss stops the run naming the step, before a
bad state is ever checkpointed; metrics are averaged over each logging interval with one host copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from simclr_jax.train import metrics as metrics_lib


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class LoopSettings:
    """How often the loop logs, saves and evaluates (steps)."""

    total_steps: int
    end_step: int  # this run stops here (== total_steps unless told to stop early)
    log_every: int
    checkpoint_every: int
    eval_every: int  # 0 = evaluate only at the end of training


@contextlib.contextmanager
def preemption_flag() -> Iterator[list[int]]:
    """Catch SIGTERM/SIGINT for the duration of the loop; the list holds the signals received."""
    received: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {}
    try:
        for sig in handled:
            previous[sig] = signal.signal(sig, lambda signum, _: received.append(signum))
    except ValueError:  # not the main thread: nothing to install
        previous = {}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def guard_nonfinite(step_fn: Callable, *, skip: bool) -> Callable:
    """Wrap a per-replica step to flag (and optionally drop) updates that are not finite.

    A step is bad when its loss or the updated parameters hold NaN/inf. The parameters matter as much
    as the loss: the loss of step k is computed before its update, so a blown-up update would only
    show one step later, after it could have been checkpointed. The flag comes from replica-averaged
    values, so every replica agrees. With skip=True a bad step keeps the old state (the step counter
    still advances, so data and augmentation stay tied to the step number).
    """

    def guarded(state, batch):
        new_state, step_metrics = step_fn(state, batch)
        finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(
            optax.global_norm(new_state.params)
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


def run(
    *,
    state: Any,
    start_step: int,
    settings: LoopSettings,
    train_step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]],
    batch_for_step: Callable[[int], Any],
    first: Callable[[Any], Any],
    save: Callable[[int, Any], None],
    evaluate: Callable[[Any], dict[str, float]] | None,
    writer: Any,
    progress: metrics_lib.Progress,
    learning_rate: Callable[[int], Any],
    workdir: str,
    stop_on_nonfinite: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Run steps start_step..settings.end_step; returns the state and the latest metrics.

    `first` turns a replicated output into one copy (the backend's unreplicate); `save(step, state)`
    checkpoints. Results (the last training metrics, every evaluation) go to workdir/results.json.
    Steps wrapped by guard_nonfinite report bad updates: with stop_on_nonfinite the loop raises
    NonFiniteLossError before such a state is saved; otherwise the step has dropped them itself.
    """
    results: dict[str, Any] = {}
    pending: list[dict[str, jax.Array]] = []
    interval_start = done = start_step
    with preemption_flag() as signals:
        for step in range(start_step, settings.end_step):
            state, step_metrics = train_step(state, batch_for_step(step))
            pending.append(first(step_metrics))
            done = step + 1
            # One snapshot per step: a signal arriving later in this iteration is seen next step
            # (or right after the loop), never between the save decision and the exit.
            stopping = bool(signals)
            last = done == settings.end_step or stopping
            save_now = done % settings.checkpoint_every == 0 or last
            if done % settings.log_every == 0 or save_now:
                bad = first_nonfinite_step(pending, interval_start + 1)
                if bad is not None and stop_on_nonfinite:
                    raise NonFiniteLossError(
                        f"the loss or the parameters became NaN/inf at step {bad}; stopping "
                        f"without saving it. The last checkpoint (step <= {interval_start}) is "
                        "kept. Lower the learning rate, or set --config.nonfinite=skip to drop "
                        "such steps"
                    )
                summary = mean_metrics(pending)
                summary["learning_rate"] = float(learning_rate(step))
                writer.write_scalars(done, summary)
                results.update(summary)
                pending, interval_start = [], done
            progress(done)
            if save_now:
                save(done, state)
            eval_now = settings.eval_every and done % settings.eval_every == 0
            if evaluate is not None and (eval_now or done == settings.total_steps):
                eval_metrics = evaluate(state)
                writer.write_scalars(done, eval_metrics)
                results.update(eval_metrics)
            if save_now or eval_now:
                metrics_lib.write_results_json(workdir, results, done)
            if stopping:
                logging.warning(
                    "Received signal %d: stopped after step %d with a checkpoint; rerun the same "
                    "command to resume.",
                    signals[0],
                    done,
                )
                results["preempted_at_step"] = done
                break
    writer.flush()
    results["step"] = done
    return state, results
