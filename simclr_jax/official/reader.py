"""Find and read an official checkpoint with TensorFlow (the `[tfds]` extra), imported only here.

Paths go through TensorFlow's file system, so `gs://simclr-checkpoints/...` works where the user
has Google Cloud credentials (not tested here: no network).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from etils import epath

from simclr_jax.official.parse import ConversionError

KINDS = ("auto", "tf1", "tf2")
_STEP = re.compile(r"\.ckpt-(\d+)$")
_DATA_FILE = re.compile(r"\.data-\d+-of-\d+$")
TF2_KEY_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def tensorflow() -> Any:
    """The tensorflow module, or an error saying which extra installs it."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "reading TensorFlow checkpoints needs TensorFlow: pip install 'simclr_jax[tfds]' "
            "(or tensorflow-cpu)"
        ) from error
    return tf


def locate(path: str) -> tuple[str, str | None]:
    """(checkpoint prefix, 'tf2' for a SavedModel / None when the keys must tell) for `path`.

    `path` may be a `model.ckpt-N` prefix (or one of its files), a folder holding one (its
    `checkpoint` state file, else the highest N), a SavedModel folder or its `variables` folder.
    Looked up with etils.epath, so a wrong path fails before TensorFlow is imported.
    """
    if not path:
        raise ConversionError("--checkpoint is empty: name a model.ckpt-N prefix or a folder")
    path = _DATA_FILE.sub("", path.rstrip("/")).removesuffix(".index")
    if epath.Path(path + ".index").exists():
        return path, "tf2" if path.endswith("variables/variables") else None
    folder = epath.Path(path)
    if folder.is_dir():
        for prefix in (folder / "variables" / "variables", folder / "variables"):
            if epath.Path(f"{prefix}.index").exists():
                return str(prefix), "tf2"
        if (folder / "checkpoint").exists():
            latest = tensorflow().train.latest_checkpoint(path)
            if latest and epath.Path(latest + ".index").exists():
                return latest, None
        prefixes = [p.name.removesuffix(".index") for p in folder.glob("*.index")]
        if prefixes:
            best = max(prefixes, key=lambda p: int(m[1]) if (m := _STEP.search(p)) else -1)
            return str(folder / best), None
        raise ConversionError(
            f"{path} holds no TensorFlow checkpoint (no model.ckpt-N.index, no SavedModel "
            "variables/)"
        )
    raise ConversionError(
        f"{path} is not a TensorFlow checkpoint: neither a model.ckpt-N prefix (with its .index "
        "file) nor a folder holding one or a SavedModel"
    )


class Reader:
    """Names, shapes and values of one checkpoint (tf.train.load_checkpoint)."""

    def __init__(self, checkpoint: str, kind: str = "auto"):
        if kind not in KINDS:
            raise ConversionError(f"--kind must be one of {KINDS}, got {kind!r}")
        self.prefix, found_kind = locate(checkpoint)
        tf = tensorflow()
        try:
            self._reader = tf.train.load_checkpoint(self.prefix)
        except (tf.errors.OpError, ValueError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise ConversionError(f"{self.prefix}: unreadable checkpoint ({message})") from None
        self.shapes = {k: tuple(v) for k, v in self._reader.get_variable_to_shape_map().items()}
        self._dtypes = self._reader.get_variable_to_dtype_map()
        if found_kind is None:
            tf2_keys = any(key.endswith(TF2_KEY_SUFFIX) for key in self.shapes)
            found_kind = "tf2" if tf2_keys else "tf1"
        if kind != "auto" and kind != found_kind:
            raise ConversionError(f"--kind={kind}, but {self.prefix} is a {found_kind} checkpoint")
        self.kind = found_kind

    def float32(self, key: str) -> np.ndarray:
        """A model variable as float32 (the released models store float32)."""
        if not self._dtypes[key].is_floating:
            raise ConversionError(f"{key}: dtype {self._dtypes[key].name}, a float is expected")
        return np.asarray(self._reader.get_tensor(key), np.float32)

    def step(self, key: str | None) -> int:
        """The training step stored under `key` (global_step), else the N of model.ckpt-N, else 0."""
        if key is not None:
            return int(self._reader.get_tensor(key))
        match = _STEP.search(self.prefix)
        return int(match[1]) if match else 0
