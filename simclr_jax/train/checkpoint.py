"""Checkpoints: orbax's CheckpointManager, plus the checks a training run needs around it.

Each step directory holds three items: 'state' (the TrainState arrays, saved asynchronously from
every process), 'config' (the resolved run config as JSON, so a checkpoint says how it was made)
and 'digest' (a SHA-256 of every array, train/verify.py). Before restoring we compare the
checkpoint's tree metadata with the target, so a checkpoint from another architecture fails with
the offending parameter paths instead of an opaque tensorstore error. After restoring, the values
must match the digest and be finite. A step that cannot be read or does not verify is moved aside
to `workdir/corrupt_checkpoints/<step>` (kept for inspection, never deleted) with one warning
line, and the next older step is tried; the run then saves that step number again as usual.
Temporary folders of saves cut short (a kill during a write) are removed when the manager opens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simclr_jax import exception_chain
from simclr_jax.train import verify

STATE = "state"
CONFIG = "config"
DIGEST = "digest"
ASIDE = "corrupt_checkpoints"  # beside `checkpoints`: where steps that fail verification go
_MAX_LISTED_PATHS = 20


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameter tree does not match the model it is restored into."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's values do not match the digest saved with them, or are not finite.

    `problem` says what is wrong without saying where (the warning that skips a step names it).
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


def absolute_path(path: epath.PathLike) -> epath.Path:
    """orbax wants absolute paths: a local one is made absolute, a bucket (gs://...) kept as is."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class CheckpointManager:
    """Saves and restores a TrainState under `workdir/checkpoints`, keeping the newest `keep`.

    `save_every` is orbax's save interval: `save(step, ...)` writes only when `step` is a
    multiple of it, when it is the run's first checkpoint, or with `force=True` (the step loop
    forces its saves, a stop's included). Saves are asynchronous; call `wait()` before reading the
    files and `close()` at the end. Every process must call `save`/`restore` (orbax coordinates).
    Only the run that holds the workdir lock may open one: opening deletes unfinished
    (`*.orbax-checkpoint-tmp`) steps, which in a live run are its save in progress. Anything else
    reads through `read_only_manager`.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        *,
        keep: int = 3,
        save_every: int = 1,
        config: Any = None,
        async_save: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1 (steps between saves), got {save_every}")
        # orbax wants absolute paths; a relative workdir is relative to where the run started.
        self.directory = absolute_path(workdir) / "checkpoints"
        self._config = None if config is None else config_to_json_dict(config)
        self._manager = _LoopDecidesStops(
            self.directory,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
                DIGEST: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=save_every,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is no checkpoint yet."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts saving `state` at `step` (if due or forced); returns whether a save started.

        The digest is computed here, from the arrays as they are now (one host copy): the step
        that follows may donate their buffers.
        """
        if not force and not self._manager.should_save(int(step)):
            return False
        items = {
            STATE: ocp.args.StandardSave(state),
            DIGEST: ocp.args.JsonSave(verify.tree_digest(state)),
        }
        if self._config is not None:
            items[CONFIG] = ocp.args.JsonSave(self._config)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The state saved at `step` (default: newest readable), laid out like `target`.

        `target` is a state of arrays or of `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`);
        restored arrays take its shardings and dtypes, so a mesh-replicated target gives
        mesh-replicated arrays. Static fields (the optimizer) come from `target`. Without `step`,
        steps that cannot be read or fail verification are moved aside (see the module doc); an
        explicit `step` that fails raises CorruptCheckpointError and stays where it is.
        """
        abstract = abstract_tree(target)

        def restore_step(manager: ocp.CheckpointManager, at: int) -> Any:
            where = f"step {at} in {manager.directory}"
            check_compatible(_saved_tree(manager, at), abstract, where=where)
            args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)})
            return _verified(manager, at, manager.restore(at, args=args)[STATE])

        return _restore_with_fallback(self._manager, step, restore_step, self._set_aside)

    def _set_aside(self, step: int) -> epath.Path:
        """Moves step `step` to workdir/corrupt_checkpoints (process 0; all wait), then reloads."""
        source = self.directory / str(step)
        aside = self.directory.parent / ASIDE / str(step)
        copies = 0
        while aside.exists():
            copies += 1
            aside = self.directory.parent / ASIDE / f"{step}-{copies}"
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            source.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"simclr_jax set aside checkpoint {step}")
        self._manager.reload()
        return aside

    def config(self, step: int | None = None) -> dict | None:
        """The run config saved with `step` (default newest), or None if none was saved."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / CONFIG).exists():
            return None
        args = ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[CONFIG]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _LoopDecidesStops(ocp.CheckpointManager):
    """orbax's manager without its own look at JAX's preemption service: the step loop decides
    when a stop saves (train/preemption.py), and orbax's finalize thread would report the saved
    (older) step to the service, which picks its stop step from the steps reported last."""

    def reached_preemption(self, step: int) -> bool:
        return False


