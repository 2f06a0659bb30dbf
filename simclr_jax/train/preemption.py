"""Stop requests every process agrees on: SIGTERM or SIGINT on any process stops all at one step.

A multi-host run must stop every process after the same step: a process that saves (a collective)
while another runs one more train step (another collective) hangs the job. So the loop asks
`StopRequests.stop_after(step)` after every step, and the answer is the same on every process.

- One process: SIGTERM and SIGINT set a flag; the step that sees it is the last.
- Several processes: JAX's preemption sync service (`jax.distributed`, on by default) catches
  SIGTERM on any process, tells the others through the coordinator, and picks the step after
  the furthest one reached as the stop step (multihost_utils.reached_preemption_sync_point);
  SIGINT is passed on to it as a SIGTERM. Orbax asks the same service when it saves, with the
  same absolute step numbers, so the two never disagree.

Known limits of that protocol (JAX's and orbax's, kept here so nobody rediscovers them): a
request that arrives before the loop's first step of a resumed run may be dropped (the run then
goes on to its end, on every process alike); and orbax's finalize thread reports an older step
to the service after an asynchronous save, which could in principle let process 0 pass the stop
step if the request lands in that instant.
"""

from __future__ import annotations

import logging
import os
import signal
from types import TracebackType

import jax
from jax.experimental import multihost_utils

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """A context manager for the loop: while open, SIGTERM/SIGINT request a stop.

    stop_after(step) -> bool: True when the run must end after `step` (every process agrees).
    """

    def __init__(self, first_step: int):
        self.first_step = first_step
        self._received: list[int] = []
        self._previous: dict[int, object] = {}
        self._shared = jax.process_count() > 1

    def __enter__(self) -> StopRequests:
        if self._shared:
            self._check_sync_service()
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

    def stop_after(self, step: int) -> bool:
        """Whether `step` (just finished) is the last one; the same answer on every process."""
        if self._shared:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self._received)

    @property
    def reason(self) -> str:
        if self._received:
            return f"signal {self._received[0]} ({signal.Signals(self._received[0]).name})"
        return "a stop request (SIGTERM on some process)"

    def _check_sync_service(self) -> None:
        try:  # also records where this process starts, for the service
            multihost_utils.reached_preemption_sync_point(self.first_step)
        except RuntimeError as error:
            raise RuntimeError(
                "a multi-process run needs JAX's preemption service to stop all processes at "
                "the same step; leave jax_enable_preemption_service on"
            ) from error

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
