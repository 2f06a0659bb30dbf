"""Nearest neighbours in an embedding: a picture of each query's neighbours, and retrieval scores.

    python -m simclr_jax.neighbors --embeddings=E.npz [--queries=Q.npz] [-k 8] [--out=grid.png]
        [--field=features|projection] [--num_queries=8]

Cosine similarity (rows L2-normalised) on the backbone features by default. Without --queries,
the first --num_queries rows of E are the queries and each is searched among the others (itself
left out); with --queries, every row of Q is searched among all rows of E. The picture has a row
per query: the query, then its k neighbours, each titled with its label (green: the query's,
red: another) and similarity. With labels in both files it also prints, over every query:
  recall@K  the fraction of queries with at least one neighbour of their label among the K
            nearest (K = 1, 5, 10; the metric-learning definition);
  mAP@R     the mean over queries of the average precision over the R nearest, R being the
            number of bank items of the query's label (Musgrave et al., "A Metric Learning
            Reality Check", 2020).
The search is exact and blockwise on the CPU: a block of queries against the whole bank in one
matrix product (NumPy's BLAS), its size chosen so the similarity block stays under
BLOCK_BYTES; ties are broken by the lower bank index, so results do not depend on the blocking.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
from absl import flags
from matplotlib.figure import Figure

from simclr_jax import cli
from simclr_jax import embedding_file as files

BLOCK_BYTES = 256 << 20  # similarity block (float32) per step of the search
RECALL_AT = (1, 5, 10)


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in x's float dtype (float32 at least).
    Rows already of unit norm are returned as they are: no copy of a large bank."""
    x = np.asarray(x, np.result_type(x.dtype, np.float32))
    squares = np.einsum("ij,ij->i", x, x)  # no [N, D] temporary
    if np.all(np.abs(squares - 1) <= 1e-6):
        return x
    return x / np.maximum(np.sqrt(squares), 1e-12)[:, None]