def restore_weights(
    workdir: epath.PathLike, target: Mapping[str, Any], *, step: int | None = None
) -> dict[str, Any]:
    """Only the model variables (e.g. {'params', 'batch_stats'}) from a pretraining checkpoint.

    For fine-tuning: step and optimizer state are not read. `workdir` is the pretraining workdir
    (or its `checkpoints` folder). Every leaf of `target` must exist in the checkpoint with the
    same shape; checkpoint entries that `target` lacks are ignored, so leave out a subtree (say
    'classifier') to keep it freshly initialised and merge it back yourself.
    """
    directory = absolute_path(workdir)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    abstract = abstract_tree(dict(target))
    manager = read_only_manager(directory)

    def restore_step(manager: ocp.CheckpointManager, at: int) -> Any:
        check_compatible(
            _saved_tree(manager, at), abstract, where=f"step {at} of {directory}", partial=True
        )
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        args = ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True
        )
        restored = manager.restore(at, args=ocp.args.Composite(**{STATE: args}))[STATE]
        return _verified(manager, at, restored)

    try:
        return _restore_with_fallback(manager, step, restore_step)
    finally:
        manager.close()


def read_only_manager(directory: epath.PathLike) -> ocp.CheckpointManager:
    """An orbax manager that only reads `directory` (a workdir's checkpoints folder).

    Every item a step holds has its handler, and the options are the ones read-only implies, so
    orbax has nothing to warn about on each read (it would, per item and option, otherwise).
    """
    return ocp.CheckpointManager(
        directory,
        item_handlers={
            STATE: ocp.PyTreeCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
            DIGEST: ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    )


def abstract_tree(tree: Any) -> Any:
    """`tree` with every array replaced by a ShapeDtypeStruct that keeps its sharding."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def config_to_json_dict(config: Any) -> dict:
    """A JSON-safe dict of a ConfigDict (or mapping); values JSON cannot hold become strings."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def check_compatible(saved: Any, target: Any, *, where: str = "", partial: bool = False) -> None:
    """Raises CheckpointMismatchError naming paths missing, unexpected or of another shape.

    `saved` is the checkpoint's metadata tree (leaves with `.shape`), `target` the tree to
    restore into. With `partial`, checkpoint entries absent from the target are fine.
    """
    saved_shapes = flat_shapes(saved)
    target_shapes = flat_shapes(target)
    if partial:
        saved_shapes = _restrict_to_prefixes(saved_shapes, target_shapes)
    missing = sorted(target_shapes.keys() - saved_shapes.keys(), key=_model_first)
    unexpected = saved_shapes.keys() - target_shapes.keys() if not partial else set()
    unexpected = sorted(unexpected, key=_model_first)
    reshaped = [
        f"{path} (checkpoint {saved_shapes[path]}, model {target_shapes[path]})"
        for path in sorted(saved_shapes.keys() & target_shapes.keys(), key=_model_first)
        if saved_shapes[path] != target_shapes[path]
    ]
    if not (missing or unexpected or reshaped):
        return
    lines = [f"checkpoint {where} does not match the model (another architecture or config?)"]
    for title, paths in (
        ("missing in the checkpoint", missing),
        ("in the checkpoint but not in the model", unexpected),
        ("shape differs", reshaped),
    ):
        if paths:
            lines.append(f"  {title} ({len(paths)}):")
            lines += [f"    {p}" for p in paths[:_MAX_LISTED_PATHS]]
            if len(paths) > _MAX_LISTED_PATHS:
                lines.append(f"    ... and {len(paths) - _MAX_LISTED_PATHS} more")
    raise CheckpointMismatchError("\n".join(lines))


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/backbone/stem/conv/kernel': shape, ...} for arrays, abstract arrays or metadata.

    Paths use plain key names, so a TrainState's attribute keys and the checkpoint's dict keys
    (and tuple indices vs list indices) compare equal.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", np.shape(leaf)))
        for path, leaf in flat
    }


