"""Checkpoint round trips, retention, resume, weights-only restore and the mismatch error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging
from devices import xla_flags

from simclr_jax import exception_chain
from simclr_jax.train import checkpoint
from simclr_jax.train.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    restore_weights,
)
from simclr_jax.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TX = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))


def make_variables(seed: int = 0, width: int = 4, extra_layer: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        "backbone": {"stem": {"kernel": rng.normal(size=(3, 3, 1, width))}},
        "head": {"dense_0": {"kernel": rng.normal(size=(width, 2))}},
        "classifier": {"kernel": rng.normal(size=(width, 3)), "bias": rng.normal(size=(3,))},
    }
    if extra_layer:
        params["backbone"]["block_group1"] = {"kernel": rng.normal(size=(width, width))}
    batch_stats = {"backbone": {"bn": {"mean": rng.normal(size=(width,))}}}
    to_jnp = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
    return {"params": to_jnp(params), "batch_stats": to_jnp(batch_stats)}


def make_state(seed: int = 0, steps: int = 1, **kwargs) -> TrainState:
    """A state whose momentum, step and parameters all differ from their initial values."""
    variables = make_variables(seed, **kwargs)
    state = TrainState.create(variables["params"], variables["batch_stats"], TX)
    for i in range(steps):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, i + seed + 1.0), state.params)
        stats = jax.tree.map(lambda s, i=i: s + i + 1.0, state.batch_stats)
        state = state.apply_gradients(grads, stats)
    return state


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_the_optimizer(tmp_path):
    state = make_state(steps=3)
    with CheckpointManager(tmp_path, keep=2, config={"seed": 7, "model": {"depth": 18}}) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, state)
        ckpt.wait()
        assert ckpt.latest_step() == 3
        restored = ckpt.restore(jax.eval_shape(lambda: make_state(seed=1)))
        assert ckpt.config() == {"seed": 7, "model": {"depth": 18}}
    assert isinstance(restored, TrainState)
    assert restored.tx is TX
    assert int(restored.step) == 3
    assert_trees_equal(restored, state)
    # The restored state trains on exactly like the original.
    grads = jax.tree.map(jnp.ones_like, state.params)
    assert_trees_equal(
        restored.apply_gradients(grads, state.batch_stats),
        state.apply_gradients(grads, state.batch_stats),
    )


def test_keeps_the_newest_n_and_resume_picks_the_newest(tmp_path):
    with CheckpointManager(tmp_path, keep=2, save_every=2) as ckpt:
        assert ckpt.save(1, make_state(seed=1))  # orbax always saves a run's first checkpoint
        assert not ckpt.save(3, make_state(seed=3))  # not a multiple of save_every
        for step in (2, 4, 6):
            assert ckpt.save(step, make_state(seed=step))
        assert ckpt.save(7, make_state(seed=7), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    with CheckpointManager(tmp_path, keep=2) as resumed:
        assert resumed.latest_step() == 7
        assert_trees_equal(resumed.restore(make_state()), make_state(seed=7))
        assert_trees_equal(resumed.restore(make_state(), step=6), make_state(seed=6))


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(tmp_path, save_every=0)
    with CheckpointManager(tmp_path) as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(make_state())


def test_weights_only_restore_ignores_step_and_optimizer(tmp_path):
    state = make_state(seed=3, steps=2)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(5, state)
    fresh = make_variables(seed=9)
    restored = restore_weights(tmp_path, jax.eval_shape(lambda: fresh))
    assert set(restored) == {"params", "batch_stats"}
    assert_trees_equal(restored, {"params": state.params, "batch_stats": state.batch_stats})
    # A target without the classifier restores the rest (the fine-tuning head stays fresh);
    # the checkpoints folder itself is accepted as well as the workdir.
    del fresh["params"]["classifier"]
    partial = restore_weights(tmp_path / "checkpoints", fresh)
    assert "classifier" not in partial["params"]
    assert_trees_equal(partial["params"]["backbone"], state.params["backbone"])


def test_another_architecture_is_a_value_error_naming_the_paths(tmp_path):
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, make_state(width=4))
        ckpt.wait()
        other = make_state(width=8, extra_layer=True)
        with pytest.raises(ValueError) as info:
            ckpt.restore(other)
    message = str(info.value)
    assert isinstance(info.value, CheckpointMismatchError)
    assert "params/backbone/block_group1/kernel" in message  # missing in the checkpoint
    assert "params/backbone/stem/kernel (checkpoint (3, 3, 1, 4), model (3, 3, 1, 8))" in message
    with pytest.raises(ValueError, match="params/backbone/block_group1/kernel"):
        restore_weights(tmp_path, make_variables(width=4, extra_layer=True))
    with pytest.raises(ValueError, match="params/head/dense_0/kernel"):
        restore_weights(tmp_path, make_variables(width=8))


def test_unreadable_newest_step_falls_back_to_the_previous(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path, keep=3) as ckpt:
        ckpt.save(1, make_state(seed=1))
        ckpt.save(2, make_state(seed=2))
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for path in sorted(state_dir.rglob("*"), reverse=True):  # leave the directory, lose the data
        path.unlink() if path.is_file() else path.rmdir()
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        assert_trees_equal(ckpt.restore(make_state()), make_state(seed=1))
    assert any("step 2" in w for w in warnings)


MULTI_DEVICE_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, {tests!r})
from test_checkpoint import make_state, assert_trees_equal
from simclr_jax.train.checkpoint import CheckpointManager, restore_weights
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ('data',))
replicated = NamedSharding(mesh, P())
state = jax.device_put(make_state(seed=4, steps=2), replicated)
with CheckpointManager({workdir!r}) as ckpt:
    ckpt.save(2, state)
    ckpt.wait()
    target = jax.eval_shape(lambda: make_state())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          target)
    restored = ckpt.restore(target)
assert_trees_equal(restored, state)
for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim), leaf.sharding
weights = restore_weights({workdir!r}, {{'params': target.params,
                                         'batch_stats': target.batch_stats}})
assert all(leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
           for leaf in jax.tree.leaves(weights))
print('OK')
"""


