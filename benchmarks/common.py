"""Shared pieces of the benchmarks: the benchmark config, the three step variants, timing, XLA costs.

Every variant runs the library's own pretraining step (`pretrain.make_train_step` mapped with
`parallel.DataParallel`, state donated, as `pretrain.train_and_evaluate` does) except 'views', which
feeds two ready-made float views to the same model, loss and optimizer so the model's share of the
step can be told apart from the augmentation's.

Timings are taken round-robin over the variants (a few steps of each in turn) so that, on a shared
machine whose load changes during the run, every variant sees the same conditions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import parallel, pretrain
from simclr_jax.configs import base as base_config
from simclr_jax.data import augment
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.optim import warmup_cosine_schedule
from simclr_jax.train import runner
from simclr_jax.train.state import TrainState

NUM_CLASSES = 10
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / ".jax_cache"  # the tests' cache too
DATA_VARIANTS = ("device", "host", "views")

# Model and input of each preset; any field can be overridden on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a 2-core CPU: the smoke test and the CPU tables.
    "tiny": dict(
        depth=18, width=1, sk_ratio=0.0, base_width=4, image_size=32, batch=32,
        dtype="float32", proj_out_dim=16, num_proj_layers=2, warmup=2, steps=12,
    ),
    # CIFAR-10 reference model: one epoch of 50,000 images in <= 2 s on one GPU is the goal.
    "r18_cifar": dict(
        depth=18, width=1, sk_ratio=0.0, base_width=64, image_size=32, batch=512,
        dtype="bfloat16", proj_out_dim=128, num_proj_layers=2, warmup=5, steps=30,
    ),
    # ImageNet ResNet-50: >= 3,500 images/s on one H100 is the goal.
    "r50": dict(
        depth=50, width=1, sk_ratio=0.0, base_width=64, image_size=224, batch=256,
        dtype="bfloat16", proj_out_dim=128, num_proj_layers=2, warmup=5, steps=30,
    ),
}  # fmt: skip


def enable_compilation_cache(cache_dir: str) -> None:
    """JAX's persistent compilation cache (compile times then show cache loads on reruns)."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def bench_config(
    *,
    depth: int,
    width: int,
    sk_ratio: float,
    base_width: int,
    image_size: int,
    global_batch: int,
    dtype: str,
    proj_out_dim: int = 128,
    num_proj_layers: int = 2,
) -> ml_collections.ConfigDict:
    """A pretraining config as the presets in configs/ set it (CIFAR recipe at <= 32 px,
    else ImageNet's: colour strength 1.0 and blur)."""
    c = base_config.pretrain_config()
    c.dataset.image_size = image_size
    small = image_size <= 32
    c.augment.color_jitter_strength = 0.5 if small else 1.0
    c.augment.use_blur = not small
    c.model.depth = depth
    c.model.width_multiplier = width
    c.model.sk_ratio = sk_ratio
    c.model.base_width = base_width
    c.model.proj_out_dim = proj_out_dim
    c.model.num_proj_layers = num_proj_layers
    c.batch_size = global_batch
    c.dtype = dtype
    c.num_steps = 10_000
    c.optim.warmup_epochs = 0.0
    return c


def build(config: ml_collections.ConfigDict, mesh, *, channels: int = 3):
    """(model, replicated initial state, DataParallel) from the trainer's own setup
    (pretrain.make_model, pretrain.init_state)."""
    dp = parallel.DataParallel(mesh)
    parallel.check_divisible("batch_size", config.batch_size, mesh)
    model = pretrain.make_model(config, NUM_CLASSES)
    schedule = warmup_cosine_schedule(0.1, total_steps=config.num_steps, warmup_steps=100)
    state = pretrain.init_state(model, config, channels, schedule)
    return model, dp.replicate(state), dp


def make_views_train_step(model, config: ml_collections.ConfigDict):
    """The per-replica pretraining step on ready-made views (batch: 'view_a', 'view_b', 'label'):
    pretrain.make_train_step minus the augmentation (same gradients, update and guard)."""
    view_gradients = pretrain.make_view_gradient_fn(model, config)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        grads, aux, batch_stats = view_gradients(
            state, batch["view_a"], batch["view_b"], batch["label"]
        )
        return state.apply_gradients(grads, batch_stats), aux

    return step


def map_step(dp: parallel.DataParallel, step_fn: Callable, config) -> Callable:
    """Map a per-replica step as every run does (runner.map_step: guarded against non-finite
    updates, state replicated and donated, batch sharded)."""
    return runner.map_step(dp, step_fn, skip_nonfinite=config.nonfinite == "skip")


