"""Stop requests in a multi-process run: every process stops after the same step.

Two `jax.distributed` processes on localhost run the runner (tests/multiprocess/runner_worker.py:
the trainers' runner on a tiny stage, a collective every step). SIGTERM reaches only one of them,
then (on the rerun) both a step apart, then (on the next rerun) one of them during its start-up,
before the restore. Each time both must save the same step, say so in the same line and exit 0
within a bounded time, and resuming must give exactly the losses of an uninterrupted run. A
process that stopped alone would hang its partner in the next collective (the launch's deadline
catches it); a request both ignored would let them train to the end.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_multiprocess import _JOB_VARIABLES, free_port, read_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess" / "runner_worker.py"
STEPS = 150
EXIT_S = 60  # from the last signal to both processes gone (they stop within ~1-2 s of steps)
LAUNCH_S = 240  # a whole launch on a loaded 2-core machine; a hang ends here


class Job:
    """The two processes of one launch, with their logs."""

    def __init__(self, workdir: pathlib.Path, *flags: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VARIABLES)}
        env.update(
            SIMCLR_COORDINATOR_ADDRESS=f"localhost:{free_port()}",
            SIMCLR_NUM_PROCESSES="2",
            JAX_ENABLE_COMPILATION_CACHE="false",  # see test_multiprocess.launch
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.logs, self.procs = workdir, [], []
        self.started = time.monotonic()
        for i in range(2):
            self.logs.append(workdir / f"log.{len(list(workdir.glob('log.*')))}.txt")
            with open(self.logs[-1], "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(workdir), f"--num_steps={STEPS}", *flags],
                        env=dict(env, SIMCLR_PROCESS_ID=str(i)),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )

    def wait_for_step(self, step: int) -> int:
        """Blocks until process 0 has logged `step` (or more); returns the newest logged step."""
        while True:
            logged = self.logged_steps()
            if logged and max(logged) >= step:
                return max(logged)
            self.check_alive()
            time.sleep(0.02)

    def hold_in_start_up_and_signal(self, process: int) -> None:
        """With --hold_start_up: SIGTERM to `process` while both wait before their restore; they
        go on once JAX's service has taken the notice (its log line, then 2 s for the others)."""
        while not all((self.workdir / f"starting.{i}").exists() for i in range(2)):
            self.check_alive()
            time.sleep(0.02)
        self.procs[process].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "SIGTERM caught" not in self.logs[process].read_text():
            if time.monotonic() > deadline:
                break  # JAX's wording changed: the stop must happen all the same
            self.check_alive()
            time.sleep(0.05)
        time.sleep(2)
        (self.workdir / "go").write_text("")

    def logged_steps(self) -> list[int]:
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        return [row["step"] for row in rows if "loss" in row]

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                pytest.fail(f"process {i} ended early:\n{self.logs[i].read_text()[-3000:]}")
        if time.monotonic() - self.started > LAUNCH_S:
            self.kill()
            pytest.fail(f"no progress within {LAUNCH_S}s:\n{self.logs[0].read_text()[-3000:]}")

    def finish(self, limit_s: float) -> list[dict]:
        """Waits up to limit_s for both to exit 0; returns their result files."""
        deadline = time.monotonic() + limit_s
        try:
            for i, proc in enumerate(self.procs):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                assert proc.returncode == 0, f"process {i}:\n{self.logs[i].read_text()[-3000:]}"
        except subprocess.TimeoutExpired:
            pytest.fail(f"not both gone within {limit_s}s:\n{self.logs[0].read_text()[-3000:]}")
        finally:
            self.kill()
        return [json.loads((self.workdir / f"result.{i}.json").read_text()) for i in range(2)]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def saved_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def check_stopped_together(job: Job, results: list[dict], after: int) -> int:
    """Both processes stopped after the same step, later than `after`, saved it together and
    said so in the same line."""
    stops = [r["preempted_at_step"] for r in results]
    assert stops[0] == stops[1] and stops[0] is not None, results
    assert after < stops[0] < STEPS and [r["step"] for r in results] == stops, results
    assert saved_steps(job.workdir)[-1] == stops[0]
    state = job.workdir / "checkpoints" / str(stops[0]) / "state"
    writers = {p.name for p in (state / "array_metadatas").iterdir()}
    assert writers == {"process_0", "process_1"}, "both processes wrote the stop checkpoint"
    line = (
        f"Stopped by SIGTERM or SIGINT on one of the 2 processes after step {stops[0]} with a "
        "checkpoint; rerun the same command to resume."
    )
    for log in job.logs:
        assert log.read_text().count(line) == 1, log.read_text()[-3000:]
    return stops[0]


def test_sigterm_to_some_processes_stops_all_at_one_step_and_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = Job(straight)  # the uninterrupted run, beside the first interrupted launch
    try:
        # 1. SIGTERM to process 1 only.
        job = Job(stopped)
        job.wait_for_step(5)
        job.procs[1].send_signal(signal.SIGTERM)
        first = check_stopped_together(job, job.finish(EXIT_S), after=5)
        assert [r["step"] for r in reference.finish(LAUNCH_S)] == [STEPS, STEPS]
    finally:
        reference.kill()

    # 2. The rerun resumes there; SIGTERM reaches process 0, then process 1 a step later.
    job = Job(stopped)
    seen = job.wait_for_step(first + 5)
    job.procs[0].send_signal(signal.SIGTERM)
    job.wait_for_step(seen + 1)
    job.procs[1].send_signal(signal.SIGTERM)
    second = check_stopped_together(job, job.finish(EXIT_S), after=seen)

    # 3. The next rerun: SIGTERM reaches process 1 during its start-up, before the restore, when
    #    JAX's service settles on a stop step from steps the loop never asks about. Both stop
    #    after the resumed run's first step all the same.
    job = Job(stopped, "--hold_start_up")
    job.hold_in_start_up_and_signal(1)
    third = check_stopped_together(job, job.finish(LAUNCH_S), after=second)
    assert third == second + 1
    (stopped / "go").unlink()

    # 4. The last rerun goes to the end; the four pieces trained exactly like one run.
    assert [r["step"] for r in Job(stopped).finish(LAUNCH_S)] == [STEPS, STEPS]
    assert saved_steps(stopped)[-2:] == [third, STEPS]
    expected, got = read_losses(straight), read_losses(stopped)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(
        [got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)]
    )