def _model_first(path: str) -> tuple[int, str]:
    """Sort key listing params, then batch_stats, then the rest (optimizer state mirrors params)."""
    order = {"params": 0, "batch_stats": 1}
    return order.get(path.split("/")[0], 2), path


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _restrict_to_prefixes(saved: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """Keeps the saved paths under the target's top-level keys (e.g. 'params/', 'batch_stats/')."""
    roots = {path.split("/")[0] for path in target}
    return {path: shape for path, shape in saved.items() if path.split("/")[0] in roots}


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
    metadata = manager.item_metadata(step)[STATE]
    if metadata is None:
        raise FileNotFoundError(f"no readable {STATE!r} item at step {step}")
    return getattr(metadata, "tree", metadata)


def _verified(manager: ocp.CheckpointManager, step: int, restored: Any) -> Any:
    """`restored` if it matches the step's digest and is finite; else CorruptCheckpointError."""
    digest = None
    if (manager.directory / str(step) / DIGEST).exists():
        args = ocp.args.Composite(**{DIGEST: ocp.args.JsonRestore()})
        digest = manager.restore(step, args=args)[DIGEST]
    problem = verify.problems(restored, digest)
    if problem:
        where = f"checkpoint step {step} in {manager.directory}"
        raise CorruptCheckpointError(f"{where}: {problem}", problem)
    return restored


def _all_processes_agree(ok: bool) -> bool:
    """True only if `ok` on every process, so all of them take the same branch."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _cause(error: BaseException | None, directory: epath.Path, limit: int = 300) -> str:
    """Why a step could not be used, in one line: our own finding, or the innermost cause of a read
    error (TensorStore's outer error holds a many-line repr of the store), paths in `directory`
    shortened to their step folder."""
    if error is None:
        return "unreadable or unverified on another process"
    if isinstance(error, CorruptCheckpointError):
        text = error.problem
    else:
        error = exception_chain.root_cause(error)
        text = str(error) or type(error).__name__
    text = " ".join(text.replace(f"{directory}/", "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _restore_with_fallback(
    manager: ocp.CheckpointManager,
    step: int | None,
    restore_step: Callable[[ocp.CheckpointManager, int], Any],
    set_aside: Callable[[int], epath.Path] | None = None,
) -> Any:
    """Restores `step`, or the newest step that reads and verifies.

    Each step skipped gets one warning line; with `set_aside` (a run's own workdir) it is also
    moved out of the way, so the run can save that step number again. A weights-only reader
    of another run's workdir passes none and leaves the files alone.
    """
    if step is not None:
        try:
            return restore_step(manager, step)
        except (CheckpointMismatchError, CorruptCheckpointError):
            raise
        except Exception as error:  # noqa: BLE001 - a read error: say which step, keep the cause
            where = f"checkpoint step {step} in {manager.directory}"
            problem = f"unreadable ({_cause(error, manager.directory)})"
            raise CorruptCheckpointError(f"{where} is {problem}", problem) from error
    steps: Iterable[int] = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {manager.directory}")
    first_error = None
    for at in steps:
        try:
            restored, error = restore_step(manager, at), None
        except CheckpointMismatchError:
            raise
        except Exception as caught:  # noqa: BLE001 - any unreadable step is skipped, then reported
            restored, error = None, caught
        if _all_processes_agree(error is None):
            return restored
        first_error = first_error or error
        if set_aside is None:
            logging.warning(
                "checkpoint step %d is unreadable or corrupt (%s); trying an older one",
                at,
                _cause(error, manager.directory),
            )
        else:
            aside = set_aside(at)
            logging.warning(
                "checkpoint step %d is unreadable or corrupt (%s); moved to %s; trying an older one",
                at,
                _cause(error, manager.directory),
                aside,
            )
    raise RuntimeError(
        f"no checkpoint in {manager.directory} reads and verifies"
        + (f" (the bad ones were moved to {manager.directory.parent / ASIDE})" if set_aside else "")
    ) from first_error