def test_restore_onto_a_replicated_mesh_target(tmp_path):
    script = MULTI_DEVICE_SCRIPT.format(tests=os.path.join(REPO, "tests"), workdir=str(tmp_path))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(8),
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


# ------------------------------------------------------------------ corrupt checkpoints (issue 15)


def largest_file(directory, name_filter=lambda path: True):
    found = [p for p in directory.rglob("*") if p.is_file() and name_filter(p)]
    return max(found, key=lambda p: p.stat().st_size)


def corrupt_silently(step_dir, target, seed: int = 0) -> None:
    """Writes 64 random bytes into one of the step's array data files at the first (seeded) place
    that plain orbax restores without an error but with other values: silent corruption. (Files
    that hold tensorstore's b-tree nodes carry a CRC and fail loudly; the search moves on.)"""
    import orbax.checkpoint as ocp

    expected = jax.device_get(target)
    rng = np.random.default_rng(seed)
    data_files = [
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    ]
    for data_file in sorted(data_files, key=lambda p: -p.stat().st_size):
        original = data_file.read_bytes()
        for _ in range(30):
            offset = int(rng.integers(0, max(1, len(original) - 64)))
            damaged = bytearray(original)
            damaged[offset : offset + 64] = rng.bytes(64)
            data_file.write_bytes(bytes(damaged[: len(original)]))
            try:
                restored = ocp.StandardCheckpointer().restore(
                    step_dir / "state", jax.eval_shape(lambda: target)
                )
            except Exception:  # noqa: BLE001 - a loud corruption; look for a silent one
                continue
            leaves = zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True)
            if any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves):
                return
        data_file.write_bytes(original)
    raise AssertionError("no silent corruption found")


def capture_warnings(monkeypatch) -> list[str]:
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    return warnings


