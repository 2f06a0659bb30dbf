"""Resuming with another config: refuse changes that alter the run unless accepted, record them.

Rerunning a workdir resumes it. If the command line changed meanwhile (another batch size, seed or
learning rate), the resumed run would silently mix two experiments. So the config saved with the
checkpoint is compared with the new one: a change to any field that alters what is trained
(data, batch, seed, schedule, optimizer, model, ...) is an error naming the fields, unless the run
is started with --accept_config_changes. Fields that only say how the run is observed or stored
(logging and checkpoint periods, evaluation, data location, parallel backend) may change freely.
Every change, accepted or free, is appended to `workdir/config_history.jsonl`.

Every field not listed as free counts as altering, so a field added later is safe by default.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

HISTORY_FILE = "config_history.jsonl"
ACCEPT_FLAG = "--accept_config_changes"

# Fields whose change leaves the trained trajectory as it was ('x.*' = everything under x).
FREE_FIELDS = (
    "log_every_steps",
    "tensorboard",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_steps",
    "eval_batch_size",
    "dataset.data_dir",
    "dataset.eval_split",
    "knn.*",  # before config.evals
    "evals.*",
    "parallel.*",
    "nonfinite",
)
_MISSING = "(absent)"


class ConfigChangedError(ValueError):
    """The new config alters the run that the workdir's checkpoint belongs to."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim.base_lr': 0.3, ...}: dotted paths of a nested mapping's leaves."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{path: (saved value, new value)} for every leaf that differs (absent on one side too)."""
    before, after = flatten(saved), flatten(new)
    return {
        path: (before.get(path, _MISSING), after.get(path, _MISSING))
        for path in sorted(before.keys() | after.keys())
        if before.get(path, _MISSING) != after.get(path, _MISSING)
    }


def is_free(path: str) -> bool:
    """True if changing `path` cannot alter what the run trains."""
    return any(
        path == field or (field.endswith(".*") and path.startswith(field[:-1]))
        for field in FREE_FIELDS
    )


def check_resume(
    workdir: epath.PathLike,
    saved: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    step: int,
    accept: bool = False,
    is_main: bool | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Compares the checkpoint's config with this run's; raises or records; returns the changes.

    `saved` and `new` are JSON dicts (checkpoint.config_to_json_dict). Every process of a job
    calls this with the same values and takes the same branch; only the main one writes.
    """
    if saved is None:
        return {}
    changes = differences(saved, new)
    if not changes:
        return {}
    altering = {path: change for path, change in changes.items() if not is_free(path)}
    history = epath.Path(workdir) / HISTORY_FILE
    if altering and not accept:
        raise ConfigChangedError(
            f"the config differs from the one {workdir} was trained with up to step {step}: "
            f"{_listed(altering)}. This changes the run; to continue with the new values on "
            f"purpose rerun with {ACCEPT_FLAG} (recorded in {history}), or give a new --workdir "
            "to start another run"
        )
    if altering:
        logging.warning(
            "resuming %s at step %d with config changes accepted by %s: %s (recorded in %s)",
            workdir, step, ACCEPT_FLAG, _listed(altering), history,
        )  # fmt: skip
    free = {path: change for path, change in changes.items() if path not in altering}
    if free:
        logging.info(
            "resuming %s at step %d with changes that leave the run as it was: %s (recorded in %s)",
            workdir, step, _listed(free), history,
        )  # fmt: skip
    if jax.process_index() == 0 if is_main is None else is_main:
        _append(history, step, sorted(altering), changes)
    return changes


def _append(history: epath.Path, step: int, accepted: list[str], changes: Mapping) -> None:
    """One JSON line more; the file is rewritten whole (object stores cannot append)."""
    record = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(),
        "resumed_at_step": int(step),
        "accepted": accepted,
        "changes": {path: list(change) for path, change in changes.items()},
    }
    text = history.read_text() if history.exists() else ""
    tmp = history.parent / f".{HISTORY_FILE}.tmp"
    tmp.write_text(text + json.dumps(record, default=str) + "\n")
    tmp.replace(history)


def _listed(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{path} {old!r} -> {new!r}" for path, (old, new) in changes.items())


def read_history(workdir: epath.PathLike) -> list[dict[str, Any]]:
    """The recorded changes of a workdir, oldest first ([] if none)."""
    path = epath.Path(workdir) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
