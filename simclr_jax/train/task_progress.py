"""Progress of a slow loop outside training (linear fits, embeddings): done/total, elapsed, ETA.

A step of the demo that takes more than a few seconds says so: one log line at most every
`every_s` seconds while it runs, and one at the end if it said anything before or took that long.
Fast loops stay silent. The ETA counts the items after the first, which compiles (as train
Progress does): until a second item is done there is none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from simclr_jax.train.metrics import format_seconds


class TaskProgress:
    """Call advance() after each item (or `count` items) of `total`."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        unit: str = "",
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self._clock = clock
        self._start = self._last = clock()
        self._done, self._told = 0, False
        self._first: tuple[int, float] | None = None  # (items, time) when the first was done
        self.lines: list[str] = []  # what was logged, for tests and callers

    def advance(self, count: int = 1) -> None:
        self._done += count
        now = self._clock()
        elapsed = now - self._start
        if self._done >= self.total:
            if self._told or elapsed >= self.every_s:
                self._log(f"{self._done}/{self.total}{self.unit} in {format_seconds(elapsed)}")
        elif now - self._last >= self.every_s:
            eta = "after the next (the first compiles)"
            if self._first is not None and self._done > self._first[0]:
                rate = (self._done - self._first[0]) / max(now - self._first[1], 1e-9)
                eta = format_seconds((self.total - self._done) / rate)
            self._log(
                f"{self._done}/{self.total}{self.unit}, elapsed {format_seconds(elapsed)}, "
                f"ETA {eta}"
            )
            self._last = now
        if self._first is None:
            self._first = (self._done, now)

    def _log(self, status: str) -> None:
        line = f"{self.what}: {status}"
        logging.info(line)
        self.lines.append(line)
        self._told = True
