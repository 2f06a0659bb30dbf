"""Chaos: a tiny pretraining under a scripted sequence of kill -9 and SIGTERM at random moments
(during checkpoint saves among them) ends bit-identical to an uninterrupted run, with each step
logged once and no stray files in the workdir."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 24
# TensorFlow is blocked (as on a machine without it): metrics go to metrics.jsonl only, and each
# start saves the ~10 s TF import. The run is the pretraining command line itself.
LAUNCH = (
    "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_module('simclr_jax.pretrain', run_name='__main__', alter_sys=True)"
)
# The scripted faults: what to send, and when (after n logged steps, during a save, or after a
# random delay from the start, which may fall before training begins).
SCRIPT = [
    ("SIGKILL", "steps"),
    ("SIGKILL", "saving"),
    ("SIGTERM", "delay"),
    ("SIGTERM", "saving"),
    ("SIGKILL", "saving"),
]


def command(workdir):
    return [
        sys.executable, "-c", LAUNCH, "simclr_jax.pretrain",
        "--config=configs/pretrain_fashion_mnist.py:tiny", f"--workdir={workdir}",
        f"--config.num_steps={TOTAL}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=4", "--config.dataset.train_split=train[:512]",
        "--config.dataset.eval_split=",
        # Steps slow enough to be interrupted at a chosen one: the tiny convnet takes a batch of
        # 32 in ~5 ms, 256 in several times that.
        "--config.batch_size=256",
    ]  # fmt: skip


def records(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


def losses(workdir):
    steps = [(row["step"], row["loss"]) for row in records(workdir) if "loss" in row]
    assert len(steps) == len({step for step, _ in steps}), "a step was logged twice"
    return dict(steps)


def saving(workdir) -> bool:
    folder = workdir / "checkpoints"
    try:
        return any("tmp" in entry.name for entry in os.scandir(folder))
    except FileNotFoundError:
        return False


def interrupt(workdir, sig, when, rng):
    """Starts a run and sends `sig` at the scripted moment; returns its stderr."""
    process = subprocess.Popen(
        command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    done = max(losses(workdir), default=0)
    target = done + rng.randint(2, 6)
    delay = time.monotonic() + rng.uniform(0.5, 8.0)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if when == "saving" and saving(workdir):
            break
        if when == "steps" and max(losses(workdir), default=0) >= target:
            break
        if when == "delay" and time.monotonic() >= delay:
            break
        time.sleep(0.001 if when == "saving" else 0.02)
    assert process.poll() is None, f"the run ended before its {sig} ({when})"
    process.send_signal(getattr(signal, sig))
    _, stderr = process.communicate(timeout=120)
    return stderr


def final_state(workdir):
    directory = workdir / "checkpoints" / str(TOTAL) / "state"
    return ocp.StandardCheckpointer().restore(directory)


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}/"))
        return out
    if isinstance(tree, list | tuple):
        return flat(dict(enumerate(tree)), prefix)
    return {prefix: np.asarray(tree)}


def test_kills_and_terms_at_random_moments_end_bit_identical(tmp_path):
    straight, chaos = tmp_path / "straight", tmp_path / "chaos"
    reference = subprocess.run(
        command(straight), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    rng = random.Random(15)
    stderrs = [interrupt(chaos, sig, when, rng) for sig, when in SCRIPT]
    assert any("taking over the lock" in err for err in stderrs), [e[-600:] for e in stderrs]
    last = subprocess.run(command(chaos), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]

    expected, got = losses(straight), losses(chaos)
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1))
    np.testing.assert_array_equal([got[s] for s in expected], [expected[s] for s in expected])
    a, b = flat(final_state(straight)), flat(final_state(chaos))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)

    # Nothing stray: no lock, no temporary or set-aside folders, only committed steps.
    assert sorted(os.listdir(chaos)) == sorted(os.listdir(straight))
    assert not {"lock.json", "corrupt_checkpoints"} & set(os.listdir(chaos))
    steps = os.listdir(chaos / "checkpoints")
    assert all(name.isdigit() for name in steps), steps
    assert max(map(int, steps)) == TOTAL
