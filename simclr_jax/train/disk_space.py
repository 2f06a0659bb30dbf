"""A full disk, said in one line: the error a run ends with when a write finds no space.

The write that fails may be anywhere (orbax's asynchronous save thread, tensorstore, the metric
writers, TensorBoard), and each wraps ENOSPC its own way: an OSError, a ValueError with
RESOURCE_EXHAUSTED, TensorFlow's ResourceExhaustedError. The run's last word should be the cause,
not whichever wrapper (or unrelated error during shutdown) came last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator

NO_SPACE = "No space left on device"


class DiskFullError(OSError):
    """The disk holding the workdir is full; the committed checkpoints are intact."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or any exception it was raised from or during, is a full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if NO_SPACE in str(error) or "os_error_code='28'" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@dataclasses.dataclass
class SavedSteps:
    """Where the newest intact checkpoint is read from once it is known (the run's manager)."""

    source: Callable[[], int | None] | None = None

    def latest(self) -> int | None:
        with contextlib.suppress(Exception):  # the manager may be closed: best effort
            return self.source() if self.source else None
        return None


@contextlib.contextmanager
def reported(workdir: str) -> Iterator[SavedSteps]:
    """A full disk anywhere inside becomes DiskFullError, naming the newest intact checkpoint
    (what the yielded SavedSteps' source says); any other error passes unchanged."""
    saved = SavedSteps()
    try:
        yield saved
    except Exception as error:
        if is_disk_full(error):
            raise disk_full_error(workdir, saved.latest()) from error
        raise


def disk_full_error(workdir: str, resume_step: int | None) -> DiskFullError:
    """The one-line error: what happened, what is kept, what to do.

    Written last: orbax's write threads still failing one after another are waited for (they
    would log after it, or fail on the interpreter's shutdown), and the write futures that
    failed, garbage-collected at shutdown, would each be logged by asyncio ('Future exception
    was never retrieved'); the cause is known and said, so those messages are dropped.
    """
    _let_writers_finish()
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    kept = (
        f"checkpoints up to step {resume_step} are intact"
        if resume_step
        else "no checkpoint was completed"
    )
    return DiskFullError(
        errno.ENOSPC,
        f"{NO_SPACE} while writing to {workdir} ({kept}); free space on that disk and rerun the "
        "same command to resume",
    )


def _let_writers_finish(timeout_s: float = 60.0) -> None:
    """Waits for orbax's background write threads (they end once their writes have failed).

    threading.Thread.join itself: orbax's threads override join() to raise their error again.
    """
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
