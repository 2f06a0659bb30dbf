"""Transfer learning: the scikit-learn digits source, and a Fashion-MNIST pretraining fine-tuned on
the digits through the command lines (architecture read from the checkpoint, a new classifier,
grayscale data for an RGB network, another image size)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_finetune import load_config
from test_recipe_e2e import run_cli

from simclr_jax import finetune, saved_run
from simclr_jax.data import digits, fashion_mnist, sources, stage_data
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (the [transfer] extra)"
)
needs_both = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None or not fashion_mnist.available(),
    reason="needs scikit-learn and the Fashion-MNIST files (dataset-fashion-mnist)",
)


def digits_config(source: str = "local") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": "sklearn_digits", "source": source, "data_dir": ""})


# ------------------------------------------------------------------------------ the digits source


@needs_sklearn
def test_digit_splits_are_fixed_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    package_labels = load_digits().target
    train = sources.load_split(digits_config(), "train")
    test = sources.load_split(digits_config("auto"), "test")  # 'auto' finds the package too
    assert train.images.shape == (1297, 28, 28, 1) and test.images.shape == (500, 28, 28, 1)
    assert train.images.dtype == test.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and train.num_classes == test.num_classes == 10
    # Every class in both splits, in proportion: round(500/1797 x its size) test images.
    per_class = np.bincount(package_labels)
    np.testing.assert_array_equal(np.bincount(test.labels), np.round(per_class * 500 / 1797))
    np.testing.assert_array_equal(np.bincount(train.labels) + np.bincount(test.labels), per_class)
    test_ids = digits.split_indices(package_labels, "test")
    train_ids = digits.split_indices(package_labels, "train")
    assert np.intersect1d(test_ids, train_ids).size == 0
    np.testing.assert_array_equal(np.union1d(test_ids, train_ids), np.arange(1797))
    # Fixed once and for all (the README's numbers depend on it): seed 0, the package's order.
    np.testing.assert_array_equal(test_ids, digits.split_indices(package_labels.copy(), "test"))
    np.testing.assert_array_equal(test.labels, package_labels[test_ids])


@needs_sklearn
def test_digit_images_are_the_package_digits_scaled_and_upsampled():
    from sklearn.datasets import load_digits

    package = load_digits()
    test = sources.load_split(digits_config(), "test")
    assert test.images.min() == 0 and test.images.max() == 255
    native = np.round(package.images * 255 / 16)[digits.split_indices(package.target, "test")]
    reference = jax.image.resize(jnp.asarray(native, jnp.float32), (500, 28, 28), "linear")
    difference = np.abs(np.round(np.asarray(reference)) - test.images[..., 0])
    assert difference.max() <= 1 and np.mean(difference) < 0.01  # ties rounded otherwise only


@needs_sklearn
def test_digit_splits_slice_like_tfds():
    train = sources.load_split(digits_config(), "train")
    head = sources.load_split(digits_config(), "train[:100]")
    np.testing.assert_array_equal(head.images, train.images[:100])
    np.testing.assert_array_equal(head.labels, train.labels[:100])
    tail = sources.load_split(digits_config(), "test[90%:]")
    assert len(tail) == 50 and tail.num_classes == 10


def test_digit_source_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"split 'validation' unknown.*\['test', 'train'\]"):
        sources.load_split(digits_config(), "validation")
    digits._all_examples.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match=r"pip install scikit-learn.*\[transfer\]"):
            sources.load_split(digits_config(), "train")
    finally:
        digits._all_examples.cache_clear()


def test_match_channels_repeats_grey_and_takes_the_luma_of_rgb():
    rng = np.random.default_rng(0)
    grey = ImageArrays(rng.integers(0, 256, (4, 5, 5, 1), dtype=np.uint8), np.arange(4), 4)
    rgb = stage_data.match_channels(grey, 3)
    assert rgb.images.shape == (4, 5, 5, 3) and rgb.labels is grey.labels
    for channel in range(3):
        np.testing.assert_array_equal(rgb.images[..., channel], grey.images[..., 0])
    assert (
        stage_data.match_channels(grey, 1) is grey and stage_data.match_channels(grey, None) is grey
    )
    colour = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    luma = stage_data.match_channels(ImageArrays(colour, None, 0), 1).images
    expected = 0.2989 * colour[..., 0] + 0.5870 * colour[..., 1] + 0.1140 * colour[..., 2]
    np.testing.assert_array_equal(luma[..., 0], np.round(expected).astype(np.uint8))
    with pytest.raises(ValueError, match="2 channels"):
        stage_data.match_channels(grey, 2)


# ------------------------------------------------------------ Fashion-MNIST -> digits, end to end


@pytest.fixture(scope="module")
def transferred(tmp_path_factory):
    """A tiny Fashion-MNIST pretraining and its 2-step fine-tuning on the digits, by the CLIs."""
    root = tmp_path_factory.mktemp("transfer")
    # The same flags as tests/test_pretrain.py's CLI test: the compilation cache serves both.
    run_cli(
        "simclr_jax.pretrain", "pretrain_fashion_mnist.py:tiny", root / "pretrain",
        "--config.num_steps=3", "--config.dataset.train_split=train[:1024]",
        "--config.dataset.eval_split=test[:300]",
    )  # fmt: skip
    result = run_cli(
        "simclr_jax.finetune", "transfer_digits.py:tiny", root / "digits",
        f"--config.init_checkpoint={root / 'pretrain'}",
    )  # fmt: skip
    return root, result


@needs_both
def test_transfer_evaluates_every_test_digit(transferred):
    _, result = transferred
    assert result["step"] == 2 and result["num_labeled"] == 256  # 'train[:256]'
    assert result["eval_count"] == digits.SPLIT_SIZES["test"] == 500
    assert 0.0 <= result["eval_top1"] <= 1.0 and np.isfinite(result["loss"])


@needs_both
def test_architecture_and_weights_come_from_the_checkpoint(transferred):
    root, _ = transferred
    assert load_config("transfer_digits.py", "tiny").model.base_width is None  # not in the preset
    saved = json.loads((root / "digits" / "config.json").read_text())
    assert saved["dataset"]["name"] == "sklearn_digits"
    architecture = {k: saved["model"][k] for k in ("backbone", "base_width", "proj_out_dim")}
    assert architecture == {"backbone": "convnet", "base_width": 2, "proj_out_dim": 16}  # tiny's
    pretrained, tuned = (saved_run.read_run(str(root / name)) for name in ("pretrain", "digits"))
    # A new classifier on head layer 1 (width 32 = base width 2 x 16), one output per digit.
    assert tuned.shapes["params/classifier/kernel"] == (32, 10) and tuned.num_classes == 10
    # Head layer 2 feeds nothing when ft_proj_selector=1: frozen, so bit-identical to the
    # pretrained one (a random initialisation could not be).
    before, after = (
        saved_run.restore_variables(run, saved_run.build_from_run(run))["params"]["head"]["dense2"]
        for run in (pretrained, tuned)
    )
    np.testing.assert_array_equal(before["kernel"], after["kernel"])


def rgb_copy(workdir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """The pretraining with a 3-channel stem: a third of the grey kernel on each colour, so on
    grey RGB images it computes what the original computes on grayscale ones."""
    run = saved_run.read_run(str(workdir))
    variables = saved_run.restore_variables(run, saved_run.build_from_run(run))
    stem = variables["params"]["backbone"]["stem"]["conv1"]
    stem["kernel"] = np.repeat(np.asarray(stem["kernel"]) / 3, 3, axis=2)
    with checkpoint.CheckpointManager(target, config=run.config, async_save=False) as manager:
        manager.save(run.step, variables, force=True)
    return target


@needs_both
def test_grayscale_digits_transfer_to_an_rgb_network(transferred, tmp_path):
    root, _ = transferred
    rgb_dir = rgb_copy(root / "pretrain", tmp_path / "rgb_pretrain")
    assert saved_run.read_run(str(rgb_dir)).channels == 3
    # Without the conversion the 1-channel digits would not fit the stem's weights
    # (CheckpointMismatchError); the run starts and writes its (empty) results.
    config = load_config(
        "transfer_digits.py", "tiny", f"--config.init_checkpoint={rgb_dir}"
    )  # fmt: skip
    assert finetune.train_and_evaluate(config, str(tmp_path / "ft"), stop_at_step=0)["step"] == 0
    # The RGB network sees the digits as the grayscale one does: same features.
    images = sources.load_split(digits_config(), "test[:32]")
    rgb_images = stage_data.match_channels(images, 3).images
    (grey_fn, grey_vars), (rgb_fn, rgb_vars) = (
        saved_run.load_encoder(str(w)) for w in (root / "pretrain", rgb_dir)
    )
    np.testing.assert_allclose(
        rgb_fn(rgb_vars, rgb_images)["features"],
        grey_fn(grey_vars, images.images)["features"],
        rtol=1e-4,
        atol=1e-4,
    )


@needs_both
def test_another_image_size_keeps_the_checkpoints_stem(transferred, tmp_path):
    """A 28 px pretraining (auto = CIFAR stem) fine-tuned at 40 px: the stem stays the CIFAR one
    its weights were made for, instead of the auto ImageNet stem of > 32 px (a mismatch)."""
    root, _ = transferred
    config = load_config(
        "transfer_digits.py", "tiny", f"--config.init_checkpoint={root / 'pretrain'}",
        "--config.dataset.image_size=40",
    )  # fmt: skip
    finetune.train_and_evaluate(config, str(tmp_path / "ft40"), stop_at_step=0)
    saved = json.loads((tmp_path / "ft40" / "config.json").read_text())
    assert saved["model"]["cifar_stem"] is True and saved["dataset"]["image_size"] == 40


@needs_both
def test_transfer_demo_reuses_only_a_finished_pretraining(transferred, tmp_path):
    from simclr_jax import transfer_demo

    root, _ = transferred
    assert transfer_demo.is_finished(str(root / "pretrain"))
    killed = tmp_path / "killed"  # results.json, but the process died before its checkpoint
    (killed / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)
    (killed / "results.json").write_text((root / "pretrain" / "results.json").read_text())
    assert not transfer_demo.is_finished(str(killed))
    assert not transfer_demo.is_finished(str(tmp_path / "absent"))
