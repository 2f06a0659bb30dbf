"""The workdir lock: a live holder refuses a second run; a dead one is taken over with a warning."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from absl import logging

from simclr_jax.train import workdir_lock
from simclr_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(workdir, **fields):
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": None,
        "started": "2024-01-01 00:00:00",
        "heartbeat": time.time(),
        **fields,
    }
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def capture(monkeypatch, level: str) -> list[str]:
    messages = []
    monkeypatch.setattr(logging, level, lambda msg, *args: messages.append(msg % args))
    return messages


def test_second_holder_is_refused_naming_host_and_pid_and_the_lock_is_released(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid)
        with pytest.raises(WorkdirLockedError) as error:
            WorkdirLock(tmp_path).acquire()
        message = str(error.value)
        assert f"PID {sleeper.pid}" in message and socket.gethostname() in message
        assert "\n" not in message
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / workdir_lock.LOCK_FILE).unlink()
    with WorkdirLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_FILE]
    assert list(tmp_path.iterdir()) == []  # released, no temporary files left


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, monkeypatch):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    warnings = capture(monkeypatch, "warning")
    with WorkdirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"PID {pid}" in warnings[0] and "taking over" in warnings[0]


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path, monkeypatch):
    # Same host, a live PID, but another process start time: the holder died and its PID moved on.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, process_start="1")
        warnings = capture(monkeypatch, "warning")
        with WorkdirLock(tmp_path):
            pass
        assert len(warnings) == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_other_host_counts_as_alive_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    write_lock(tmp_path, host="tpu-worker-7", pid=4242, heartbeat=time.time() - 30)
    with pytest.raises(WorkdirLockedError, match="'tpu-worker-7', PID 4242"):
        WorkdirLock(tmp_path, heartbeat_s=10, stale_after_s=60).acquire()
    write_lock(tmp_path, host="tpu-worker-7", pid=4242, heartbeat=time.time() - 120)
    warnings = capture(monkeypatch, "warning")
    with WorkdirLock(tmp_path, heartbeat_s=10, stale_after_s=60):
        pass
    assert len(warnings) == 1 and "tpu-worker-7" in warnings[0]


def test_heartbeat_refreshes_the_lock_and_notices_a_thief(tmp_path, monkeypatch):
    errors = capture(monkeypatch, "error")
    with WorkdirLock(tmp_path, heartbeat_s=0.05, stale_after_s=1) as lock:
        first = json.loads(lock.path.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock.path.read_text())["heartbeat"] > first
        write_lock(tmp_path, host="elsewhere", pid=1)
        time.sleep(0.3)
        assert json.loads(lock.path.read_text())["host"] == "elsewhere"  # not overwritten
    assert len(errors) == 1 and "elsewhere" in errors[0]
    assert (tmp_path / workdir_lock.LOCK_FILE).exists()  # the other run's lock stays


def test_an_unreadable_lock_under_a_live_holder_is_rewritten_not_called_a_thief(
    tmp_path, monkeypatch
):
    # A writer that truncates first (write_text) leaves an empty file for a moment; a lock file cut
    # short for good names nobody. Neither is another run taking the workdir.
    errors, warnings = capture(monkeypatch, "error"), capture(monkeypatch, "warning")
    with WorkdirLock(tmp_path, heartbeat_s=0.05, stale_after_s=1) as lock:
        lock.path.write_text('{"host": "elsewh')
        time.sleep(0.4)
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert errors == []
    assert len(warnings) == 1 and "unreadable" in warnings[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:os.fork():RuntimeWarning")
def test_concurrent_starts_get_exactly_one_lock(tmp_path):
    # Four forked processes wait on one pipe, then all try to create the lock at once (file
    # operations only: the children never touch jax).
    read_end, write_end = os.pipe()
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)  # returns when the parent closes its end
            os._exit(0 if WorkdirLock(tmp_path)._create() else 3)
        children.append(pid)
    os.close(read_end)
    os.close(write_end)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children)
    assert codes == [0, 3, 3, 3]
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] in children


def test_a_file_where_the_workdir_must_be_is_named_in_one_line(tmp_path):
    afile = tmp_path / "run"
    afile.write_text("keep me")
    for workdir, blocker in ((afile, "it"), (afile / "sub" / "deeper", str(afile))):
        with pytest.raises(NotADirectoryError) as error:
            WorkdirLock(workdir).acquire()
        assert str(error.value) == (
            f"{workdir} must be a folder (--workdir names a run's folder, new or existing), "
            f"but {blocker} is a file"
        )
    assert afile.read_text() == "keep me"
