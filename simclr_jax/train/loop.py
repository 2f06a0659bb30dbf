"""The step loop every stage shares: metrics, progress, checkpoints, evaluation, preemption.

It owns what must behave the same in pretraining, fine-tuning and distillation: a run stopped by SIGTERM
or SIGINT finishes its step, saves, and returns; a non-finite loss stops the run naming the step, before a
bad state is ever checkpointed; metrics are averaged over each logging interval with one host copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

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


def first_nonfinite_step(history: list[dict[str, jax.Array]], first_step: int) -> int | None:
    """Step number of the first logged loss that is NaN or infinite (one host copy)."""
    if not history:
        return None
    losses = jax.device_get(jnp.stack([h["loss"] for h in history]))
    for offset, value in enumerate(losses.reshape(len(history), -1)[:, 0]):
        if not math.isfinite(float(value)):
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
) -> tuple[Any, dict[str, Any]]:
    """Run steps start_step..settings.end_step; returns the state and the latest metrics.

    `first` turns a replicated output into one copy (the backend's unreplicate); `save(step, state)`
    checkpoints. Results (the last training metrics, every evaluation) go to workdir/results.json.
    """
    results: dict[str, Any] = {}
    pending: list[dict[str, jax.Array]] = []
    interval_start = done = start_step
    with preemption_flag() as signals:
        for step in range(start_step, settings.end_step):
            state, step_metrics = train_step(state, batch_for_step(step))
            pending.append(first(step_metrics))
            done = step + 1
            last = done == settings.end_step or bool(signals)
            save_now = done % settings.checkpoint_every == 0 or last
            if done % settings.log_every == 0 or save_now:
                bad = first_nonfinite_step(pending, interval_start + 1)
                if bad is not None:
                    raise NonFiniteLossError(
                        f"loss is not finite at step {bad}; stopping. The last checkpoint "
                        f"(before step {interval_start + 1}) is kept; lower the learning rate or "
                        "enable skipping non-finite steps"
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
            if signals:
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
