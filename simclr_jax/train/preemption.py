"""Stop requests every process agrees on: SIGTERM or SIGINT on any process stops all at one step.

A multi-host run must stop every process after the same step: a process that saves (a collective)
while another runs one more train step (another collective) hangs the job. So the loop asks
`StopRequests.stop_after(step)` after every step, and the answer is the same on every process.
Requests count from the moment the runner opens `StopRequests`, before the restore and the first
step's compilation: one that arrives then stops the run after its first step.

- One process: SIGTERM and SIGINT set a flag; the step that sees it is the last.
- Several processes: JAX's preemption sync service (`jax.distributed`, on by default) catches
  SIGTERM on any process from the moment it joins the job, tells the others through the
  coordinator, and picks the step after the furthest one the processes have reported as the stop
  step (multihost_utils.reached_preemption_sync_point); SIGINT is passed on to it as a SIGTERM.
  That works once every process reports the steps of its loop. A notice that arrives before
  (while the run loads data, restores or compiles) gets a stop step from older numbers, one the
  loop never asks about, and the service alone would drop it. So once, after the first step,
  every process reads whether the service has recorded a notice since the job started, and all
  processes gather the answers: if any saw one, all stop after that step. A notice that lands
  after the reads is the service's again, and it then knows every process's step.
  Orbax's manager stays out of the service (checkpoint.py): its finalize thread would report an
  older step after an asynchronous save and move the stop step behind the loop.
"""

from __future__ import annotations

import logging
import os
import signal
from types import TracebackType

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

HANDLED = (signal.SIGTERM, signal.SIGINT)
# Where JAX's service (tsl's PreemptionSyncManager) records a notice in the coordinator's store.
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


class StopRequests:
    """A context manager for a run: while open, SIGTERM/SIGINT request a stop.

    `start(first_step)` once the loop's first step is known (after the restore), then
    stop_after(step) -> bool: True when the run must end after `step` (every process agrees).
    """

    def __init__(self):
        self.first_step: int | None = None
        self._received: list[int] = []
        self._previous: dict[int, object] = {}
        self._shared = jax.process_count() > 1
        self._notices_read = False

    def __enter__(self) -> StopRequests:
        if self._shared:
            self._install({signal.SIGINT: self._forward})
        else:
            self._install({sig: self._record for sig in HANDLED})
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def start(self, first_step: int) -> None:
        """The loop begins after `first_step`; a multi-process run reports it to JAX's service."""
        self.first_step = first_step
        if self._shared:
            _check_sync_service(first_step)

    def stop_after(self, step: int) -> bool:
        """Whether `step` (just finished) is the last one; the same answer on every process."""
        if not self._shared:
            return bool(self._received)
        if not self._notices_read:
            self._notices_read = True
            with jax.transfer_guard("allow"):
                if _on_any_process(_notice_recorded()):
                    return True
        return multihost_utils.reached_preemption_sync_point(step)

    @property
    def reason(self) -> str:
        if self._shared:
            return f"SIGTERM or SIGINT on one of the {jax.process_count()} processes"
        return f"signal {self._received[0]} ({signal.Signals(self._received[0]).name})"

    def _install(self, handlers: dict[int, object]) -> None:
        try:
            for sig, handler in handlers.items():
                self._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals cannot be caught here
            logging.warning("not in the main thread: SIGTERM/SIGINT will not stop the run cleanly")

    def _record(self, signum: int, frame: object) -> None:
        self._received.append(signum)

    def _forward(self, signum: int, frame: object) -> None:
        """SIGINT in a multi-process run: a SIGTERM to this process, which JAX's service catches."""
        self._received.append(signum)
        os.kill(os.getpid(), signal.SIGTERM)


def _check_sync_service(first_step: int) -> None:
    try:  # also reports where this process starts; a notice before it is read after step 1
        multihost_utils.reached_preemption_sync_point(first_step)
    except RuntimeError as error:
        raise RuntimeError(
            "a multi-process run needs JAX's preemption service to stop all processes at "
            "the same step; leave jax_enable_preemption_service on"
        ) from error


def _notice_recorded() -> bool:
    """Whether JAX's service has recorded a preemption notice since the job started."""
    client = jax_distributed.global_state.client
    if client is None:  # no coordinator to ask (_check_sync_service found the service running)
        return False
    try:
        client.key_value_try_get(NOTICE_KEY)
    except jax.errors.JaxRuntimeError as error:
        if "NOT_FOUND" in str(error):
            return False
        raise
    return True


def _on_any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (one all-gather)."""
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
