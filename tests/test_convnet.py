"""The CPU-shaped convnet backbone (models/convnet.py): shapes, parameters, a layer-by-layer
reference forward pass, freezing, validation, and splitting the CPU into devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.configs import base as base_config
from simclr_jax.models import build_model, frozen_mask, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convnet_config(**fields):
    c = base_config.model_config()
    c.backbone = "convnet"
    c.depth = 4
    c.base_width = 4
    c.num_proj_layers = 2
    c.proj_out_dim = 8
    for name, value in fields.items():
        c[name] = value
    return c


@pytest.fixture(scope="module")
def small():
    model = build_model(convnet_config(), num_classes=10, image_size=28)
    variables = init_variables(model, seed=0, image_size=28, channels=1)
    return model, variables


def test_stage_shapes_and_features(small):
    model, variables = small
    out = model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False)
    assert out["stem"].shape == (2, 14, 14, 4)
    assert out["block_group1"].shape == (2, 7, 7, 8)
    assert out["block_group2"].shape == (2, 7, 7, 16)
    assert out["block_group3"].shape == (2, 7, 7, 16)
    assert out["block_group4"].shape == (2, 4, 4, 64)  # 7x7 padded to 8x8, pooled 2x2
    assert out["features"].shape == (2, 64)  # 16 x base width
    assert out["logits"].shape == (2, 10)


def test_depth_adds_convs_to_block_group3_and_32px_works():
    model = build_model(convnet_config(depth=6), num_classes=10, image_size=32)
    variables = init_variables(model, seed=0, image_size=32, channels=3)
    group3 = variables["params"]["backbone"]["block_group3"]
    assert sorted(k for k in group3 if k.startswith("conv")) == ["conv1", "conv2", "conv3"]
    out = model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False)
    assert out["block_group3"].shape == (1, 8, 8, 16)
    assert out["block_group4"].shape == (1, 4, 4, 64)


def test_parameter_count(small):
    _, variables = small
    c = 4
    kernels = 9 * 1 * c + 9 * c * 2 * c + 9 * 2 * c * 4 * c + 9 * 4 * c * 4 * c + 4 * c * 16 * c
    bn = 2 * (c + 2 * c + 4 * c + 4 * c + 16 * c)  # scale and bias after every conv
    backbone = variables["params"]["backbone"]
    assert sum(x.size for x in jax.tree.leaves(backbone)) == kernels + bn


def _reference_forward(params, stats, images, eps=1e-5):
    """Layer by layer with lax's convolution and the BatchNorm formula (inference mode)."""

    def conv_bn_relu(x, stage, k, stride):
        kernel = params[stage][f"conv{k}"]["kernel"]
        pad = (kernel.shape[0] - 1) // 2
        pads = ((pad, kernel.shape[0] - 1 - pad),) * 2
        y = jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        bn, moments = params[stage][f"bn{k}"], stats[stage][f"bn{k}"]
        y = (y - moments["mean"]) / np.sqrt(moments["var"] + eps) * bn["scale"] + bn["bias"]
        return np.maximum(y, 0.0)

    x = conv_bn_relu(images, "stem", 1, 2)
    x = conv_bn_relu(x, "block_group1", 1, 2)
    x = conv_bn_relu(x, "block_group2", 1, 1)
    x = conv_bn_relu(x, "block_group3", 1, 1)
    x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    b, h, w, ch = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, ch).mean(axis=(2, 4))
    x = conv_bn_relu(x, "block_group4", 1, 1)
    return x.mean(axis=(1, 2))


def test_forward_equals_a_layer_by_layer_reference(small):
    model, variables = small
    rng = np.random.default_rng(0)
    # Non-trivial BatchNorm statistics and affine parameters, so every term of the formula counts.
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape), variables["params"])
    stats = jax.tree.map(lambda x: np.abs(x + 0.2 * rng.standard_normal(x.shape)) + 0.1,
                         variables["batch_stats"])  # fmt: skip
    images = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    ours = model.apply({"params": params, "batch_stats": stats}, images, train=False)["features"]
    expected = _reference_forward(params["backbone"], stats["backbone"], images)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_pointwise_conv_equals_lax_conv_values_and_gradients():
    """The 1x1 layer is a matrix product (XLA:CPU's 1x1 weight gradient is slow): its output and
    both gradients must equal jax.grad of lax.conv_general_dilated."""
    from simclr_jax.models.convnet import _PointwiseConv

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 6, 5)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((3, 4, 4, 5)), jnp.float32)
    init = jax.nn.initializers.lecun_normal()
    layer = _PointwiseConv(5, (1, 1), 1, "SAME", False, init, jnp.float32, jnp.float32)

    def ours(x, kernel):
        return jnp.sum(layer.apply({"params": {"kernel": kernel}}, x) * cotangent)

    def reference(x, kernel):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y * cotangent)

    np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-5)
    ours_grads, lax_grads = (
        jax.grad(ours, (0, 1))(x, kernel),
        jax.grad(reference, (0, 1))(x, kernel),
    )
    for got, want in zip(ours_grads, lax_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Its parameter is nn.Conv's, so checkpoints of either load into the other.
    shape = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))
    assert shape["params"]["kernel"].shape == (1, 1, 6, 5)


def test_frozen_stages_get_no_gradient_and_keep_their_statistics():
    model = build_model(convnet_config(fine_tune_after_block=2), num_classes=10, image_size=28)
    variables = init_variables(model, seed=0, image_size=28, channels=1)
    images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))

    def loss(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out["features"] ** 2), updates["batch_stats"]

    grads, new_stats = jax.grad(loss, has_aux=True)(variables["params"])
    frozen = frozen_mask(grads, 2)["backbone"]  # the loss reads the features, not the head
    for is_frozen, grad in zip(
        jax.tree.leaves(frozen), jax.tree.leaves(grads["backbone"]), strict=True
    ):
        assert (np.abs(grad).max() == 0) == is_frozen
    for stage in ("stem", "block_group1", "block_group2"):
        old, new = variables["batch_stats"]["backbone"][stage], new_stats["backbone"][stage]
        jax.tree.map(np.testing.assert_array_equal, old, new)
    before = variables["batch_stats"]["backbone"]["block_group3"]["bn1"]["mean"]
    assert not np.array_equal(new_stats["backbone"]["block_group3"]["bn1"]["mean"], before)


@pytest.mark.parametrize(
    "fields, image_size, message",
    [
        (dict(depth=3), 28, "model.depth must be the number of 3x3 convs"),
        (dict(sk_ratio=0.0625), 28, "model.sk_ratio must be 0 with backbone='convnet'"),
        (dict(backbone="vgg"), 28, "model.backbone must be one of"),
        ({}, 6, "image_size must be an integer >= 8 (the total stride of the convnet)"),
    ],
)
def test_bad_values_are_named(fields, image_size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(convnet_config(**fields), num_classes=10, image_size=image_size)


def test_the_cpu_splits_into_devices_only_before_jax_starts():
    code = (
        "from simclr_jax import parallel\n"
        "assert parallel.use_cpu_devices(3) == 3\n"
        "import jax\n"
        "assert jax.device_count() == 3, jax.devices()\n"
        "try:\n"
        "    parallel.use_cpu_devices(2)\n"
        "except RuntimeError as error:\n"
        "    assert 'already initialised' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no error after JAX started')\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
