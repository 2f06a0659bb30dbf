"""Data sources (Fashion-MNIST files, folders, tfds mock), the batch pipelines and the pairs grid."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from simclr_jax.data import fashion_mnist, folders, pipeline, sources, splits
from simclr_jax.data.arrays import ImageArrays, from_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist.available(), reason="apt-get install dataset-fashion-mnist"
)


def dataset_config(**overrides) -> ConfigDict:
    config = ConfigDict(
        {
            "name": "fashion_mnist",
            "source": "auto",
            "data_dir": "",
            "train_split": "train",
            "eval_split": "test",
            "image_size": 28,
        }
    )
    config.update(overrides)
    return config


def single_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


# ---------------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion_mnist
def test_fashion_mnist_local_files():
    train_x, train_y = fashion_mnist.load("train")
    test_x, test_y = fashion_mnist.load("test")
    assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test_y), [1000] * 10)
    # Published statistic of the training images: mean 0.2860 (std 0.3530) in [0, 1].
    assert abs(train_x.mean() / 255 - 0.2860) < 5e-4
    assert abs(train_x.std() / 255 - 0.3530) < 5e-4


def _write_idx(path, magic, dims, payload: bytes):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_fashion_mnist_rejects_bad_files(tmp_path):
    images, labels = fashion_mnist.file_paths("test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("test", str(tmp_path))
    _write_idx(images, 0x803, (2, 28, 28), bytes(2 * 28 * 28))
    _write_idx(labels, 0x801, (2,), bytes([3, 9]))
    x, y = fashion_mnist.load("test", str(tmp_path))
    assert x.shape == (2, 28, 28, 1) and y.tolist() == [3, 9]
    _write_idx(labels, 0x803, (2,), bytes([3, 9]))  # wrong magic
    with pytest.raises(ValueError, match="magic"):
        fashion_mnist.load("test", str(tmp_path))
    _write_idx(labels, 0x801, (3,), bytes([3, 9]))  # truncated
    with pytest.raises(ValueError, match="3 bytes"):
        fashion_mnist.load("test", str(tmp_path))
    with pytest.raises(ValueError, match="choose from"):
        fashion_mnist.load("validation", str(tmp_path))


@needs_fashion_mnist
def test_load_split_local_with_slicing():
    full = sources.load_split(dataset_config(), "test")
    assert isinstance(full, ImageArrays) and len(full) == 10000 and full.num_classes == 10
    head = sources.load_split(dataset_config(source="local"), "test[:100]")
    np.testing.assert_array_equal(head.images, full.images[:100])
    middle = sources.load_split(dataset_config(), "test[10%:20%]")
    np.testing.assert_array_equal(middle.labels, full.labels[1000:2000])
    with pytest.raises(ValueError, match="'validation'.*choose from"):
        sources.load_split(dataset_config(), "validation")


def test_load_split_rejects_unknown_names():
    with pytest.raises(ValueError, match="dataset.source 'web'.*auto"):
        sources.load_split(dataset_config(source="web"), "train")
    with pytest.raises(ValueError, match="'cifar10' has no local files.*fashion_mnist"):
        sources.load_split(dataset_config(name="cifar10", source="local"), "train")
    with pytest.raises(ValueError, match="NAME\\[start:stop\\]"):
        splits.parse_split("train[1:2:3]")
    assert splits.slice_for("train[:25%]", 400) == slice(None, 100)
    assert splits.slice_for("train[-10:]", 400) == slice(-10, None)


def test_from_arrays_and_label_fraction():
    arrays = from_arrays(np.random.default_rng(0).random((40, 8, 8)), np.repeat(np.arange(4), 10))
    assert arrays.images.shape == (40, 8, 8, 1) and arrays.images.dtype == np.uint8
    assert arrays.num_classes == 4
    subset = sources.take_label_fraction(arrays, 0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(subset.labels), [2, 2, 2, 2])
    with pytest.raises(ValueError, match="labels must lie in"):
        from_arrays(np.zeros((2, 4, 4), np.uint8), [0, 5], num_classes=3)


# ------------------------------------------------------------------------------------- folders


def _make_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("ant", 2)):
        os.makedirs(root / "train" / name)
        for i in range(count):
            pixels = rng.integers(0, 256, (20 + 7 * i, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    Image.fromarray(np.full((10, 10), 77, np.uint8)).save(root / "train" / "ant" / "gray.png")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not really a png")
    (root / "train" / "cat" / "notes.txt").write_text("ignored: not an image")


def test_image_folder_labels_decoding_and_bad_files(tmp_path):
    _make_image_folder(tmp_path)
    contents = folders.load_folder(str(tmp_path / "train"), image_size=16)
    assert contents.class_names == ("ant", "cat")  # labels follow sorted class names
    assert contents.images.shape == (6, 16, 16, 3) and contents.images.dtype == np.uint8
    assert contents.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(contents.skipped) == 1 and contents.skipped[0][0].endswith("broken.png")
    gray = contents.images[2]  # ant/gray.png: a uniform gray image stays uniform after resizing
    assert (gray == 77).all()
    with pytest.raises(ValueError, match="broken.png"):
        folders.load_folder(str(tmp_path / "train"), image_size=16, strict=True)

    config = dataset_config(name="folder", source="folder", data_dir=str(tmp_path), image_size=12)
    arrays = sources.load_split(config, "train[:4]")
    assert arrays.images.shape == (4, 12, 12, 3) and arrays.num_classes == 2
    with pytest.raises(ValueError, match="split 'test' not found.*'train'"):
        sources.load_split(config, "test")


def test_flat_image_folder_is_unlabelled(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((9, 14, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    contents = folders.load_folder(str(tmp_path), image_size=8, channels=1)
    assert contents.labels is None and contents.images.shape == (3, 8, 8, 1)


# ---------------------------------------------------------------------------------------- tfds


def test_data_modules_do_not_import_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        import simclr_jax.data.sources, simclr_jax.data.pipeline, simclr_jax.data.augment
        import simclr_jax.data.tfds_source, simclr_jax.data.show, simclr_jax.data.stage_data
        import simclr_jax.data.prepared, simclr_jax.data.step_stream, simclr_jax.prepare
        assert "tensorflow" not in sys.modules, "tensorflow imported eagerly"
        sys.modules["tensorflow"] = None  # now behave as if it were not installed
        sys.modules["tensorflow_datasets"] = None
        try:
            simclr_jax.data.tfds_source.load_arrays("cifar10", "train")
        except ImportError as err:
            assert "tensorflow-datasets" in str(err)
        else:
            raise AssertionError("expected ImportError")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_tfds_mock_arrays_pipeline_and_missing_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from simclr_jax.data import tfds_source
    from simclr_jax.data.step_stream import StepStream, eval_batches

    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        tfds_source.load_arrays("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a tfds dataset"):
        tfds_source.load_arrays("no_such_dataset", "train", data_dir=str(tmp_path))

    with tfds.testing.mock_data(num_examples=5):
        arrays = sources.load_split(dataset_config(name="cifar10", source="tfds"), "train")
        assert arrays.images.shape == (5, 32, 32, 3) and arrays.images.dtype == np.uint8
        assert arrays.num_classes == 10 and ((0 <= arrays.labels) & (arrays.labels < 10)).all()
        with pytest.raises(ValueError, match="variable-size"):
            tfds_source.load_arrays("imagenet2012", "train")

        train = StepStream("imagenet2012", "train", global_batch=3, image_size=12, seed=0,
                           num_crops=2).batches(0)  # fmt: skip
        batch = next(train)
        assert batch["image"].shape == (3, 2, 12, 12, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (3,)
        assert not np.array_equal(batch["image"][:, 0], batch["image"][:, 1])  # two crops

        evaluation = list(eval_batches("imagenet2012", "validation", local_batch=2, image_size=12))
        masks = np.concatenate([b["mask"] for b in evaluation])
        assert masks.tolist() == [1, 1, 1, 1, 1, 0]  # 5 examples in batches of 2, one pad row
        assert (evaluation[-1]["image"][1] == 0).all()
        # Two processes: contiguous shares (3 and 2 examples), the same number of batches each.
        shares = [
            list(eval_batches("imagenet2012", "validation", local_batch=2, image_size=12,
                              process_index=i, process_count=2))
            for i in range(2)
        ]  # fmt: skip
        assert [np.concatenate([b["mask"] for b in share]).tolist() for share in shares] == [
            [1, 1, 1, 0], [1, 1, 0, 0],
        ]  # fmt: skip
        together = np.concatenate([b["label"][b["mask"] > 0] for s in shares for b in s])
        np.testing.assert_array_equal(
            together, np.concatenate([b["label"][b["mask"] > 0] for b in evaluation])
        )


# ------------------------------------------------------------------------------------ pipeline


def _toy_arrays(n=23, size=4):
    # Image i is filled with the value i, so gathered rows can be traced back to their index.
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 1))
    return ImageArrays(images, np.arange(n, dtype=np.int32) % 5, 5)


def test_device_resident_data_epochs_and_determinism():
    arrays = _toy_arrays()
    mesh = single_device_mesh()
    data = pipeline.DeviceResidentData(arrays, global_batch=5, seed=7, mesh=mesh)
    assert data.steps_per_epoch == 4  # 23 // 5; the remaining 3 of each epoch are dropped
    for epoch in range(2):
        seen = np.concatenate([data.indices(epoch * 4 + s) for s in range(4)])
        assert len(set(seen.tolist())) == 20  # each kept example exactly once per epoch
        batches = [data.batch(epoch * 4 + s) for s in range(4)]
        images = np.concatenate([np.asarray(b["image"])[:, 0, 0, 0] for b in batches])
        np.testing.assert_array_equal(images, seen)  # gathered the right rows
        labels = np.concatenate([np.asarray(b["label"]) for b in batches])
        np.testing.assert_array_equal(labels, seen % 5)
        index = np.concatenate([np.asarray(b["index"]) for b in batches])
        np.testing.assert_array_equal(index, seen)
    assert not np.array_equal(data.indices(0), data.indices(4))  # a fresh order each epoch
    resumed = pipeline.DeviceResidentData(arrays, global_batch=5, seed=7, mesh=mesh)
    np.testing.assert_array_equal(resumed.batch(6)["image"], data.batch(6)["image"])  # exact resume
    other = pipeline.DeviceResidentData(arrays, global_batch=5, seed=8, mesh=mesh)
    assert not np.array_equal(other.indices(0), data.indices(0))
    assert data.batch(0)["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="batch_size=24 exceeds the 23"):
        pipeline.DeviceResidentData(arrays, global_batch=24, seed=0, mesh=mesh)
    unlabelled = ImageArrays(arrays.images, None, 0)
    batch = pipeline.DeviceResidentData(unlabelled, global_batch=5, seed=0, mesh=mesh).batch(0)
    assert (np.asarray(batch["label"]) == -1).all()


def test_eval_batches_pad_and_mask_exactly():
    arrays = _toy_arrays(n=11)
    batches = list(pipeline.eval_batches(arrays, global_batch=4, mesh=single_device_mesh()))
    assert len(batches) == 3 == pipeline.num_eval_batches(11, 4)
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert mask.tolist() == [1] * 11 + [0]
    images = np.concatenate([np.asarray(b["image"]) for b in batches])
    np.testing.assert_array_equal(images[:11], arrays.images)
    assert (images[11:] == 0).all()
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])
    np.testing.assert_array_equal(labels[:11], arrays.labels)


MULTI_DEVICE_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from simclr_jax.data import augment, pipeline
from simclr_jax.data.arrays import ImageArrays

assert jax.device_count() == 8
rng = np.random.default_rng(0)
arrays = ImageArrays(rng.integers(0, 256, (50, 12, 12, 1), dtype=np.uint8),
                     rng.integers(0, 3, 50).astype(np.int32), 3)
mesh8 = Mesh(np.array(jax.devices()), ("data",))
mesh1 = Mesh(np.array(jax.devices()[:1]), ("data",))
data8 = pipeline.DeviceResidentData(arrays, global_batch=16, seed=3, mesh=mesh8)
data1 = pipeline.DeviceResidentData(arrays, global_batch=16, seed=3, mesh=mesh1)
for step in (0, 5):
    b8, b1 = data8.batch(step), data1.batch(step)
    assert len(b8["image"].sharding.device_set) == 8
    assert b8["image"].addressable_shards[0].data.shape == (2, 12, 12, 1)
    np.testing.assert_array_equal(np.asarray(b8["image"]), np.asarray(b1["image"]))
try:
    pipeline.DeviceResidentData(arrays, global_batch=12, seed=0, mesh=mesh8)
    raise AssertionError("expected a ValueError")
except ValueError as err:
    assert "batch_size=12" in str(err) and "8 devices" in str(err), err
evals = list(pipeline.eval_batches(arrays, global_batch=16, mesh=mesh8))
assert sum(float(b["mask"].sum()) for b in evals) == 50

# Views computed per device shard equal the views of the whole batch on one device.
kw = dict(out_size=12, color_strength=0.5, use_blur=True)
key = jax.random.key(9)
batch = data8.batch(1)
ids = jnp.arange(16)
whole_a, whole_b = augment.simclr_views(key, np.asarray(batch["image"]), ids, **kw)

def per_device(images):
    local = images.shape[0]
    local_ids = jax.lax.axis_index("data") * local + jnp.arange(local)
    return augment.simclr_views(key, images, local_ids, **kw)

sharded = jax.jit(jax.shard_map(per_device, mesh=mesh8, in_specs=P("data"),
                                out_specs=(P("data"), P("data"))))
a8, b8 = sharded(batch["image"])
np.testing.assert_allclose(np.asarray(a8), np.asarray(whole_a), atol=1e-5)
np.testing.assert_allclose(np.asarray(b8), np.asarray(whole_b), atol=1e-5)
print("ok")
"""


