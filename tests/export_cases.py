"""Workdirs and images for the export tests (test_export.py, test_export_torch.py).

Each case is a real workdir: an orbax checkpoint written through the project's CheckpointManager
with a saved config, as a trainer leaves it. The weights are the initialiser's, then every
parameter and BatchNorm statistic is moved by a random amount, so no BatchNorm is the identity
and no residual branch is zero (zero-initialised last gammas would hide a wrong branch).
The official cases are checkpoints made with the official-fixture generator
(tests/fixtures/official, see its README) and imported with simclr_jax.convert.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import convert
from simclr_jax.configs import base as base_config
from simclr_jax.data import fashion_mnist
from simclr_jax.export import source as source_lib
from simclr_jax.models import build_model, init_variables
from simclr_jax.train import checkpoint, metrics

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "official"

# name -> (config.model fields, image size, channels). Tiny widths keep the tests fast; r50_1x
# and the official cases below are real-width ones.
CASES = {
    "r18": (dict(depth=18, base_width=8, cifar_stem=False), 64, 3),
    "r50": (dict(depth=50, base_width=8, cifar_stem=False), 64, 3),
    "r50_sk": (dict(depth=50, base_width=8, sk_ratio=0.0625, cifar_stem=False), 64, 3),
    # odd side (33 -> max-pool of a 17 map), CIFAR stem, squeeze-excitation, a linear head
    "r18_cifar_se": (
        dict(depth=18, base_width=8, cifar_stem=True, se_ratio=0.25, proj_head_mode="linear"),
        32,
        3,
    ),
    "convnet": (dict(backbone="convnet", depth=5, base_width=8), 28, 1),
    # a plain 1x ResNet-50 (what torchvision's resnet50 holds)
    "r50_1x": (dict(depth=50, base_width=64, cifar_stem=False), 64, 3),
}
# The parity cases of test_export (and test_export_torch). A plain R18 is left out: its
# ImageNet stem is r50's and its basic blocks r18_cifar_se's, each module exported on its own.
TINY = ("r50", "r50_sk", "r18_cifar_se", "convnet")


def perturbed(model, variables, images: np.ndarray, seed: int):
    """Every parameter moved by N(0, 0.2), then the BatchNorm statistics measured on `images`
    (as training leaves them, so activations neither die nor explode) and moved by a few percent
    (so they are not exactly the batch's). The noise is NumPy's: jax.random would compile one
    program per parameter shape."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda leaf: np.asarray(leaf) + rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype),
        variables["params"],
    )
    measure = model.clone(bn_momentum=0.0)  # running statistics := this batch's
    _, updated = jax.jit(
        lambda p, b, x: measure.apply(
            {"params": p, "batch_stats": b}, x, train=True, mutable=["batch_stats"]
        )
    )(params, variables["batch_stats"], images)
    stats = jax.tree.map(
        lambda s: np.asarray(s) * rng.uniform(0.9, 1.1, s.shape).astype(s.dtype),
        updated["batch_stats"],
    )
    return {"params": params, "batch_stats": stats}


def write_workdir(root: pathlib.Path, name: str, seed: int = 0) -> pathlib.Path:
    """A pretraining workdir of CASES[name] holding one checkpoint (step 7)."""
    fields, image_size, channels = CASES[name]
    config = base_config.pretrain_config()
    config.dataset.image_size = image_size
    for field, value in fields.items():
        config.model[field] = value
    # With the online probe's input BatchNorm, as pretraining builds it (pretrain.py).
    model = build_model(
        config.model, num_classes=10, image_size=image_size, classifier_input_norm=True
    )
    variables = init_variables(model, seed=seed, image_size=image_size, channels=channels)
    calibration = np.concatenate(
        [
            real_images(image_size, channels, count=16),
            np.random.default_rng(seed).uniform(0, 1, (16, image_size, image_size, channels)),
        ]
    ).astype(np.float32)
    variables = perturbed(model, variables, calibration, seed)
    workdir = root / name
    state = {"step": np.asarray(7, np.int32), **variables}
    with checkpoint.CheckpointManager(workdir, keep=1, config=config, async_save=False) as manager:
        manager.save(7, state, force=True)
        manager.wait()
    metrics.write_config(workdir, config, is_main=True)
    return workdir


def load_generator():
    """The official fixtures' weight and image generator (numpy), its streams checked."""
    spec = importlib.util.spec_from_file_location("official_generator", FIXTURES / "generator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check_stream()
    return module


def official_workdir(root: pathlib.Path, arch: str) -> pathlib.Path:
    """A 'pretrained' official checkpoint of `arch` (r50_1x_sk0 or r50_1x_sk1, real width),
    written by the generator from its layout (Momentum slots left out) and converted."""
    gen = load_generator()
    layout = gen.load_layout(str(FIXTURES / "layouts" / f"tf1_{arch}_pretrain.json"))
    prefix = root / f"{arch}_tf" / "model.ckpt-250228"
    gen.write_tf_checkpoint(
        layout["variables"], str(prefix), skip=lambda name: name.endswith("/Momentum")
    )
    workdir = root / f"{arch}_jax"
    convert.convert(str(prefix.parent), str(workdir), stage="pretrain")
    return workdir


def official_reference(arch: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The generator's input images and the official TF1 outputs on them (our output names)."""
    stored = np.load(FIXTURES / f"reference_{arch}_outputs.npz")
    names = {"features": "final_avg_pool", "projection": "proj_head_output", "logits": "logits_sup"}
    return load_generator().images(2, 64), {ours: stored[theirs] for ours, theirs in names.items()}


def real_images(image_size: int, channels: int, count: int = 4) -> np.ndarray:
    """Fashion-MNIST test images as float32 NHWC in [0, 1], resized (bicubic) and repeated to
    `channels`."""
    images, _ = fashion_mnist.load("test")
    x = jnp.asarray(images[:count], jnp.float32) / 255.0
    if image_size != x.shape[1]:
        x = jax.image.resize(x, (count, image_size, image_size, 1), "cubic")
    return np.asarray(jnp.clip(jnp.repeat(x, channels, axis=-1), 0.0, 1.0))


TOLERANCE = 1e-4  # max |export - JAX| / max |JAX|; a correct export measures ~1e-6


def assert_close(found, expected: np.ndarray, what: str, spread: float = 1e-2) -> None:
    """An exported output (NumPy, or a torch tensor) equals the JAX one to TOLERANCE, and the
    JAX output depends on the image (a network that ignores its input would hide errors)."""
    found = found.detach().numpy() if hasattr(found, "detach") else found
    assert found.shape == expected.shape, what
    assert np.max(np.std(expected, axis=0)) > spread * np.max(np.abs(expected)), what
    difference = source_lib.relative_difference(found, expected)
    assert difference <= TOLERANCE, (what, difference)
