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
_RELIST_TRIES = 10


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
        for _ in range(_RELIST_TRIES):
            try:
                self._manager.reload()
                break
            except FileNotFoundError:  # retention deleted a step while orbax read the listing
                continue
        else:
            self._manager.reload()
        return sorted(self._manager.all_steps())

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def _broadcast(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class _MissedSteps:
    """Checkpoints the training run saved that the job never read, each named once in a warning.

    Saved steps are the ones the job saw listed and, with `every` (the run's
    checkpoint_every_steps), every multiple of it below the newest listed step: retention may
    delete those before the job first looks. A step saved off that grid (at a stop) and deleted
    before the job saw it listed is not known here.
    """

    def __init__(self, workdir: epath.PathLike, every: int, keep: int | None):
        self.workdir, self.every, self.keep = workdir, every, keep
        self.seen: set[int] = set()
        self.reported: set[int] = set()

    def check(self, listed: list[int], read: set[int]) -> None:
        """`listed`: the steps there now; `read`: the steps evaluated or found unreadable."""
        self.seen.update(listed)
        saved = set(self.seen)
        if self.every > 0 and listed:
            saved.update(range(self.every, max(listed), self.every))
        missed = sorted(saved - set(listed) - read - self.reported)
        if missed:
            self.reported.update(missed)
            kept = f"keep_checkpoints={self.keep}" if self.keep else "keep_checkpoints"
            logging.warning(
                "not evaluated: checkpoint steps %s of %s were deleted by the run's retention (%s) "
                "before this job read them; start the job with the run, or keep more checkpoints",
                _listed(missed), self.workdir, kept,
            )  # fmt: skip


def _listed(steps: list[int]) -> str:
    """'4, 7' or, for 3 or more steps a fixed distance apart, '10-90 every 10' or '3-5' (sorted)."""
    parts, i = [], 0
    while i < len(steps):
        j = i + 1
        while j + 1 < len(steps) and steps[j + 1] - steps[j] == steps[i + 1] - steps[i]:
            j += 1
        if j - i >= 2:
            gap = steps[i + 1] - steps[i]
            parts.append(f"{steps[i]}-{steps[j]}" + (f" every {gap}" if gap > 1 else ""))
            i = j + 1
        else:
            parts.append(str(steps[i]))
            i += 1
    return ", ".join(parts)


def run(
    workdir: epath.PathLike,
    evaluate_step: Callable[[int], dict[str, Any]],
    *,
    final_step: int,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    checkpoint_every: int = 0,
    keep: int | None = None,
) -> dict[str, Any]:
    """Evaluates every new checkpoint of `workdir` until `final_step` is done; returns the last.

    `evaluate_step(step)` restores that step and returns its metrics. Steps that appear while
    an older one is evaluated are taken oldest first; one that does not verify is skipped with a
    log line, and the steps retention deleted before the job read them are named in a warning
    (_MissedSteps; `checkpoint_every` and `keep` are the run's checkpoint_every_steps and
    keep_checkpoints). With `timeout_s`, the job also stops when no new checkpoint has appeared
    for that long (a run that died).
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
        logging.info(
            "Evaluating the checkpoints of %s up to step %d (%d done before)",
            workdir, final_step, len(done),
        )  # fmt: skip
        follow = _Following(
            checkpoints, done, _MissedSteps(workdir, checkpoint_every, keep), final_step, timeout_s
        )
        results = _read_results(eval_dir)
        while (step := follow.next_step(is_main)) != _STOP:
            if step == _NOTHING:
                sleep(poll_s)
                continue
            values = _evaluate(evaluate_step, step, checkpoints.directory)
            if values is None:
                follow.unreadable(step)
                continue
            writer.write_scalars(step, values)
            writer.flush()
            done.add(step)
            results = {"step": step, **metrics.to_python(values)}
            metrics.write_results_json(eval_dir, values, step, is_main=is_main)
    return results


class _Following:
    """Which step to evaluate next: decided by process 0 and broadcast, so every process of a
    multi-process job evaluates the same checkpoint together."""

    def __init__(self, checkpoints, done: set[int], missed, final_step: int, timeout_s):
        self.checkpoints, self.done, self.missed = checkpoints, done, missed
        self.final_step, self.timeout_s = final_step, timeout_s
        self.skipped: set[int] = set()
        self.last_news = time.monotonic()

    def next_step(self, is_main: bool) -> int:
        step = _NOTHING
        if is_main:
            listed = self.checkpoints.steps()
            self.missed.check(listed, self.done | self.skipped)
            waited_s = time.monotonic() - self.last_news
            step = _next_step(
                listed, self.done, self.skipped, self.final_step, waited_s, self.timeout_s
            )
        step = _broadcast(step)
        if step >= 0:
            self.last_news = time.monotonic()
        return step

    def unreadable(self, step: int) -> None:
        """A step whose evaluation failed: set aside if it is still there (a corrupt one); one
        deleted meanwhile is _MissedSteps' to name."""
        if (self.checkpoints.directory / str(step)).exists():
            self.skipped.add(step)


def _next_step(listed, done, skipped, final_step: int, waited_s: float, timeout_s) -> int:
    """The oldest step not read yet, or _STOP (the final step is done, or the wait timed out),
    or _NOTHING (poll again)."""
    pending = [s for s in listed if s not in done | skipped]
    if pending:
        return pending[0]
    if max(done, default=-1) >= final_step:
        return _STOP
    if timeout_s is not None and waited_s > timeout_s:
        logging.warning(
            "no new checkpoint for %.0f s; stopping before step %d", timeout_s, final_step
        )
        return _STOP
    return _NOTHING


def _evaluate(evaluate_step, step: int, directory: epath.Path) -> dict[str, Any] | None:
    """The step's metrics, or None: unreadable (said, and its folder stays) or deleted by the
    run's retention while it was read (its folder goes within a moment; said by _MissedSteps)."""
    try:
        return evaluate_step(step)
    except checkpoint.CorruptCheckpointError as error:
        if _stays(directory / str(step)):
            logging.warning("skipping step %d: %s", step, " ".join(str(error).split()))
    return None


def _stays(path: epath.Path, grace_s: float = 2.0) -> bool:
    """Whether `path` still exists after `grace_s` (a deletion in progress ends well within)."""
    deadline = time.monotonic() + grace_s
    while path.exists():
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False


def _read_results(eval_dir: epath.Path) -> dict[str, Any]:
    path = eval_dir / metrics.RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}
