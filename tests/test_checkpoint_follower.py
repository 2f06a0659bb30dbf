"""The evaluation job's loop: each checkpoint once, while training writes them, resumable; the
steps it could not read because retention deleted them are named."""

import json
import pathlib
import re
import sys
import threading
import time

import jax
import numpy as np
import pytest

from simclr_jax.train import checkpoint_follower
from simclr_jax.train.checkpoint import CheckpointManager, restore_weights

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_checkpoint import make_state, make_variables  # noqa: E402


def value_of(state_or_weights) -> float:
    return float(np.asarray(state_or_weights["params"]["head"]["dense_0"]["kernel"]).sum())


def evaluator(workdir, calls):
    def evaluate_step(step):
        calls.append(step)
        weights = restore_weights(workdir, make_variables(), step=step)
        return {"eval_value": value_of(weights)}

    return evaluate_step


def records(workdir):
    path = workdir / "eval" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_value(step):
    state = make_state(seed=step)
    return value_of({"params": state.params})


def test_evaluates_each_step_once_while_training_writes_them(tmp_path):
    def train():
        with CheckpointManager(tmp_path, keep=10) as ckpt:
            for step in range(1, 6):
                time.sleep(0.2)
                ckpt.save(step, make_state(seed=step))
                ckpt.wait()

    trainer = threading.Thread(target=train)
    trainer.start()
    calls = []
    results = checkpoint_follower.run(
        tmp_path, evaluator(tmp_path, calls), final_step=5, poll_s=0.05
    )
    trainer.join()
    assert calls == [1, 2, 3, 4, 5]
    rows = records(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        assert row["eval_value"] == pytest.approx(expected_value(row["step"]), rel=1e-6)
    assert results == {"step": 5, "eval_value": rows[-1]["eval_value"]}
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved == results
    assert not (tmp_path / "eval" / "lock.json").exists()
    # Run again: everything is done, nothing is evaluated twice, the results come back.
    again = []
    assert (
        checkpoint_follower.run(tmp_path, evaluator(tmp_path, again), final_step=5, poll_s=0.05)
        == results
    )
    assert again == [] and len(records(tmp_path)) == 5


def test_an_interrupted_job_resumes_where_it_stopped(tmp_path):
    with CheckpointManager(tmp_path, keep=10) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, make_state(seed=step), force=True)
    calls = []
    inner = evaluator(tmp_path, calls)

    def dies_at_step_4(step):
        if step == 4:
            raise KeyboardInterrupt  # killed while evaluating step 4: nothing written for it
        return inner(step)

    with pytest.raises(KeyboardInterrupt):
        checkpoint_follower.run(tmp_path, dies_at_step_4, final_step=6, poll_s=0.01)
    checkpoint_follower.run(tmp_path, inner, final_step=6, poll_s=0.01)
    assert calls == [2, 4, 6]
    assert [row["step"] for row in records(tmp_path)] == [2, 4, 6]


# A failed read leaves one of orbax's callbacks on its closed event loop (reported at exit).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_and_corrupt_steps_are_skipped_and_a_timeout_ends_the_wait(tmp_path):
    with CheckpointManager(tmp_path, keep=10) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(seed=step), force=True)
    data = tmp_path / "checkpoints" / "2" / "state"
    files = [p for p in data.rglob("*") if p.is_file() and p.parent.name == "d"]
    for path in files:  # every array file emptied: the step cannot be read
        path.write_bytes(b"")
    start = time.monotonic()
    results = checkpoint_follower.run(
        tmp_path, evaluator(tmp_path, []), final_step=10, poll_s=0.05, timeout_s=0.5
    )
    assert time.monotonic() - start < 30
    assert [row["step"] for row in records(tmp_path)] == [1]
    assert results["step"] == 1


def test_the_eval_folder_has_its_own_lock(tmp_path):
    from simclr_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError

    (tmp_path / "eval").mkdir()
    with WorkdirLock(tmp_path):  # the training run's lock does not block the evaluator
        with WorkdirLock(tmp_path / "eval"):
            pass
    assert jax.process_count() == 1
    (tmp_path / "eval" / "lock.json").write_text(
        json.dumps({"host": "elsewhere", "pid": 7, "heartbeat": time.time()})
    )
    with pytest.raises(WorkdirLockedError, match="elsewhere"):
        checkpoint_follower.run(tmp_path, lambda step: {}, final_step=1, poll_s=0.01)


def named_as_missed(caplog) -> list[list[int]]:
    """The steps each 'not evaluated' warning names (each warning is one line)."""
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("not evaluated"):
            assert "\n" not in message and "keep_checkpoints=2" in message, message
            listed = re.search(r"checkpoint steps (.+) of ", message).group(1)
            found.append([step for part in listed.split(", ") for step in expand(part)])
    return found


def expand(part: str) -> list[int]:
    """'7' -> [7]; '10-30 every 10' -> [10, 20, 30]; '3-5' -> [3, 4, 5]."""
    span, _, every = part.partition(" every ")
    first, _, last = span.partition("-")
    return list(range(int(first), int(last or first) + 1, int(every or 1)))


def test_steps_deleted_before_the_job_first_looked_are_named(tmp_path, caplog):
    with CheckpointManager(tmp_path, keep=2) as ckpt:
        for step in range(10, 51, 10):
            ckpt.save(step, make_state(seed=step), force=True)
    calls = []
    checkpoint_follower.run(
        tmp_path, evaluator(tmp_path, calls), final_step=50, poll_s=0.01,
        checkpoint_every=10, keep=2,
    )  # fmt: skip
    assert calls == [40, 50]
    assert named_as_missed(caplog) == [[10, 20, 30]]
    assert "steps 10-30 every 10 of" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
def test_every_saved_step_is_evaluated_or_named_once(tmp_path, caplog):
    """Training saves faster than the job evaluates and keeps 2: some steps are deleted before
    their turn, some between the job's looks. Each saved step is evaluated, or named once."""
    saved = list(range(2, 25, 2))

    def train():
        with CheckpointManager(tmp_path, keep=2) as ckpt:
            for step in saved:
                ckpt.save(step, make_state(seed=step), force=True)
                ckpt.wait()
                time.sleep(0.05)

    trainer = threading.Thread(target=train)
    trainer.start()
    calls = []
    inner = evaluator(tmp_path, calls)

    def slow(step):
        time.sleep(0.2)
        return inner(step)

    checkpoint_follower.run(
        tmp_path, slow, final_step=saved[-1], poll_s=0.01, checkpoint_every=2, keep=2
    )
    trainer.join()
    evaluated = [row["step"] for row in records(tmp_path)]
    named = [step for steps in named_as_missed(caplog) for step in steps]
    assert named and evaluated[-1] == saved[-1]
    assert sorted(evaluated + named) == saved  # each step once: evaluated or named