def test_pipeline_and_views_on_eight_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# -------------------------------------------------------------------------------------- show


def test_write_pairs_grid(tmp_path):
    from PIL import Image

    from simclr_jax.data import show

    _make_image_folder(tmp_path)
    config = ConfigDict(
        {
            "seed": 0,
            "dataset": dataset_config(name="folder", source="folder", data_dir=str(tmp_path),
                                      image_size=16),
            "augment": {"color_jitter_strength": 1.0, "use_blur": True, "crop_min_area": 0.08,
                        "flip": True, "brightness": "multiplicative"},
        }
    )  # fmt: skip
    out = show.write_pairs(config, str(tmp_path / "pairs.png"), num=4)
    grid = np.asarray(Image.open(out))
    cell = 16 * 7  # 16 px enlarged 7x to reach at least 112 px
    assert grid.shape == (4 * (cell + 4) + 4, 3 * (cell + 4) + 4, 3)
    first_row = grid[4 : 4 + cell]
    columns = [first_row[:, 4 + c * (cell + 4) : 4 + c * (cell + 4) + cell] for c in range(3)]
    assert not np.array_equal(columns[1], columns[2])  # the two views differ
    with pytest.raises(ValueError, match="num must be in"):
        show.write_pairs(config, str(tmp_path / "x.png"), num=50)
