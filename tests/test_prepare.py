"""`simclr_jax.prepare`: folder layouts, every kind of image file, unreadable files, errors, resume.

The prepared datasets are read back through tfds (the path training streams from) and compared
with the source files, decoded independently (PIL, or NumPy for the conversion rules)."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from simclr_jax.data import folder_layout, image_files, prepared, shard_writer

tfds = pytest.importorskip("tensorflow_datasets")  # the [tfds] extra; make test installs it


def tensorflow():
    """TensorFlow, imported by the tests that use it (not at collection: each xdist worker
    collects every file, and importing it costs seconds of CPU)."""
    return pytest.importorskip("tensorflow")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def save(path, pixels, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)


def noise(rng, height, width, channels=3, dtype=np.uint8):
    top = 256 if dtype == np.uint8 else 65536
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, top, shape, dtype=dtype)


def labelled_folder(root, *, classes=("ant", "bee", "cat"), per_class=5, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            height, width = rng.integers(9, 40, 2)
            save(root / "train" / name / f"{i}.jpg", noise(rng, height, width))
    return root


def prepare(images, data_dir, **kwargs):
    settings = prepared.Settings(**{k: kwargs.pop(k) for k in list(kwargs) if k != "name"})
    return prepared.prepare_folder(
        str(images), str(data_dir), settings=settings, workers=1, progress=False, **kwargs
    )


def examples(name, data_dir, split):
    """Every record of a prepared split, read by index as training reads them."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return builder.info, [source[i] for i in range(len(source))]


def decoded(record, channels):
    return (
        tensorflow()
        .io.decode_image(record["image"], channels=channels, expand_animations=False)
        .numpy()
    )


def test_labelled_folder_with_validation_and_test_folders(tmp_path):
    images = labelled_folder(tmp_path / "photos")
    rng = np.random.default_rng(1)
    save(images / "val" / "bee" / "v0.png", noise(rng, 12, 20))
    for name in ("ant", "cat"):
        save(images / "test" / name / "t0.jpg", noise(rng, 30, 16))
    (images / "train" / "README.txt").write_text("not an image")
    record = prepare(images, tmp_path / "out")
    assert record["name"] == "photos" and record["classes"] == ["ant", "bee", "cat"]
    assert {s: c["examples"] for s, c in record["splits"].items()} == {
        "train": 15, "validation": 1, "test": 2,
    }  # fmt: skip
    assert record["ignored_files"] == ["train/README.txt"] and record["skipped"] == []
    assert record["splits"]["train"]["per_class"] == {"ant": 5, "bee": 5, "cat": 5}
    assert "--config.dataset.eval_split=validation" in record["use"]
    info, train = examples("photos", tmp_path / "out", "train")
    assert info.features["label"].names == ["ant", "bee", "cat"]
    assert info.features["image"].shape == (None, None, 3)
    for record_ in train:  # JPEGs are stored as they were, each with its class and file name
        path = record_["file_name"].decode()
        assert record_["image"] == (images / path).read_bytes()
        assert info.features["label"].names[record_["label"]] == path.split("/")[1]
    # The train split is in a fixed random order (a slice is a random subset), the same each time.
    names = [r["file_name"].decode() for r in train]
    assert sorted(names) != names and len(set(names)) == 15
    _, test = examples("photos", tmp_path / "out", "test")
    assert [r["file_name"].decode() for r in test] == ["test/ant/t0.jpg", "test/cat/t0.jpg"]
    assert [int(r["label"]) for r in test] == [0, 2]  # train's class indices


def test_flat_folder_is_unlabelled_and_val_fraction_carves_each_class(tmp_path):
    rng = np.random.default_rng(2)
    flat = tmp_path / "flat"
    for i in range(4):
        save(flat / f"{i}.png", noise(rng, 10 + i, 14))
    record = prepare(flat, tmp_path / "out", val_fraction=0.5)
    assert record["classes"] == [] and list(record["splits"]) == ["train"]  # nothing carved
    info, train = examples("flat", tmp_path / "out", "train")
    assert "label" not in info.features and len(train) == 4
    assert "--config.dataset.eval_split=''" in record["use"]

    images = labelled_folder(tmp_path / "carved", per_class=10)
    record = prepare(images, tmp_path / "out", val_fraction=0.2)
    assert record["splits"]["validation"]["per_class"] == {"ant": 2, "bee": 2, "cat": 2}
    assert record["splits"]["train"]["per_class"] == {"ant": 8, "bee": 8, "cat": 8}
    _, train = examples("carved", tmp_path / "out", "train")
    _, validation = examples("carved", tmp_path / "out", "validation")
    every = {r["file_name"] for r in train} | {r["file_name"] for r in validation}
    assert len(every) == 30  # each file in exactly one split


