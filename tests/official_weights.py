"""The official-checkpoint fixtures' weights and inputs, rebuilt from their recipe (fixtures/
official_checkpoints/README.md): every tensor depends only on its checkpoint name and shape, so a
test can write a checkpoint of any layout there and compare its forward pass with the reference
outputs, which were computed by the official code from these same values.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "official_checkpoints"


def _normal(scale: float, offset: float = 0.0):
    return lambda rng, shape: offset + scale * rng.standard_normal(shape)


def _fan_in_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)  # N(0, 1 / fan_in)


# The last component of a variable's name -> its float64 draw (the recipe's table).
SAMPLERS = {
    "kernel": _fan_in_normal,
    "gamma": _normal(0.1, offset=1.0),
    "beta": _normal(0.1),
    "moving_mean": _normal(0.1),
    "bias": _normal(0.1),
    "moving_variance": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
}


def value(name: str, shape: Sequence[int], dtype: str | np.dtype = "float32") -> np.ndarray:
    """The tensor of checkpoint entry `name`: drawn by its leaf's rule from a generator seeded
    with the CRC-32 of the name; zeros for other leaves (optimizer slots, global_step)."""
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    sampler = SAMPLERS.get(name.rsplit("/", 1)[-1])
    if sampler is None or not np.issubdtype(dtype, np.floating):
        return np.zeros(shape, dtype)
    return sampler(np.random.default_rng(zlib.crc32(name.encode())), shape).astype(dtype)


def images(batch: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    """The reference outputs' inputs: float32 [batch, size, size, 3], uniform in [0, 1)."""
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def load_layout(name: str) -> dict:
    """layouts/<name>.json.gz: header fields and "variables" [{name, shape, dtype, ...}]."""
    with gzip.open(FIXTURES / "layouts" / f"{name.removesuffix('.json')}.json.gz", "rt") as f:
        return json.load(f)


def layout_names() -> list[str]:
    return sorted(p.name.removesuffix(".json.gz") for p in (FIXTURES / "layouts").glob("*.gz"))


def write_tf_checkpoint(
    variables: Iterable[dict], prefix: str, skip: Callable[[str], bool] | None = None
) -> str:
    """A TF1-style checkpoint (tensor bundle, as tf1's Saver writes) of value(...) for every
    layout entry not skipped, with the `checkpoint` state file beside it. Needs TensorFlow."""
    import tensorflow as tf

    entries = [v for v in variables if skip is None or not skip(v["name"])]
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=[v["name"] for v in entries],
        shape_and_slices=[""] * len(entries),
        tensors=[tf.constant(value(v["name"], v["shape"], v["dtype"])) for v in entries],
    )
    state = pathlib.Path(prefix).parent / "checkpoint"
    base = os.path.basename(prefix)
    state.write_text(f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n')
    return prefix


# A few draws as numpy made them for the reference outputs (numpy does not promise stable
# Generator streams across versions): name, shape -> (float64 sum, first value).
PINNED = {
    ("base_model/conv2d/kernel", (7, 7, 3, 64)): (-6.091341935160017, 0.09880576282739639),
    ("base_model/batch_normalization/gamma", (64,)): (63.15943622589111, 1.033193588256836),
    ("base_model/batch_normalization/moving_variance", (64,)): (
        66.92365378141403,
        0.5988225936889648,
    ),
    ("head_supervised/linear_layer/dense/bias", (1000,)): (
        1.4173867813660763,
        -0.045342810451984406,
    ),
}
PINNED_IMAGES = (12324.855540545406, 0.6369616985321045)


def check_stream() -> None:
    """Raise if this numpy draws other values than when the references were made (then the
    references no longer apply: a failure is numpy's, not the importer's)."""
    drawn = {key: value(*key) for key in PINNED} | {"images": images()}
    expected = dict(PINNED) | {"images": PINNED_IMAGES}
    for key, array in drawn.items():
        total, first = expected[key]
        if not np.isclose(array.sum(dtype=np.float64), total, rtol=0, atol=1e-6) or not np.isclose(
            float(array.reshape(-1)[0]), first, rtol=0, atol=1e-12
        ):
            raise AssertionError(f"numpy {np.__version__} draws {key} differently: see README.md")
