"""Checkpoint integrity: a digest of every saved array, checked against what a restore returns.

orbax commits a step atomically, but nothing tells it that the bytes it reads back are the bytes
it wrote: a bit flip or a stray write inside a data file restores without an error as NaNs or
values like 2e38. So each checkpoint carries a SHA-256 of every array as it was in memory at save
time, and a restored state must match it (and be finite) before a run trusts it. Hashing the
values rather than orbax's files keeps the check independent of the storage format and lets a
partial restore (weights only) verify just the leaves it read.

Every process computes the same digest: parameters and optimizer state are replicated, so each
host holds whole copies. A leaf that is neither fully addressable nor replicated (a truly sharded
array) has no whole copy on one host; it is recorded as unverified rather than hashed.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

ALGORITHM = "sha256"
_MAX_NAMED = 3


def path_name(path: tuple[Any, ...]) -> str:
    """'params/backbone/stem/conv1/kernel' from a jax key path (attribute, dict or index keys)."""

    def name(key: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return "/".join(name(key) for key in path)


def host_leaves(tree: Any) -> dict[str, np.ndarray | None]:
    """{path: whole host copy} of every array leaf; None where no whole copy is on this host.

    Addressable arrays come over in one batched device-to-host transfer.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names, values = [], []
    for path, leaf in flat:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            if not leaf.is_fully_addressable:
                leaf = leaf.addressable_data(0) if leaf.is_fully_replicated else None
        names.append(path_name(path))
        values.append(leaf)
    copied = jax.device_get([v for v in values if v is not None])
    copies = iter(copied)
    return {
        n: None if v is None else np.asarray(next(copies))
        for n, v in zip(names, values, strict=True)
    }


def _hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def tree_digest(tree: Any) -> dict[str, Any]:
    """The JSON-ready digest saved with a checkpoint: {algorithm, leaves: {path: entry}}.

    An entry is {'sha256': hex, 'dtype', 'shape'}, or {'unverified': true} for a leaf that has
    no whole copy on this host.
    """
    leaves = {}
    for name, array in host_leaves(tree).items():
        if array is None:
            leaves[name] = {"unverified": True}
        else:
            leaves[name] = {
                ALGORITHM: _hash(array),
                "dtype": str(array.dtype),
                "shape": list(array.shape),
            }
    return {"algorithm": ALGORITHM, "leaves": leaves}


def problems(tree: Any, digest: dict[str, Any] | None) -> str | None:
    """Why a restored `tree` cannot be trusted (None when it can): digest mismatch or NaN/inf.

    Only `tree`'s leaves are checked, so a weights-only restore verifies what it read. Leaves
    restored into another dtype than they were saved in cannot be compared byte for byte and
    are checked for finiteness only. `digest` None (a checkpoint from before digests) means
    the finiteness check alone.
    """
    saved = (digest or {}).get("leaves", {})
    changed, nonfinite, missing = [], [], []
    for name, array in host_leaves(tree).items():
        if array is None:
            continue
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
            if not np.isfinite(np.asarray(array, np.float32)).all():
                nonfinite.append(name)
        if digest is None:
            continue
        entry = saved.get(name)
        if entry is None:
            missing.append(name)
        elif ALGORITHM in entry and entry.get("dtype") == str(array.dtype):
            if entry[ALGORITHM] != _hash(array):
                changed.append(name)
    reasons = []
    for what, names in (
        ("differs from its saved digest", changed),
        ("holds NaN/inf", nonfinite),
        ("has no saved digest", missing),
    ):
        if names:
            listed = ", ".join(names[:_MAX_NAMED])
            more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
            reasons.append(f"{listed}{more} {what}")
    return "; ".join(reasons) or None
