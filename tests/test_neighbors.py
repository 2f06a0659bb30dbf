"""simclr_jax.neighbors: the blockwise search and its recall@K / mAP@R equal a brute-force NumPy
computation (tests/retrieval_reference.py) exactly, whatever the block size and with exact ties;
the grid picture and the command's one-line errors."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from retrieval_reference import brute_force_scores

from simclr_jax import embedding_file, neighbors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def clustered(n: int = 600, dims: int = 16, classes: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    vectors = rng.normal(size=(classes, dims))[labels] + 1.3 * rng.normal(size=(n, dims))
    # Exact ties: duplicated rows, some with another label.
    vectors[11], vectors[12], vectors[13] = vectors[10], vectors[10], vectors[10]
    labels[12] = (labels[10] + 1) % classes
    return vectors.astype(np.float32), labels


@pytest.mark.parametrize("block_bytes", [neighbors.BLOCK_BYTES, 4 * 600 * 7])  # 1 block, 7 rows
def test_scores_equal_brute_force_exactly(block_bytes, monkeypatch):
    monkeypatch.setattr(neighbors, "BLOCK_BYTES", block_bytes)
    vectors, labels = clustered()
    bank, queries = vectors[:450], vectors[450:]
    found = neighbors.retrieval_scores(bank, labels[:450], queries, labels[450:])
    expected = brute_force_scores(bank, labels[:450], queries, labels[450:])
    assert found.pop("queries") == 150
    assert {k: found[k] for k in ("recall@1", "recall@5", "recall@10")} == {
        k: expected[k] for k in ("recall@1", "recall@5", "recall@10")
    }
    assert found["map@r"] == pytest.approx(expected["map@r"], abs=1e-12)
    # Leave-one-out over one set (each row a query among the others).
    everyone = np.arange(len(vectors))
    found = neighbors.retrieval_scores(vectors, labels, vectors, labels, leave_out=everyone)
    expected = brute_force_scores(vectors, labels, vectors, labels, leave_out=everyone)
    for key in ("recall@1", "recall@5", "recall@10"):
        assert found[key] == expected[key], key
    assert found["map@r"] == pytest.approx(expected["map@r"], abs=1e-12)


def test_search_returns_the_nearest_in_order_with_ties_by_index(monkeypatch):
    monkeypatch.setattr(neighbors, "BLOCK_BYTES", 4 * 600 * 3)
    vectors, _ = clustered()
    indices, similarities = neighbors.search(vectors, vectors[:40], 9, leave_out=np.arange(40))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    full = unit[:40].astype(np.float64) @ unit.T.astype(np.float64)
    full[np.arange(40), np.arange(40)] = -np.inf
    expected = np.argsort(-full, axis=1, kind="stable")[:, :9]
    assert np.array_equal(indices, expected)
    np.testing.assert_allclose(similarities, np.take_along_axis(full, expected, 1), atol=1e-6)
    assert list(indices[10, :3]) == [11, 12, 13]  # three exact duplicates of row 10, by index


def write(path, vectors, labels=None, **extra):
    thumbnails = np.zeros((len(vectors), 8, 8, 1), np.uint8)
    thumbnails[:, 2:6, 2:6] = 40 * (np.arange(len(vectors)) % 6)[:, None, None, None]
    arrays = {"features": vectors, "thumbnails": thumbnails, **extra}
    if labels is not None:
        arrays.update(labels=labels, label_names=np.asarray([f"class {i}" for i in range(6)]))
    np.savez(path, **arrays)
    return str(path)


def test_grid_picture_has_a_row_per_query_coloured_by_label(tmp_path):
    vectors, labels = clustered()
    path = write(tmp_path / "e.npz", vectors, labels)
    data = embedding_file.read(path)
    rows = np.arange(4)
    indices, values = neighbors.search(data.vectors, data.vectors[rows], 5, leave_out=rows)
    figure = neighbors.grid_figure(data, data, rows, indices, values)
    assert len(figure.axes) == 4 * 6
    for r in rows:
        ax_row = figure.axes[6 * r : 6 * r + 6]
        assert ax_row[0].get_title().startswith("query\nclass ")
        for c, ax in enumerate(ax_row[1:]):
            same = labels[indices[r, c]] == labels[r]
            assert ax.title.get_color() == ("green" if same else "red")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simclr_jax.neighbors", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip


def test_the_command_draws_scores_and_errs_in_one_line(tmp_path):
    vectors, labels = clustered()
    bank = write(tmp_path / "bank.npz", vectors[:450], labels[:450])
    queries = write(tmp_path / "q.npz", vectors[450:], labels[450:])
    out = tmp_path / "grid.png"
    result = run_cli(f"--embeddings={bank}", f"--queries={queries}", "-k", "6", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    expected = brute_force_scores(vectors[:450], labels[:450], vectors[450:], labels[450:])
    assert scores["recall@5"] == expected["recall@5"] and scores["queries"] == 150
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, message in [
        ([f"--embeddings={tmp_path / 'none.npz'}"], "no such file"),
        ([f"--embeddings={bank}", "--field=projection"], "has no 'projection' array"),
        ([f"--embeddings={bank}", f"--queries={write(tmp_path / 'w.npz', vectors[:5, :8])}"],
         "embed both with the same model"),
    ]:  # fmt: skip
        result = run_cli(*args, f"--out={tmp_path / 'x.png'}")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("simclr_jax.neighbors: error: ") and message in last, last
    assert not (tmp_path / "x.png").exists()


def test_without_thumbnails_the_images_come_from_embeds_paths(tmp_path):
    """embed's .npz has no thumbnails, but `root` and `paths`: the picture reads those files."""
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    paths = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
        paths.append(f"sub/{i}.png")
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    np.savez(tmp_path / "e.npz", features=vectors, paths=np.asarray(paths),
             root=np.asarray(str(tmp_path / "images")), image_size=np.asarray(224))  # fmt: skip
    data = embedding_file.read(str(tmp_path / "e.npz"))
    thumbnail = data.thumbnail(4)
    assert thumbnail.dtype == np.uint8 and max(thumbnail.shape[:2]) == embedding_file.THUMBNAIL_SIDE
    with Image.open(folder / "4.png") as image:
        image.thumbnail((64, 64))
        np.testing.assert_array_equal(thumbnail, np.asarray(image.convert("RGB")))
    scores = neighbors.neighbors(
        str(tmp_path / "e.npz"), k=3, num_queries=2, out=str(tmp_path / "g.png")
    )
    assert scores == {} and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