def query_blocks(num_queries: int, bank_size: int) -> Iterator[slice]:
    rows = max(1, min(4096, BLOCK_BYTES // (4 * max(bank_size, 1))))
    for start in range(0, num_queries, rows):
        yield slice(start, min(start + rows, num_queries))


def top_k(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities) [B, k] of each row's k largest, ties by the lower index."""
    k = min(k, similarity.shape[1])
    chosen = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(similarity, chosen, axis=1)
    order = np.lexsort((chosen, -values), axis=1)
    chosen, values = np.take_along_axis(chosen, order, 1), np.take_along_axis(values, order, 1)
    # argpartition picks any of the items tied with the k-th: redo the rows where that mattered.
    boundary = values[:, -1:]
    ties = (similarity == boundary).sum(1) > (values == boundary).sum(1)
    for row in np.flatnonzero(ties):
        full = np.lexsort((np.arange(similarity.shape[1]), -similarity[row]))[:k]
        chosen[row], values[row] = full, similarity[row, full]
    return chosen, values


def search(
    bank: np.ndarray, queries: np.ndarray, k: int, *, leave_out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k], cosine similarities [Q, k]) of each query's k nearest bank rows.

    leave_out[i]: a bank index query i may not return (itself, when the queries are bank rows).
    """
    bank, queries = normalized(bank), normalized(queries)
    indices = np.empty((len(queries), min(k, len(bank))), np.int64)
    values = np.empty(indices.shape, bank.dtype)
    for block in query_blocks(len(queries), len(bank)):
        similarity = queries[block] @ bank.T
        if leave_out is not None:
            similarity[np.arange(len(similarity)), leave_out[block]] = -np.inf
        indices[block], values[block] = top_k(similarity, k)
    return indices, values


def retrieval_scores(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    *,
    leave_out: np.ndarray | None = None,
    recall_at: Sequence[int] = RECALL_AT,
) -> dict[str, float]:
    """{'recall@K' for K in recall_at, 'map@r', 'queries'} (module docstring for the definitions).

    Queries whose label no bank item has (R = 0) count in recall (as misses) but not in mAP@R.
    """
    bank, queries = normalized(bank), normalized(queries)
    counts = np.bincount(bank_labels, minlength=int(max(bank_labels.max(), query_labels.max())) + 1)
    hits = dict.fromkeys(recall_at, 0)
    average_precision, with_relevant = 0.0, 0
    for block in query_blocks(len(queries), len(bank)):
        similarity = queries[block] @ bank.T
        relevant = counts[query_labels[block]].copy()
        if leave_out is not None:
            similarity[np.arange(len(similarity)), leave_out[block]] = -np.inf
            relevant -= bank_labels[leave_out[block]] == query_labels[block]
        depth = max(max(recall_at), int(relevant.max()))
        chosen, _ = top_k(similarity, depth)
        same = bank_labels[chosen] == query_labels[block, None]
        for k in recall_at:
            hits[k] += int(same[:, :k].any(axis=1).sum())
        ranks = np.arange(1, same.shape[1] + 1)
        precision = np.cumsum(same, axis=1) / ranks
        within_r = ranks[None, :] <= relevant[:, None]
        sums = np.sum(precision * same * within_r, axis=1)
        has = relevant > 0
        average_precision += float(np.sum(sums[has] / relevant[has]))
        with_relevant += int(has.sum())
    scores = {f"recall@{k}": hits[k] / len(queries) for k in recall_at}
    scores["map@r"] = average_precision / max(with_relevant, 1)
    scores["queries"] = len(queries)
    return scores


def grid_figure(
    bank: files.EmbeddingFile,
    queries: files.EmbeddingFile,
    rows: Sequence[int],
    indices: np.ndarray,
    similarities: np.ndarray,
) -> Figure:
    """A row per query: the query, then its neighbours (title: label and cosine similarity)."""
    k = indices.shape[1]
    figure = Figure(figsize=(1.25 * (k + 1), 1.45 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), k + 1, squeeze=False)
    for r, query in enumerate(rows):
        label = None if queries.labels is None else int(queries.labels[query])
        _show(axes[r, 0], queries.thumbnail(query), "query" + _label(queries, label), "black")
        for c in range(k):
            index = int(indices[r, c])
            found = None if bank.labels is None else int(bank.labels[index])
            color = (
                "black"
                if label is None or found is None
                else ("green" if found == label else "red")
            )
            title = f"{similarities[r, c]:.2f}" + _label(bank, found)
            _show(axes[r, c + 1], bank.thumbnail(index), title, color)
    return figure


def _label(embeddings: files.EmbeddingFile, label: int | None) -> str:
    return "" if label is None else f"\n{embeddings.label_name(label)}"


def _show(ax, image: np.ndarray, title: str, color: str) -> None:
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(color)
        spine.set_linewidth(2 if color != "black" else 0.5)


def neighbors(
    embeddings: str,
    *,
    queries: str | None = None,
    k: int = 8,
    num_queries: int = 8,
    field: str = "features",
    out: str | None = None,
) -> dict[str, float]:
    """Draw the grid to `out` (if given) and return the retrieval scores ({} without labels)."""
    if k < 1 or num_queries < 1:
        raise ValueError(f"-k and --num_queries must be >= 1, got {k} and {num_queries}")
    bank = files.read(embeddings, field)
    asked = bank if queries is None else files.read(queries, field, flag="--queries")
    if asked.vectors.shape[1] != bank.vectors.shape[1]:
        raise ValueError(
            f"--queries has {field} of {asked.vectors.shape[1]} dims, --embeddings of "
            f"{bank.vectors.shape[1]}: embed both with the same model"
        )
    leave_out = np.arange(len(bank)) if queries is None else None
    if queries is None and len(bank) < 2:
        raise ValueError(f"--embeddings={embeddings!r} holds one row: nothing to search among")
    if out:
        rows = np.arange(min(num_queries, len(asked)))
        indices, values = search(
            bank.vectors, asked.vectors[rows], k, leave_out=None if leave_out is None else rows
        )
        _save(grid_figure(bank, asked, rows, indices, values), out)
    if bank.labels is None or asked.labels is None:
        return {}
    return retrieval_scores(
        bank.vectors, bank.labels, asked.vectors, asked.labels, leave_out=leave_out
    )


def _save(figure: Figure, out: str) -> None:
    with open(out, "wb") as file:
        figure.savefig(file, format="png", dpi=110)


def main() -> None:
    flags.DEFINE_string("embeddings", None, "The bank: an embedding .npz (embed's, the demo's).")
    flags.DEFINE_string("queries", None, "Queries .npz (default: E's first rows, among the rest).")
    flags.DEFINE_integer("k", 8, "Neighbours per query in the picture.")
    flags.DEFINE_integer("num_queries", 8, "Queries drawn (rows of the picture).")
    flags.DEFINE_enum("field", "features", list(files.FIELDS), "Which vectors to compare.")
    flags.DEFINE_string("out", "neighbors.png", "The picture (PNG); empty: none.")
    flags.mark_flags_as_required(["embeddings"])

    def run(argv: list[str]) -> None:
        del argv
        values = flags.FLAGS
        scores = neighbors(
            values.embeddings, queries=values.queries, k=values.k,
            num_queries=values.num_queries, field=values.field, out=values.out,
        )  # fmt: skip
        if values.out:
            print(f"wrote {values.out}")
        print(json.dumps(scores) if scores else "no labels: no retrieval scores")

    cli.run(run)


if __name__ == "__main__":
    main()
