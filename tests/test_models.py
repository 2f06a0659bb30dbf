"""Tests for simclr_jax.models.

Shapes and parameter trees of every variant (via eval_shape), parameter counts against torchvision
and the SimCLRv2 paper, NumPy references for the projection head and the selective-kernel conv,
freezing under a real optimizer step, validation errors and the model card CLI.

Big models are never allocated: jax.eval_shape traces them. The few real runs use a tiny ResNet-18
and an 'unsafe_rbg' key, whose initialisers compile several times faster on CPU than threefry's.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from simclr_jax.models import (
    STAGE_NAMES,
    ProjectionHead,
    SimCLRModel,
    build_model,
    frozen_mask,
)
from simclr_jax.models.card import STANDARD_VARIANTS, count, describe_variant
from simclr_jax.models.resnet import (
    SelectiveKernelConv,
    conv_kernel_init,
    fixed_padding,
    projection_shortcut,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SK = 0.0625
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}  # fmt: skip


def fast_key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed, impl="unsafe_rbg")


def fast_jit(fun, **kwargs):
    """jax.jit with less LLVM optimisation: these tests compile far more than they compute."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


@functools.cache
def abstract(depth: int, width: int, sk_ratio: float, image_size: int = 224, cifar: bool = False):
    """(outputs, variables) of init as ShapeDtypeStructs: nothing allocated."""
    model = SimCLRModel(
        depth=depth, width_multiplier=width, sk_ratio=sk_ratio, cifar_stem=cifar, num_classes=1000
    )
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), images
    )


# ----------------------------------------------------------------------------------- shapes, trees


VARIANTS = [(d, 1, sk) for d in BLOCKS for sk in (0.0, SK)] + [
    (v.depth, v.width_multiplier, v.sk_ratio)
    for v in STANDARD_VARIANTS.values()
    if v.width_multiplier > 1
]


