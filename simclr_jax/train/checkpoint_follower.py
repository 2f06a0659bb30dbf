"""The evaluation job's loop: poll a workdir, evaluate each new checkpoint once, stop at the end.

It runs beside training (another process or machine; the reference's `--mode=eval` job) and only
reads the training run's checkpoints. Its own files go to `workdir/eval/`: metrics.jsonl (and
TensorBoard events) with one record per evaluated step, results.json with the newest, and its own
lock, so two evaluators do not share the folder. The steps already in eval/metrics.jsonl are done:
a restarted job goes on where it stopped, and a step is written only after its evaluation
finished, so each step appears once however the job is interrupted.

Which steps, in which order, is decided by process 0 and broadcast, so every process of a
multi-process evaluation job evaluates the same checkpoint together.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simclr_jax.train import checkpoint, metrics
from simclr_jax.train.workdir_lock import WorkdirLock, make_folder

EVAL_DIR = "eval"
_NOTHING, _STOP = -1, -2


def evaluated_steps(eval_dir: epath.PathLike) -> set[int]:
    """Steps with a record in eval_dir/metrics.jsonl (a line cut short does not count)."""
    path = epath.Path(eval_dir) / metrics.METRICS_FILE
    if not path.exists():
        return set()
    steps = set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in record:
            steps.add(int(record["step"]))
    return steps


class _Checkpoints:
    """The training run's committed steps, re-listed on each poll (read-only)."""

    def __init__(self, workdir: epath.PathLike):
        self.directory = checkpoint.absolute_path(workdir) / "checkpoints"
        self._manager = None

    def steps(self) -> list[int]:
        if self._manager is None:
            if not self.directory.is_dir():
                return []
            self._manager = checkpoint.read_only_manager(self.directory)
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def _broadcast(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def run(
    workdir: epath.PathLike,
    evaluate_step: Callable[[int], dict[str, Any]],
    *,
    final_step: int,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Evaluates every new checkpoint of `workdir` until `final_step` is done; returns the last.

    `evaluate_step(step)` restores that step and returns its metrics. Steps that appear while
    an older one is evaluated are taken oldest first; a step deleted by checkpoint retention
    before its turn, or one that does not verify, is skipped with a log line. With `timeout_s`,
    the job also stops when no new checkpoint has appeared for that long (a run that died).
    """
    eval_dir = epath.Path(workdir) / EVAL_DIR
    is_main = jax.process_index() == 0
    if is_main:
        make_folder(eval_dir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(WorkdirLock(eval_dir))
        checkpoints = _Checkpoints(workdir)
        stack.callback(checkpoints.close)
        writer = metrics.create_writer(eval_dir, is_main=is_main)
        stack.callback(writer.close)
        done = evaluated_steps(eval_dir)
        skipped: set[int] = set()
        results = _read_results(eval_dir)
        last_news = time.monotonic()
        logging.info(
            "Evaluating the checkpoints of %s up to step %d (%d done before)",
            workdir, final_step, len(done),
        )  # fmt: skip
        while True:
            step = _NOTHING
            if is_main:
                pending = [s for s in checkpoints.steps() if s not in done | skipped]
                if pending:
                    step = pending[0]
                elif max(done, default=-1) >= final_step:
                    step = _STOP
                elif timeout_s is not None and time.monotonic() - last_news > timeout_s:
                    logging.warning(
                        "no new checkpoint in %s for %.0f s; stopping before step %d",
                        workdir, timeout_s, final_step,
                    )  # fmt: skip
                    step = _STOP
            step = _broadcast(step)
            if step == _STOP:
                break
            if step == _NOTHING:
                sleep(poll_s)
                continue
            last_news = time.monotonic()
            values = _evaluate(evaluate_step, step, checkpoints.directory)
            if values is None:
                skipped.add(step)
                continue
            writer.write_scalars(step, values)
            writer.flush()
            done.add(step)
            results = {"step": step, **metrics.to_python(values)}
            metrics.write_results_json(eval_dir, values, step, is_main=is_main)
    return results


def _evaluate(evaluate_step, step: int, directory: epath.Path) -> dict[str, Any] | None:
    try:
        return evaluate_step(step)
    except checkpoint.CorruptCheckpointError as error:
        if (directory / str(step)).exists():
            logging.warning("skipping step %d: %s", step, " ".join(str(error).split()))
        else:
            logging.info("step %d was deleted (checkpoint retention) before its turn", step)
    return None


def _read_results(eval_dir: epath.Path) -> dict[str, Any]:
    path = eval_dir / metrics.RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}