def synthetic_arrays(num: int, size: int, channels: int, seed: int = 0) -> ImageArrays:
    """Random uint8 images and labels (augmentation cost does not depend on the pixel values)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, (num,), dtype=np.int32)
    return ImageArrays(images, labels, NUM_CLASSES)


def augmented_views(config: ml_collections.ConfigDict, batch: dict[str, jax.Array]) -> dict:
    """The views pretrain's step makes of `batch` at step 0 (same key and example ids)."""
    aug = config.augment
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    view_a, view_b = augment.simclr_views(
        key,
        batch["image"],
        jnp.arange(batch["image"].shape[0]),
        out_size=config.dataset.image_size,
        color_strength=aug.color_jitter_strength,
        use_blur=aug.use_blur,
        crop_min_area=aug.crop_min_area,
        flip=aug.flip,
        brightness=aug.brightness,
    )
    return {"view_a": view_a, "view_b": view_b, "label": batch["label"]}


@contextlib.contextmanager
def host_batches(
    global_batch: int,
    image_size: int,
    *,
    tfds_name: str = "imagenet2012",
    data_dir: str = "",
    seed: int = 0,
) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """The host tf.data path (step_stream.StepStream, two crops per image, as for ImageNet).

    Without `data_dir` the dataset is tfds's mock (random JPEGs of 5-50 px generated in memory,
    offline): a smoke check of the path, much cheaper to decode than real ImageNet images. Give
    the prepared dataset's data_dir (`tfds build`, or `python -m simclr_jax.prepare`) to measure
    the real host cost.
    """
    from simclr_jax.data.step_stream import StepStream

    with contextlib.ExitStack() as stack:
        if not data_dir:
            import tensorflow_datasets as tfds

            stack.enter_context(
                tfds.testing.mock_data(
                    num_examples=4 * global_batch, policy=tfds.testing.MockPolicy.USE_CODE
                )
            )
        stream = StepStream(
            tfds_name, "train", global_batch=global_batch, image_size=image_size,
            data_dir=data_dir, seed=seed, num_crops=2,
        )  # fmt: skip
        yield (
            {"image": b["image"], "label": (b["label"] % NUM_CLASSES).astype(np.int32)}
            for b in stream.batches(0)
        )


@dataclasses.dataclass
class Variant:
    """One compiled step and how to feed it; `run_step(i)` runs step i and waits for it."""

    name: str
    compiled: Any  # jax.stages.Compiled
    run_step: Callable[[int], None]
    times: list[float] = dataclasses.field(default_factory=list)
    first_loss: float | None = None  # loss of the first step (from the initial state)
    compile_s: float = 0.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def make_variant(name: str, compiled, state, next_batch: Callable[[int], Any]) -> Variant:
    """Wrap a compiled (donating) step: it owns its state and threads it through the steps."""
    variant = Variant(name, compiled, run_step=lambda i: None)
    holder = {"state": state}

    def run_step(i: int) -> None:
        holder["state"], aux = compiled(holder["state"], next_batch(i))
        aux["loss"].block_until_ready()  # all outputs of one executable complete together
        if variant.first_loss is None:
            variant.first_loss = float(aux["loss"])

    variant.run_step = run_step
    return variant


def time_round_robin(variants: list[Variant], *, warmup: int, steps: int, block: int = 3) -> None:
    """Warm every variant up, then time `steps` steps of each, `block` at a time in turn."""
    for v in variants:
        for i in range(warmup):
            v.run_step(i)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for v in variants:
            for i in range(done, done + n):
                start = time.perf_counter()
                v.run_step(warmup + i)
                v.times.append(time.perf_counter() - start)
        done += n


def xla_flops(compiled) -> float:
    """FLOPs of one call of the compiled (per-device) program, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def memory_bytes(compiled) -> dict[str, int]:
    """Per-device temporary (activations, workspace) and argument sizes of the compiled program."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|bf16|f16|s32|u32|f32)\[([0-9,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in an optimised HLO module (per replica).

    For an all-reduce that is the reduced payload (a ring moves 2(N-1)/N times it per replica); for
    an all-gather the gathered result ((N-1)/N of it arrives from the other replicas).
    """
    totals: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        result_type, kind = match.group(1), match.group(2)
        size = 0
        for dtype, dims in _SHAPE.findall(result_type):
            count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            size += count * _DTYPE_BYTES[dtype]
        totals[kind] = totals.get(kind, 0) + size
    return totals


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def fmt(value: float) -> str:
    """Compact number for key=value lines (parseable by float())."""
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4g}"
    return f"{value:.4e}"
