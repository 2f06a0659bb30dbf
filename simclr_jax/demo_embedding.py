"""The demo's look into its embedding (`make demo`): neighbours, a map and retrieval scores.

Under the demo's folder: neighbors.png (NUM_QUERIES test images, one per class, and their nearest
training images by cosine similarity of the backbone features), map.png (t-SNE of MAP_POINTS test
images coloured by class), retrieval.json (test images as queries among the training images:
recall@1/5/10 and mAP@R, simclr_jax.neighbors) and embeddings_test.npz (the test set's features,
labels and images, for `python -m simclr_jax.neighbors` and `python -m simclr_jax.plot
--embedding`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from simclr_jax import embedding_file, embedding_map, neighbors

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
NUM_QUERIES = 8
NUM_NEIGHBORS = 8
MAP_POINTS = 2000


def query_rows(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """One image of each of `count` classes (chosen with `seed`), in class order."""
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.choice(np.unique(labels), min(count, len(np.unique(labels))), False))
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])


def embedding_outputs(out: str, splits: Any, train_x: np.ndarray, test_x: np.ndarray, seed: int):
    """Write the files of the module docstring; the retrieval scores and the seconds it took."""
    start = time.perf_counter()
    names = np.asarray(CLASS_NAMES)
    test_path = embedding_file.write(
        os.path.join(out, "embeddings_test.npz"), test_x,
        labels=splits.test_labels, label_names=names, thumbnails=splits.test_images,
    )  # fmt: skip
    test = embedding_file.read(test_path)
    train = embedding_file.EmbeddingFile(
        "training images", np.asarray(train_x, np.float32), np.asarray(splits.train_labels),
        list(CLASS_NAMES), splits.train_images, None, None,
    )  # fmt: skip
    rows = query_rows(test.labels, NUM_QUERIES, seed)
    indices, similarities = neighbors.search(train.vectors, test.vectors[rows], NUM_NEIGHBORS)
    figure = neighbors.grid_figure(train, test, rows, indices, similarities)
    figure.suptitle("Test images (left) and their nearest training images (SimCLR features)")
    with open(os.path.join(out, "neighbors.png"), "wb") as file:
        figure.savefig(file, format="png", dpi=110)
    scores = neighbors.retrieval_scores(train.vectors, train.labels, test.vectors, test.labels)
    embedding_map.draw_map(
        test_path, method="tsne", out=os.path.join(out, "map.png"), max_points=MAP_POINTS,
        seed=seed, title=f"t-SNE of {min(MAP_POINTS, len(test)):,} test images (SimCLR features)",
    )  # fmt: skip
    with open(os.path.join(out, "retrieval.json"), "w") as file:
        json.dump({"bank": "training images", **scores}, file, indent=1)
    return scores, time.perf_counter() - start