def test_truncated_newest_step_is_moved_aside_and_saving_goes_on(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path, keep=3) as ckpt:
        ckpt.save(1, make_state(seed=1))
        ckpt.save(2, make_state(seed=2))
    data_file = largest_file(tmp_path / "checkpoints" / "2" / "state")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    warnings = capture_warnings(monkeypatch)
    with CheckpointManager(tmp_path, keep=3) as ckpt:
        assert_trees_equal(ckpt.restore(make_state()), make_state(seed=1))
        assert ckpt.all_steps() == [1]
        # The run redoes step 2 and saves it again: no StepAlreadyExistsError.
        assert ckpt.save(2, make_state(seed=2), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    aside = tmp_path / "corrupt_checkpoints" / "2"
    assert (aside / "state").is_dir()  # kept for inspection, not deleted
    moved = [w for w in warnings if "moved" in w]
    assert len(moved) == 1 and "step 2" in moved[0] and str(aside) in moved[0], warnings
    assert "\n" not in moved[0]
    with CheckpointManager(tmp_path) as ckpt:
        assert_trees_equal(ckpt.restore(make_state()), make_state(seed=2))


# A failed read leaves one of orbax's callbacks on its closed event loop (reported at exit).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_silent_corruption_fails_the_digest_and_falls_back(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path, keep=3) as ckpt:
        ckpt.save(1, make_state(seed=1, width=32))
        ckpt.save(2, make_state(seed=2, width=32))
    corrupt_silently(tmp_path / "checkpoints" / "2", make_state(seed=2, width=32))
    warnings = capture_warnings(monkeypatch)
    # Weights-only restore (fine-tuning from this workdir) is read-only: it skips the step.
    weights = restore_weights(tmp_path, make_variables(width=32))
    expected = make_state(seed=1, width=32)
    assert_trees_equal(weights, {"params": expected.params, "batch_stats": expected.batch_stats})
    assert (tmp_path / "checkpoints" / "2").is_dir()
    with CheckpointManager(tmp_path, keep=3) as ckpt:
        assert_trees_equal(ckpt.restore(make_state(width=32)), expected)
    assert any("step 2" in w and "digest" in w for w in warnings), warnings
    assert (tmp_path / "corrupt_checkpoints" / "2").is_dir()


def test_nonfinite_checkpoint_is_not_trusted(tmp_path, monkeypatch):
    bad = make_state(seed=2)
    bad = bad.replace(params=jax.tree.map(lambda p: p.at[0].set(jnp.nan), bad.params))
    with CheckpointManager(tmp_path, keep=3) as ckpt:
        ckpt.save(1, make_state(seed=1))
        ckpt.save(2, bad)
    warnings = capture_warnings(monkeypatch)
    with CheckpointManager(tmp_path) as ckpt:
        assert_trees_equal(ckpt.restore(make_state()), make_state(seed=1))
    assert any("NaN/inf" in w for w in warnings), warnings
    with CheckpointManager(tmp_path) as ckpt, pytest.raises(RuntimeError, match="NaN/inf"):
        ckpt.save(2, bad, force=True)
        ckpt.wait()
        ckpt.restore(make_state(), step=2)  # an explicit step is verified too, and not moved


def test_leftover_temporary_folders_are_removed(tmp_path):
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, make_state(seed=1))
    stray = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234567"  # a save cut short
    (stray / "state").mkdir(parents=True)
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, make_state(seed=2), force=True)  # orbax finishes its cleanup first
        ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_the_cause_of_a_read_error_is_its_innermost_shown_one(tmp_path):
    """A truncated JSON file (orbax's _METADATA): json raises its error `from None` over a
    StopIteration whose text is a bare number; the cause said is the JSON error, path shortened."""
    try:
        json.loads('{"step": ')
    except json.JSONDecodeError as error:
        decode_error = error
    try:
        raise OSError(f"reading {tmp_path}/4/state/_METADATA failed") from decode_error
    except OSError as error:
        outer = error
    assert checkpoint._cause(outer, tmp_path) == "Expecting value: line 1 column 10 (char 9)"
    assert exception_chain.chain(outer) == [outer, decode_error]  # the StopIteration hidden
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first  # a cycle ends the chain
    assert exception_chain.chain(first) == [first, second]
    assert checkpoint._cause(OSError(f"no {tmp_path}/4/state/d/x"), tmp_path) == "no 4/state/d/x"