def test_grayscale_rgba_16_bit_png_and_npy_follow_the_written_rules(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "kinds" / "train" / "x"
    gray, rgba = noise(rng, 11, 13, 1), noise(rng, 12, 9, 4)
    gray16, rgb16 = noise(rng, 10, 8, 1, np.uint16), noise(rng, 7, 9, 3, np.uint16)
    floats, u16 = rng.random((6, 5)), noise(rng, 5, 6, 3, np.uint16)
    save(root / "gray.png", gray)
    save(root / "rgba.png", rgba)
    save(root / "gray16.png", gray16)  # PIL writes mode I;16 as a 16-bit grayscale PNG
    root.joinpath("rgb16.png").write_bytes(tensorflow().io.encode_png(rgb16).numpy())
    np.save(root / "floats.npy", floats)
    np.save(root / "u16.npy", u16)
    np.save(root / "two_channels.npy", noise(rng, 4, 4, 2))
    np.save(root / "too_bright.npy", floats * 2)
    record = prepare(tmp_path / "kinds", tmp_path / "out", val_fraction=0.0)
    assert record["channels"] == 3  # some images are RGB: grayscale ones are repeated
    reasons = {s["path"]: s["reason"] for s in record["skipped"]}
    assert reasons == {
        "train/x/too_bright.npy": "float pixels must be finite and lie in [0, 1]",
        "train/x/two_channels.npy": "arrays must be [H, W] or [H, W, C] with C 1, 3 or 4, got "
        "[H, W, 2]",
    }
    expected = {  # independent NumPy statements of the rules
        "gray.png": np.repeat(gray[..., None], 3, -1),
        "rgba.png": rgba[..., :3],
        "gray16.png": np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, -1),
        "rgb16.png": (rgb16 >> 8).astype(np.uint8),
        "floats.npy": np.repeat(np.round(floats * 255).astype(np.uint8)[..., None], 3, -1),
        "u16.npy": (u16 >> 8).astype(np.uint8),
    }
    _, train = examples("kinds", tmp_path / "out", "train")
    got = {r["file_name"].decode().split("/")[-1]: decoded(r, 3) for r in train}
    assert got.keys() == expected.keys()
    for name, pixels in expected.items():
        np.testing.assert_array_equal(got[name], pixels, err_msg=name)
    assert (
        record["conversions"]["16-bit to 8-bit"] == 3
        and record["conversions"]["alpha dropped"] == 1
    )
    # Embedding the folder reads every file by the same rules as the prepared dataset holds it.
    for name, pixels in expected.items():
        np.testing.assert_array_equal(image_files.read_pixels(str(root / name), 3), pixels)

    only_gray = tmp_path / "gray"
    save(only_gray / "a.png", gray)
    np.save(only_gray / "b.npy", floats)
    assert prepare(only_gray, tmp_path / "out")["channels"] == 1
    info, train = examples("gray", tmp_path / "out", "train")
    assert info.features["image"].shape == (None, None, 1)
    np.testing.assert_array_equal(decoded(train[0], 1)[..., 0], gray)


def test_unreadable_files_are_listed_or_fatal_with_bad_images_error(tmp_path):
    images = labelled_folder(tmp_path / "some_bad", per_class=3)
    good = (images / "train" / "ant" / "0.jpg").read_bytes()
    (images / "train" / "ant" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "train" / "bee" / "junk.png").write_bytes(b"not a png at all")
    record = prepare(images, tmp_path / "out", val_fraction=0.0)
    assert record["splits"]["train"]["examples"] == 9
    reasons = {s["path"]: s["reason"] for s in record["skipped"]}
    assert reasons.keys() == {"train/ant/truncated.jpg", "train/bee/junk.png"}
    assert "truncated" in reasons["train/ant/truncated.jpg"]
    assert reasons["train/bee/junk.png"] == "not an image file PIL can identify"
    on_disk = json.loads((tmp_path / "out/some_bad/1.0.0/prepare.json").read_text())
    assert on_disk["skipped"] == record["skipped"]
    with pytest.raises(ValueError, match=r"^cannot read train/ant/truncated.jpg: .*bad_images"):
        prepare(images, tmp_path / "strict", name="strict", bad_images="error")


def run_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.prepare", "--progress=false", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs,
    )  # fmt: skip