@pytest.mark.parametrize("depth,width,sk_ratio", VARIANTS)
def test_variant_output_shapes_and_param_tree(depth, width, sk_ratio):
    outputs, variables = abstract(depth, width, sk_ratio)
    params = variables["params"]
    expansion = 4 if depth >= 50 else 1
    base = 64 * width
    assert outputs["stem"].shape == (2, 56, 56, base)
    for g, side in enumerate((56, 28, 14, 7)):
        channels = base * 2**g * expansion
        assert outputs[f"block_group{g + 1}"].shape == (2, side, side, channels)
    assert outputs["features"].shape == (2, base * 8 * expansion)
    assert outputs["features"].dtype == jnp.float32
    assert outputs["head_3"].shape == outputs["projection"].shape == (2, 128)
    assert outputs["logits"].shape == (2, 1000)

    assert set(params) == {"backbone", "head", "classifier"}
    assert set(params["backbone"]) == set(STAGE_NAMES)
    assert set(variables["batch_stats"]) == {"backbone", "head"}
    stem = params["backbone"]["stem"]
    if sk_ratio > 0:  # ResNet-D stem: 3x3/2 to half width, 3x3 to half, 3x3 to full width.
        assert stem["conv1"]["kernel"].shape == (3, 3, 3, base // 2)
        assert stem["conv2"]["kernel"].shape == (3, 3, base // 2, base // 2)
        assert stem["conv3"]["kernel"].shape == (3, 3, base // 2, base)
    else:
        assert stem["conv1"]["kernel"].shape == (7, 7, 3, base)
        assert "conv2" not in stem
    for g, num_blocks in enumerate(BLOCKS[depth]):
        group = params["backbone"][f"block_group{g + 1}"]
        assert set(group) == {f"block{i + 1}" for i in range(num_blocks)}
        for i in range(num_blocks):
            block = group[f"block{i + 1}"]
            assert ("sk_conv" in block) == (sk_ratio > 0)
            assert ("proj_conv" in block) == (i == 0)
            assert "se" not in block


def test_cifar_stem_keeps_resolution():
    outputs, variables = abstract(18, 1, SK, image_size=32, cifar=True)
    assert outputs["stem"].shape == (2, 32, 32, 64)
    assert outputs["block_group4"].shape == (2, 4, 4, 512)
    stem = variables["params"]["backbone"]["stem"]
    assert stem["conv1"]["kernel"].shape == (3, 3, 3, 64) and "conv2" not in stem


@pytest.mark.parametrize("depth", [18, 50])
def test_selective_kernel_param_shapes(depth):
    _, variables = abstract(depth, 1, SK)
    for g in range(4):
        group = variables["params"]["backbone"][f"block_group{g + 1}"]
        filters = 64 * 2**g
        first, second = group["block1"], group["block2"]
        sk = second["sk_conv"]
        assert sk["conv"]["kernel"].shape == (3, 3, filters, 2 * filters)
        mid = max(int(filters * SK), 32)
        assert sk["mix_reduce"]["kernel"].shape == (1, 1, filters, mid)
        assert sk["mix_expand"]["kernel"].shape == (1, 1, mid, 2 * filters)
        assert set(sk["bn"]) == set(sk["bn_mix"]) == {"scale", "bias"}
        # ResNet-D shortcut: average pool, then a stride-1 1x1 conv (+ BN).
        out_channels = filters * (4 if depth >= 50 else 1)
        assert first["proj_conv"]["kernel"].shape[:2] == (1, 1)
        assert first["proj_conv"]["kernel"].shape[-1] == out_channels
        assert "bn_proj" in first


# ----------------------------------------------------------------------------------- param counts


def test_resnet50_backbone_matches_torchvision_count():
    # torchvision resnet50: 25,557,032 params including its 2048*1000+1000 fc layer.
    _, variables = abstract(50, 1, 0.0)
    assert count(variables["params"]["backbone"]) == 25_557_032 - (2048 * 1000 + 1000)


def test_resnet18_count_is_torchvision_plus_reference_group1_projection():
    # The reference projects the shortcut of every group's first block, even 64->64 in group 1.
    _, variables = abstract(18, 1, 0.0)
    torchvision_backbone = 11_689_512 - (512 * 1000 + 1000)
    assert count(variables["params"]["backbone"]) == torchvision_backbone + 64 * 64 + 2 * 64


@pytest.mark.parametrize(
    "name", [n for n, v in STANDARD_VARIANTS.items() if v.published_params_m is not None]
)
def test_simclrv2_published_param_counts(name):
    v = STANDARD_VARIANTS[name]
    _, variables = abstract(v.depth, v.width_multiplier, v.sk_ratio)
    params = count(variables["params"]["backbone"])
    bn_stats = count(variables["batch_stats"]["backbone"])
    # SimCLRv2's "Param (M)" counts all backbone variables (BN running statistics too), no heads.
    assert round((params + bn_stats) / 1e6) == v.published_params_m
    assert abs(params / 1e6 - v.published_params_m) < 1.0


# ----------------------------------------------------------------------------------- head


def _np_batch_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(axis=tuple(range(x.ndim - 1)))
    var = x.var(axis=tuple(range(x.ndim - 1)))
    out = (x - mean) / np.sqrt(var + eps) * scale
    return out if bias is None else out + bias


def _fill(shapes, seed):
    """Concrete variables for abstract ones, without compiling an init: kernels ~ N(0, 1/fan_in),
    BN scales in [0.5, 1.5] (never the zero init), biases ~ N(0, 0.1), running mean 0 / var 1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(math.prod(shape[:-1])), shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "bias":
            return rng.normal(0, 0.1, shape).astype(np.float32)
        return (np.ones if name == "var" else np.zeros)(shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("mode,num_layers", [("linear", 3), ("nonlinear", 3), ("nonlinear", 1)])
def test_projection_head_matches_numpy_reference(mode, num_layers):
    head = ProjectionHead(proj_head_mode=mode, num_proj_layers=num_layers, proj_out_dim=5)
    x = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
    variables = _fill(jax.eval_shape(lambda: head.init(fast_key(), x, train=False)), seed=1)
    params = variables["params"]
    run = fast_jit(lambda v: head.apply(v, x, train=True, mutable=["batch_stats"]))
    hiddens, _ = run(variables)

    expected = [x]
    layers = 1 if mode == "linear" else num_layers
    for j in range(1, layers + 1):
        last = j == layers
        bn = params[f"bn{j}"]
        assert "bias" not in params[f"dense{j}"]  # Dense without bias
        assert ("bias" in bn) == (not last)  # BN beta only on the middle layers (reference)
        h = _np_batch_norm(
            expected[-1] @ params[f"dense{j}"]["kernel"], bn["scale"], bn.get("bias")
        )
        expected.append(h if last else np.maximum(h, 0))
    assert len(hiddens) == len(expected)
    assert expected[-1].shape == (6, 5) and expected[1].shape == (6, 7 if layers > 1 else 5)
    for got, want in zip(hiddens, expected, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_head_mode_none_is_identity():
    x = jnp.arange(12.0).reshape(3, 4)
    hiddens = ProjectionHead(proj_head_mode="none").apply({}, x, train=True)
    assert len(hiddens) == 1
    np.testing.assert_array_equal(hiddens[0], x)


@pytest.mark.parametrize(
    "mode,selector,width",
    [("none", 0, 512), ("linear", 0, 512), ("linear", 1, 16)]
    + [("nonlinear", k, 512) for k in range(3)]
    + [("nonlinear", 3, 16)],
)
def test_classifier_input_width_follows_ft_proj_selector(mode, selector, width):
    model = SimCLRModel(
        depth=18, cifar_stem=True, proj_head_mode=mode, num_proj_layers=3, proj_out_dim=16,
        ft_proj_selector=selector, num_classes=7,
    )  # fmt: skip
    outputs, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32),
    )
    assert variables["params"]["classifier"]["kernel"].shape == (width, 7)
    assert variables["params"]["classifier"]["bias"].shape == (7,)
    num_layers = {"none": 0, "linear": 1, "nonlinear": 3}[mode]
    assert {k for k in outputs if k.startswith("head_")} == {
        f"head_{k}" for k in range(num_layers + 1)
    }
    assert outputs["projection"].shape == (2, 512 if mode == "none" else 16)


def test_ft_proj_selector_minus_one_is_the_last_head_layer():
    """As the reference (hiddens_list[-1]): -1 reads the last head layer, K when the head has K."""
    fields = dict(depth=18, cifar_stem=True, num_proj_layers=2, proj_out_dim=16, num_classes=5)
    last = build_model(dict(fields, ft_proj_selector=-1), num_classes=5, image_size=8)
    explicit = build_model(dict(fields, ft_proj_selector=2), num_classes=5, image_size=8)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    variables = explicit.init(jax.random.key(0), x, train=False)
    assert variables["params"]["classifier"]["kernel"].shape == (16, 5)
    np.testing.assert_array_equal(
        last.apply(variables, x, train=False)["logits"],
        explicit.apply(variables, x, train=False)["logits"],
    )


def test_ft_proj_selector_beyond_head_raises():
    model = SimCLRModel(depth=18, proj_head_mode="linear", ft_proj_selector=2)
    with pytest.raises(ValueError, match="ft_proj_selector"):
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
        )


# ------------------------------------------------------------------------------ selective kernel


def _np_conv(x, kernel, stride):
    k = kernel.shape[0]
    (lo, hi), _ = fixed_padding(k)
    x = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    out_h = (x.shape[1] - k) // stride + 1
    out = 0
    for di in range(k):
        for dj in range(k):
            patch = x[:, di : di + stride * out_h : stride, dj : dj + stride * out_h : stride]
            out = out + patch @ kernel[di, dj]
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_selective_kernel_conv_matches_numpy_reference(stride):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5)
    layer = SelectiveKernelConv(features=6, strides=stride, sk_ratio=SK, conv=conv, norm=norm)
    x = np.random.default_rng(2).normal(size=(4, 6, 6, 3)).astype(np.float32)
    variables = _fill(jax.eval_shape(lambda: layer.init(fast_key(), x)), seed=3)
    params = variables["params"]
    got, _ = fast_jit(lambda v: layer.apply(v, x, mutable=["batch_stats"]))(variables)

    assert params["mix_reduce"]["kernel"].shape == (1, 1, 6, 32)  # max(int(6 * 0.0625), 32)
    y = _np_conv(x, params["conv"]["kernel"], stride)
    y = np.maximum(_np_batch_norm(y, params["bn"]["scale"], params["bn"]["bias"]), 0)
    a, b = y[..., :6], y[..., 6:]
    squeezed = (a + b).mean(axis=(1, 2), keepdims=True)
    squeezed = squeezed @ params["mix_reduce"]["kernel"][0, 0]
    squeezed = np.maximum(
        _np_batch_norm(squeezed, params["bn_mix"]["scale"], params["bn_mix"]["bias"]), 0
    )
    logits = squeezed @ params["mix_expand"]["kernel"][0, 0]
    la, lb = logits[..., :6], logits[..., 6:]
    wa = np.exp(la) / (np.exp(la) + np.exp(lb))
    want = wa * a + (1 - wa) * b
    assert got.shape == (4, 6 // stride, 6 // stride, 6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


class _Shortcut(nn.Module):
    strides: int

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=False)
        return projection_shortcut(
            x, features=4, strides=self.strides, resnet_d=True, conv=conv, norm=norm
        )


@pytest.mark.parametrize("stride", [1, 2])
def test_resnet_d_shortcut_matches_numpy_reference(stride):
    """Average pool as the TF reference (stride 2: pad one at the end, VALID; stride 1: SAME,
    averaging only real pixels), then a 1x1 conv and BN. Odd sizes exercise the borders."""
    x = np.random.default_rng(4).normal(size=(2, 5, 5, 3)).astype(np.float32)
    layer = _Shortcut(stride)
    variables = _fill(jax.eval_shape(lambda: layer.init(fast_key(), x)), seed=5)
    got, _ = fast_jit(lambda v: layer.apply(v, x, mutable=["batch_stats"]))(variables)

    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    if stride == 2:
        pooled = sum(padded[:, di : di + 5 : 2, dj : dj + 5 : 2] for di in (0, 1) for dj in (0, 1))
        pooled = pooled / 4
    else:
        ones = np.pad(np.ones((1, 5, 5, 1), np.float32), ((0, 0), (0, 1), (0, 1), (0, 0)))
        total = sum(padded[:, di : di + 5, dj : dj + 5] for di in (0, 1) for dj in (0, 1))
        counts = sum(ones[:, di : di + 5, dj : dj + 5] for di in (0, 1) for dj in (0, 1))
        pooled = total / counts
    params = variables["params"]
    want = _np_batch_norm(
        pooled @ params["proj_conv"]["kernel"][0, 0],
        params["bn_proj"]["scale"],
        params["bn_proj"]["bias"],
    )
    assert got.shape == ((2, 3, 3, 4) if stride == 2 else (2, 5, 5, 4))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_head_batch_norm_uses_cross_replica_statistics_with_axis_name():
    x = np.random.default_rng(6).normal(size=(8, 6)).astype(np.float32)
    head = ProjectionHead(num_proj_layers=2, proj_out_dim=3)
    variables = _fill(jax.eval_shape(lambda: head.init(fast_key(), x, train=False)), seed=7)
    whole = fast_jit(lambda v: head.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    sharded_head = head.clone(axis_name="data")
    sharded = fast_jit(
        jax.vmap(
            lambda xs: sharded_head.apply(variables, xs, train=True, mutable=["batch_stats"]),
            axis_name="data",
        )
    )(x.reshape(2, 4, 6))
    np.testing.assert_allclose(sharded[0][-1].reshape(8, 3), whole[0][-1], rtol=1e-4, atol=1e-5)
    stats = jax.tree_util.tree_map(lambda a: a[0], sharded[1])  # identical on every replica
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, whole[1]
    )


# ----------------------------------------------------------------------------------- real runs


TINY = dict(depth=18, base_width=8, cifar_stem=True, num_classes=3, proj_out_dim=8)
TINY_SK_SE = dict(TINY, sk_ratio=SK, se_ratio=0.25)
TINY_IMAGES = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_init():
    """Real init of a tiny ResNet-18 (the one init we compile: it is the slowest thing to build)."""
    model = SimCLRModel(**TINY, zero_init_logits_layer=True)
    return fast_jit(lambda x: model.init(fast_key(), x, train=False))(TINY_IMAGES)


def test_init_values_zero_gamma_and_zero_logits_layer(tiny_init):
    params = tiny_init["params"]
    backbone = params["backbone"]
    for g in range(1, 5):
        group = backbone[f"block_group{g}"]
        for block in group.values():
            np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)  # last BN of the branch
            np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
        np.testing.assert_array_equal(group["block1"]["bn_proj"]["scale"], 1.0)
    np.testing.assert_array_equal(backbone["stem"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["classifier"]["kernel"], 0.0)  # zero_init_logits_layer
    assert np.std(params["head"]["dense1"]["kernel"]) == pytest.approx(0.01, rel=0.2)


def test_tiny_sk_se_model_runs_in_train_and_eval_mode():
    model = SimCLRModel(**TINY_SK_SE)
    shapes = jax.eval_shape(lambda: model.init(fast_key(), TINY_IMAGES, train=False))
    variables = _fill(shapes, seed=0)
    apply = fast_jit(model.apply, static_argnames=("train", "mutable"))
    train_out, updates = apply(variables, TINY_IMAGES, train=True, mutable=("batch_stats",))
    eval_out = apply(variables, TINY_IMAGES, train=False)
    for out in (train_out, eval_out):
        assert out["features"].shape == (4, 64) and out["logits"].shape == (4, 3)
        assert out["projection"].shape == (4, 8) and out["head_2"].shape == (4, 64)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
    # Train mode normalises with batch statistics and updates every running average; eval does not.
    assert not np.allclose(train_out["features"], eval_out["features"])
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert all(not np.array_equal(a, b) for a, b in zip(old, new, strict=True))
    # Train-mode BN of the projection head's last layer: zero mean over the batch per channel
    # (no beta), scaled by gamma.
    np.testing.assert_allclose(train_out["projection"].mean(axis=0), 0.0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_features():
    model = SimCLRModel(**TINY_SK_SE, dtype=jnp.bfloat16)
    outputs, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), TINY_IMAGES
    )
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert outputs["block_group4"].dtype == jnp.bfloat16  # activations in the compute dtype
    for key in ("features", "head_1", "projection", "logits"):
        assert outputs[key].dtype == jnp.float32


def test_frozen_stages_stay_bit_identical_under_sgd_with_weight_decay(tiny_init):
    k = 2  # freeze stem, block_group1, block_group2
    model = SimCLRModel(**TINY, fine_tune_after_block=k)
    # Non-zero gammas and classifier, so that every unfrozen parameter gets a gradient.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.full_like(p, 0.7) if path[-1].key in ("scale", "kernel") and
        (path[-1].key == "scale" or path[0].key == "classifier") else p,
        tiny_init["params"],
    )  # fmt: skip
    stats = tiny_init["batch_stats"]
    labels = jnp.array([0, 1, 2, 0])

    @fast_jit
    def grads_and_stats(params, stats):
        def loss_fn(params):
            out, updates = model.apply(
                {'params': params, 'batch_stats': stats}, TINY_IMAGES, train=True,
                mutable=['batch_stats'],
            )  # fmt: skip
            ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
            return ce + jnp.mean(out["projection"] ** 2), updates["batch_stats"]

        return jax.grad(loss_fn, has_aux=True)(params)

    grads, new_stats = grads_and_stats(params, stats)
    mask = frozen_mask(params, k)
    sgd = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1))
    masked = optax.multi_transform({False: sgd, True: optax.set_to_zero()}, mask)

    @functools.partial(fast_jit, static_argnums=0)
    def step(tx, params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    new_params = step(masked, params, grads)
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
    names = lambda path: [getattr(e, "key", None) for e in path]  # noqa: E731
    frozen_stages = set(STAGE_NAMES[: k + 1])
    checked = {"frozen": 0, "trained": 0}
    for (path, old), (_, grad), (_, new) in zip(
        flat(params), flat(grads), flat(new_params), strict=True
    ):
        keys = names(path)
        is_frozen = keys[0] == "backbone" and keys[1] in frozen_stages
        if is_frozen:
            np.testing.assert_array_equal(grad, 0.0)  # stop_gradient
            np.testing.assert_array_equal(new, old)  # and the mask stops weight decay
            checked["frozen"] += 1
        else:
            assert np.any(grad != 0), keys
            assert not np.array_equal(new, old), keys
            checked["trained"] += 1
    assert checked["frozen"] > 10 and checked["trained"] > 10
    # Frozen stages' BatchNorms ran in inference mode: their running statistics did not move.
    for (path, old), (_, new) in zip(flat(stats), flat(new_stats), strict=True):
        keys = names(path)
        if keys[0] == "backbone" and keys[1] in frozen_stages:
            np.testing.assert_array_equal(new, old)
        else:
            assert not np.array_equal(new, old), keys
    # Without the mask, weight decay alone would move the frozen kernels.
    unmasked = step(sgd, params, grads)
    stem_kernel = ("backbone", "stem", "conv1", "kernel")
    get = lambda tree: functools.reduce(lambda t, key: t[key], stem_kernel, tree)  # noqa: E731
    assert not np.array_equal(get(unmasked), get(params))


@pytest.mark.parametrize("k", range(-1, 5))
def test_frozen_mask_marks_exactly_the_frozen_stages(k):
    _, variables = abstract(18, 1, 0.0)
    mask = frozen_mask(variables, k)  # works on the whole variables dict too
    for collection in ("params", "batch_stats"):
        for name, subtree in mask[collection]["backbone"].items():
            want = STAGE_NAMES.index(name) <= k
            assert set(jax.tree_util.tree_leaves(subtree)) == {want}
        assert not any(jax.tree_util.tree_leaves(mask[collection]["head"]))
    assert not any(jax.tree_util.tree_leaves(mask["params"]["classifier"]))


# ----------------------------------------------------------------------------------- build_model


def test_build_model_from_config_with_auto_stem_and_overrides():
    config = ml_collections.ConfigDict(
        dict(depth=34, width_multiplier=2, sk_ratio=SK, se_ratio=0.0, cifar_stem=None,
             proj_head_mode='linear', num_proj_layers=2, proj_out_dim=64, global_bn=True)
    )  # fmt: skip
    small = build_model(config, num_classes=10, image_size=32, axis_name="data", dtype="bfloat16")
    assert small.cifar_stem and small.axis_name == "data" and small.dtype == jnp.bfloat16
    assert small.depth == 34 and small.width_multiplier == 2 and small.proj_out_dim == 64
    big = build_model(config, num_classes=1000, image_size=224, ft_proj_selector=1)
    assert not big.cifar_stem and big.ft_proj_selector == 1 and big.num_classes == 1000
    config.global_bn = False
    assert build_model(config, num_classes=10, image_size=32, axis_name="data").axis_name is None


@pytest.mark.parametrize(
    "field,value",
    [
        ("depth", 42),
        ("width_multiplier", 0),
        ("width_multiplier", 1.5),
        ("sk_ratio", -0.1),
        ("se_ratio", -1.0),
        ("proj_head_mode", "mlp"),
        ("num_proj_layers", 0),
        ("ft_proj_selector", 4),
        ("ft_proj_selector", -2),
        ("fine_tune_after_block", 5),
        ("fine_tune_after_block", -2),
        ("bn_momentum", 1.0),
        ("bn_epsilon", 0.0),
        ("typo_field", 1),
    ],
)
def test_build_model_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        build_model({field: value}, num_classes=10, image_size=32)


@pytest.mark.parametrize(
    'mode,selector', [('none', 1), ('linear', 2), ('nonlinear', 4)]
)  # fmt: skip
def test_ft_proj_selector_range_depends_on_head(mode, selector):
    fields = {"proj_head_mode": mode, "num_proj_layers": 3}
    build_model(dict(fields, ft_proj_selector=selector - 1), num_classes=10, image_size=32)
    with pytest.raises(ValueError, match="ft_proj_selector"):
        build_model(dict(fields, ft_proj_selector=selector), num_classes=10, image_size=32)


@pytest.mark.parametrize("cifar_stem,too_small", [(False, 31), (True, 7)])
def test_image_too_small_for_the_network_raises(cifar_stem, too_small):
    fields = {"cifar_stem": cifar_stem}
    build_model(fields, num_classes=10, image_size=too_small + 1)
    with pytest.raises(ValueError, match="image_size"):
        build_model(fields, num_classes=10, image_size=too_small)


# ----------------------------------------------------------------------------------- model card


def _resnet50_multiply_adds(size: int = 224) -> int:
    """Independent count of ResNet-50's conv multiply-adds (no padding skipped)."""
    side = size // 2
    macs = side * side * 7 * 7 * 3 * 64
    side //= 2
    in_ch = 64
    for g, (num_blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2), strict=True)):
        f = 64 * 2**g
        for i in range(num_blocks):
            out_side = side // (stride if i == 0 else 1)
            macs += side * side * in_ch * f + out_side**2 * (9 * f * f + 4 * f * f)
            macs += out_side**2 * in_ch * 4 * f if i == 0 else 0
            in_ch, side = 4 * f, out_side
    return macs


def test_model_card_flops_match_an_independent_count():
    row = describe_variant("r50_1x_sk0")
    heads = 2048 * 2048 * 2 + 2048 * 128 + 2048 * 1000
    analytic_gflops = 2 * (_resnet50_multiply_adds() + heads) / 1e9
    # XLA skips the taps that fall on zero padding, so it counts slightly less.
    assert 0.9 * analytic_gflops < row["gflops"] <= 1.01 * analytic_gflops
    assert row["published_params_m"] == 24


def test_model_card_cli_json_matches_eval_shape_counts():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, '-m', 'simclr_jax.models', '--variants', 'r18_1x_sk0,r50_1x_sk1',
         '--json'],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["r18_1x_sk0", "r50_1x_sk1"]
    for row, (depth, sk) in zip(rows, [(18, 0.0), (50, SK)], strict=True):
        _, variables = abstract(depth, 1, sk)
        assert row["backbone_params"] == count(variables["params"]["backbone"])
        assert row["backbone_bn_stats"] == count(variables["batch_stats"]["backbone"])
        assert row["head_params"] == count(variables["params"]["head"])
        assert row["classifier_params"] == count(variables["params"]["classifier"])
        assert row["gflops"] > 1.0 and math.isfinite(row["gflops"])
    assert rows[1]["published_params_m"] == 35


def test_model_card_cli_rejects_bad_values():
    result = subprocess.run(
        [sys.executable, "-m", "simclr_jax.models", "--depth=42", "--no_flops"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "simclr_jax.models: error: model.depth must be one of [18, 34, 50, 101, 152, 200], got 42"
    )
