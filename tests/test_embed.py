"""simclr_jax.embed: the reference eval preprocessing (against tf.image), a folder of odd images
through the command line with a converted official model, and our own workdirs."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from test_convert import gen, tiny_checkpoint  # noqa: F401 - gen is a fixture

from simclr_jax import convert, embed, saved_run
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.models import build_model, init_variables
from simclr_jax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
READABLE = ["gray.png", "rgba.png", "sub/deeper/big.jpg", "sub/palette.gif", "sub/tiny.bmp"]


def tf_eval_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """The official TF2 eval preprocessing (tf2/data_util.py preprocess_for_eval + center_crop
    with aspect ratio 1), in TensorFlow."""
    import tensorflow as tf

    height, width = image.shape[:2]
    x = tf.image.convert_image_dtype(tf.constant(image), tf.float32)
    if size > 32:  # tf2/data.py: test_crop = image_size > 32
        side = int(tf.math.rint(0.875 * min(height, width)))
        top, left = (height - side + 1) // 2, (width - side + 1) // 2
        x = tf.image.crop_to_bounding_box(x, top, left, side, side)
    x = tf.image.resize([x], [size, size], method="bicubic")[0]
    return np.clip(x.numpy(), 0.0, 1.0)


@pytest.mark.parametrize(
    "height, width, size",
    [(37, 53, 224), (300, 200, 224), (1000, 700, 64), (90, 91, 64), (20, 30, 32), (40, 41, 28)],
)
def test_preprocessing_is_the_reference_eval(height, width, size):
    """Centre crop and bicubic resize without antialiasing, up and down, odd offsets, and the
    uncropped path at 32 px and below (a crop off by one pixel differs by ~0.3 here)."""
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = np.asarray(embed.preprocess(image, size))
    reference = tf_eval_preprocess(image, size)
    assert ours.shape == reference.shape == (size, size, 3)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_a_crop_of_the_output_size_is_kept_as_is():
    image = np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    crop = image[
        16:240, 38:262
    ]  # 224 = 0.875 * 256, offsets (256 - 224 + 1) // 2, (300 - 224 + 1) // 2
    np.testing.assert_allclose(embed.preprocess(image, 224), crop / 255.0, atol=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """Odd images in nested folders, an unreadable .jpg, a text file and a hidden image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    pixels = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    Image.fromarray(pixels(50, 70), "L").save(root / "gray.png")
    Image.fromarray(pixels(64, 48, 4), "RGBA").save(root / "rgba.png")
    Image.fromarray(pixels(30, 30, 3)).convert("P").save(root / "sub" / "palette.gif")
    Image.fromarray(pixels(300, 450, 3)).save(root / "sub" / "deeper" / "big.jpg")
    Image.fromarray(pixels(5, 5, 3)).save(root / "sub" / "tiny.bmp")
    Image.fromarray(pixels(40, 40, 3)).save(root / ".hidden" / "skipped.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def own_workdir(path: pathlib.Path) -> str:
    """A workdir as our pretraining writes it: the tiny Fashion-MNIST network (1 channel, 28 px,
    CIFAR stem), its variables and config through CheckpointManager."""
    config = pretrain_fashion_mnist.get_config("tiny")
    model = build_model(config.model, num_classes=10, image_size=28)
    variables = init_variables(model, seed=0, image_size=28, channels=1)
    with checkpoint.CheckpointManager(path, config=config, async_save=False) as manager:
        manager.save(0, {"step": np.zeros((), np.int32), **variables}, force=True)
    return str(path)


def reference_features(workdir: str, paths: list[pathlib.Path], size: int) -> np.ndarray:
    """The network on each image alone (batch of 1): embed's batching and padding change nothing."""
    run = saved_run.read_run(workdir)
    model = saved_run.build_from_run(run)
    variables = saved_run.restore_variables(run, model)
    apply = jax.jit(lambda x: model.apply(variables, x[None], train=False)["features"][0])
    return np.stack([apply(embed.preprocess(embed.decode(p, run.channels), size)) for p in paths])


def test_the_command_line_embeds_a_folder_with_a_converted_model(folder, gen, tmp_path):  # noqa: F811
    prefix = tiny_checkpoint(gen, tmp_path / "official" / "model.ckpt-1")
    convert.convert(prefix, str(tmp_path / "converted"))
    out = tmp_path / "embeddings"
    command = [
        sys.executable, "-m", "simclr_jax.embed", f"--workdir={tmp_path / 'converted'}",
        f"--images={folder}", f"--out={out}", "--image_size=64", "--batch_size=4", "--projection",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed: 6/6 images, 1 skipped" in result.stderr and "images/s" in result.stderr
    saved = np.load(f"{out}.npz")
    assert list(saved["paths"]) == READABLE
    assert list(saved["skipped"]) == ["broken.jpg"]
    assert "not an image file" in saved["skipped_reasons"][0]
    assert saved["features"].shape == (5, 32) and saved["projection"].shape == (5, 8)
    assert int(saved["image_size"]) == 64 and str(saved["root"]) == str(folder)
    expected = reference_features(str(tmp_path / "converted"), [folder / p for p in READABLE], 64)
    np.testing.assert_allclose(saved["features"], expected, rtol=1e-5, atol=1e-5)


def test_our_own_grayscale_workdir_embeds_at_its_image_size(folder, tmp_path):
    workdir = own_workdir(tmp_path / "fashion")
    result = embed.embed(workdir, str(folder), batch_size=3, progress=False)
    assert result.paths == READABLE and result.image_size == 28
    assert result.projection is None and result.features.shape[0] == 5
    assert [path for path, _ in result.skipped] == ["broken.jpg"]
    expected = reference_features(workdir, [folder / p for p in READABLE], 28)
    np.testing.assert_allclose(result.features, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_one_line_errors(folder, tmp_path):
    workdir = own_workdir(tmp_path / "fashion")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        embed.embed(workdir, str(tmp_path / "empty"), progress=False)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        embed.embed(workdir, str(tmp_path / "missing"), progress=False)
    with pytest.raises(ValueError, match="image_size must be an integer >= 8"):
        embed.embed(workdir, str(folder), image_size=4, progress=False)