def test_empty_and_all_corrupt_folders_are_one_line_errors(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = run_cli(f"--images={tmp_path / 'empty'}", f"--data_dir={tmp_path / 'out'}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("simclr_jax.prepare: error: --images=") and "holds no image files" in last
    )

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = run_cli(f"--images={corrupt}", f"--data_dir={tmp_path / 'out'}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("simclr_jax.prepare: error: none of the 3 image files under ")
    assert last.endswith("nothing written") and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "corrupt").exists()  # nothing left behind


def test_layout_and_name_mistakes_are_named(tmp_path):
    images = labelled_folder(tmp_path / "mixed", per_class=1)
    save(images / "train" / "stray.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="class subfolders and also 1 image file.*stray.jpg"):
        folder_layout.scan(str(images))
    (images / "train" / "stray.jpg").unlink()
    save(images / "val" / "dog" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"validation split has classes that train/ has not: \['dog'\]"
    ):
        folder_layout.scan(str(images))
    (images / "val" / "dog" / "0.png").unlink()
    (images / "val" / "dog").rmdir()
    save(images / "val" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="every split must be labelled"):
        folder_layout.scan(str(images))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        folder_layout.scan(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--name='cifar10' is the name of a known dataset"):
        prepared.dataset_name("cifar10", str(images))
    with pytest.raises(ValueError, match="--name='My-Photos' is not a dataset name"):
        prepared.dataset_name("My-Photos", str(images))


# A prepare that kills itself with SIGKILL while it writes its fourth shard (the temporary file
# half done): a real kill -9 at a fixed point of the work.
KILLED = """
import os, signal, sys
from simclr_jax.data import shard_writer
write = shard_writer._write_atomically
def write_then_die(path, records, scratch):
    if "-00003-of-" in path.name:
        (scratch / (path.name + ".12345.tmp")).write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, records, scratch)
shard_writer._write_atomically = write_then_die
sys.argv = sys.argv[1:]
from simclr_jax import prepare
prepare.main()
"""


def shard_files(data_dir, name):
    folder = data_dir / name / shard_writer.VERSION
    return {p.name: p.read_bytes() for p in folder.iterdir() if ".array_record-" in p.name}


def test_kill_9_then_rerun_finishes_without_redoing_the_done_shards(tmp_path):
    images = labelled_folder(tmp_path / "shots", per_class=8)
    args = [f"--images={images}", "--images_per_shard=4", "--val_fraction=0", "--workers=1"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, "prepare", *args, f"--data_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    work = tmp_path / "out" / "shots" / f"{shard_writer.VERSION}.prepare"
    done = sorted(p.name for p in work.iterdir() if ".array_record-" in p.name)
    assert len(done) == 3  # shards 0-2 finished before the kill; 3-5 not
    before = {name: os.stat(work / name) for name in done}

    record = prepare(images, tmp_path / "out", images_per_shard=4, val_fraction=0.0)
    assert record["shards_reused"] == 3 and record["splits"]["train"]["shards"] == 6
    final = tmp_path / "out" / "shots" / shard_writer.VERSION
    for name, stat in before.items():  # the finished shards were not written again
        after = os.stat(final / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # The result equals an uninterrupted prepare, written by two processes, byte for byte.
    straight = prepared.prepare_folder(
        str(images), str(tmp_path / "straight"), progress=False, workers=2,
        settings=prepared.Settings(images_per_shard=4, val_fraction=0.0),
    )  # fmt: skip
    assert shard_files(tmp_path / "out", "shots") == shard_files(tmp_path / "straight", "shots")
    assert straight["splits"] == record["splits"]
    assert sorted(os.listdir(final)) == sorted(os.listdir(tmp_path / "straight/shots/1.0.0"))

    # Run again: nothing to do. Change the folder: the finished dataset is not overwritten.
    assert (
        prepare(images, tmp_path / "out", images_per_shard=4, val_fraction=0.0)["digest"]
        == (record["digest"])
    )
    save(images / "train" / "ant" / "new.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="already holds a dataset prepared from other files"):
        prepare(images, tmp_path / "out", images_per_shard=4, val_fraction=0.0)


def test_stored_bytes_decode_to_the_pixels_of_the_source(tmp_path):
    rng = np.random.default_rng(5)
    pixels = noise(rng, 16, 24)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(buffer.getvalue())
    stored = image_files.read_stored(str(path))
    assert stored.data == buffer.getvalue() and stored.conversion == ""
    assert (stored.height, stored.width, stored.channels) == (16, 24, 3)
    np.testing.assert_array_equal(image_files.decode_stored(stored.data), pixels)
