"""One live run per workdir: a lock file naming its holder, refreshed by a heartbeat.

Two runs on one workdir would delete each other's checkpoints and log every step twice, so a run
takes `workdir/lock.json` first and a second run is refused with the holder's host and PID. A lock
left behind by a run that died (kill -9, a lost VM) is taken over with a warning: on the same host
when its process no longer exists, from another host when its heartbeat (rewritten every
`heartbeat_s`) is older than `stale_after_s`.

What holds where: on a local disk and on NFS the lock is created with a hard link (atomic: of
two runs that start together exactly one gets it). On GCS (gs://) and other object stores there
is no atomic create; the check and the write are separate, so two runs started within the same
second can both pass, and afterwards the later one is found out only at the next heartbeat (and
logs it). Taking over a stale lock is guarded by renaming it first (one of two racers wins).

Multi-process jobs: process 0 takes the lock for the whole job and tells the others (one
broadcast); every process raises the same error if it is refused, so none waits in a collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell PID reuse."""
    try:
        stat = epath.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of stat, counted after the name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_folder(folder: epath.PathLike) -> None:
    """Raises a one-line error if `folder`, or the nearest of its parents that exists, is a file
    (on a local disk; in a bucket, `folder` itself)."""
    folder = epath.Path(folder)
    remote = "://" in os.fspath(folder)
    for path in (folder,) if remote else (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                what = "it" if path == folder else path
                raise NotADirectoryError(
                    f"{folder} must be a folder (--workdir names a run's folder, new or "
                    f"existing), but {what} is a file"
                )
            return


def make_folder(folder: epath.Path) -> None:
    """Creates `folder` and its parents (check_folder first)."""
    check_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)


def _describe(holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"host {holder.get('host')!r}, PID {holder.get('pid')}, started {holder.get('started')}, "
        f"last heartbeat {age:.0f} s ago"
    )


class WorkdirLock:
    """Context manager: holds `workdir/<name>` from `acquire()` (or `with`) to `release()`.

    `name` lets jobs that share a workdir without competing (the evaluation job) hold their own.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        *,
        name: str = LOCK_FILE,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        if stale_after_s <= heartbeat_s:
            raise ValueError(
                f"stale_after_s ({stale_after_s}) must exceed heartbeat_s ({heartbeat_s})"
            )
        self.path = epath.Path(os.fspath(workdir)) / name
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    def acquire(self) -> None:
        """Takes the lock (process 0; every process learns the outcome) or raises."""
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire_here()
            except WorkdirLockedError as locked:
                error = locked
        taken = error is None
        if jax.process_count() > 1:
            taken = bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))
        if error is not None:
            raise error
        if not taken:
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another run (process 0 names it in its log)"
            )

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._held:
            self._held = False
            holder = self._read()
            if holder is not None and self._is_me(holder):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    # ----------------------------------------------------------------- internal

    def _record(self) -> dict[str, Any]:
        return dict(self._me, heartbeat=time.time())

    def _is_me(self, holder: dict[str, Any]) -> bool:
        return all(holder.get(k) == self._me[k] for k in ("host", "pid", "process_start"))

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}  # written by something else or cut short: nobody we can name

    def _alive(self, holder: dict[str, Any]) -> bool:
        if not holder or self._is_me(holder):
            return False
        if holder.get("host") == self._me["host"]:
            pid = int(holder.get("pid", -1))
            if pid <= 0 or not _pid_alive(pid):
                return False
            start = holder.get("process_start")
            return start is None or _process_start(pid) in (None, start)
        return time.time() - float(holder.get("heartbeat", 0)) < self.stale_after_s

    def _acquire_here(self) -> None:
        make_folder(self.path.parent)
        for _ in range(5):
            if self._create():
                break
            holder = self._read()
            if holder is None:  # released meanwhile: try again
                continue
            if self._alive(holder):
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by another run ({_describe(holder)}); stop it, "
                    "or use another --workdir. If that run is gone (its host lost), delete "
                    f"{self.path} or wait {self.stale_after_s / 60:.0f} min for its lock to go stale"
                )
            if self._take_over(holder):
                if holder and not self._is_me(holder):
                    logging.warning(
                        "taking over the lock of a run that is no longer alive (%s)",
                        _describe(holder),
                    )
                break
        else:
            raise WorkdirLockedError(f"could not take {self.path}: other runs keep changing it")
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Creates the lock file with our record if it does not exist; True if we did."""
        text = json.dumps(self._record())
        if "://" in os.fspath(self.path):  # object store: check, then write (not atomic)
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        tmp = self._tmp_path("new")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)  # atomic, also on NFS; fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Moves the stale lock out of the way (one racer wins the rename) and creates ours."""
        aside = self._tmp_path("stale")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return False  # someone else moved it first
        try:
            moved = json.loads(aside.read_text() or "{}")
        except json.JSONDecodeError:
            moved = {}
        if moved != stale:  # we moved a lock that changed after we judged it: put it back
            with contextlib.suppress(OSError):
                aside.rename(self.path)
            return False
        aside.unlink()
        return self._create()

    def _tmp_path(self, what: str) -> epath.Path:
        return self.path.parent / f".{self.path.name}.{self._me['host']}.{os.getpid()}.{what}"

    def _beat(self) -> None:
        """Rewrites the heartbeat until released; says so once if someone else took the lock."""
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder == {}:  # caught mid-write (by a writer that truncates first): look again
                if self._stop.wait(min(self.heartbeat_s, 1.0)):
                    break
                holder = self._read()
                if holder == {}:  # still unreadable: it names nobody, so it is still ours
                    logging.warning("%s was unreadable; rewriting it", self.path)
                    holder = None
            if holder is not None and not self._is_me(holder):
                if not warned:
                    logging.error(
                        "%s was taken by another run (%s): two runs share this workdir",
                        self.path,
                        _describe(holder),
                    )
                    warned = True
                continue
            tmp = self._tmp_path("beat")
            try:
                tmp.write_text(json.dumps(self._record()))
                tmp.replace(self.path)
            except OSError as error:  # a full disk or a flaky bucket must not kill the run
                logging.warning("could not refresh %s: %s", self.path, error)
