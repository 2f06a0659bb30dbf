"""A 2-D map of an embedding: PCA, t-SNE (scikit-learn) or UMAP (umap-learn, an optional extra),
a scatter coloured by label, optionally with some images drawn at their points.

`python -m simclr_jax.plot --embedding=E.npz --method=tsne` draws it (plot.py has the command).
Vectors are L2-normalised first (the geometry the contrastive loss trains); t-SNE and UMAP start
from the first PCA_DIMS principal components, as is usual, and every method is seeded.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from simclr_jax import embedding_file as files

METHODS = ("pca", "tsne", "umap")
PCA_DIMS = 50


def reduce_2d(vectors: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """[N, 2] coordinates of the L2-normalised rows of `vectors`."""
    if method not in METHODS:
        raise ValueError(f"--method={method!r}: allowed: {', '.join(METHODS)}")
    try:
        from sklearn.decomposition import PCA
    except ImportError:
        raise ImportError(
            "maps need scikit-learn, which is not installed: pip install 'simclr_jax[maps]'"
        ) from None
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(x)
    if x.shape[1] > PCA_DIMS and len(x) > PCA_DIMS:
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    try:
        import umap
    except ImportError:
        raise ImportError(
            "--method=umap needs umap-learn, which is not installed: pip install "
            "'simclr_jax[umap]' (or use --method=tsne or pca)"
        ) from None
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)


def map_figure(
    embeddings: files.EmbeddingFile,
    coordinates: np.ndarray,
    rows: np.ndarray,
    *,
    title: str,
    thumbnails: int = 0,
    seed: int = 0,
) -> Figure:
    """Scatter of `coordinates` (of embeddings' `rows`), coloured by label; `thumbnails` images."""
    figure = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = figure.subplots()
    labels = None if embeddings.labels is None else embeddings.labels[rows]
    if labels is None:
        ax.scatter(coordinates[:, 0], coordinates[:, 1], s=3, alpha=0.6)
    else:
        for label in np.unique(labels):
            at = labels == label
            ax.scatter(
                coordinates[at, 0], coordinates[at, 1], s=3, alpha=0.7,
                label=embeddings.label_name(int(label)), color=_color(int(label)),
            )  # fmt: skip
        ax.legend(markerscale=4, fontsize="small", loc="best")
    if thumbnails:
        chosen = np.random.default_rng(seed).choice(len(rows), min(thumbnails, len(rows)), False)
        for i in chosen:
            image = embeddings.thumbnail(int(rows[i]))
            image = image[..., 0] if image.shape[-1] == 1 else image
            box = OffsetImage(image, zoom=0.6, cmap="gray")
            ax.add_artist(AnnotationBbox(box, coordinates[i], frameon=False))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return figure


def _color(label: int) -> tuple[float, ...]:
    from matplotlib import colormaps

    return colormaps["tab10" if label < 10 else "tab20"](label % 20)


def draw_map(
    path: str,
    *,
    method: str = "tsne",
    field: str = "features",
    out: str | None = None,
    max_points: int = 5000,
    thumbnails: int = 0,
    seed: int = 0,
    title: str | None = None,
) -> tuple[str, Figure]:
    """Write the map of the embedding file at `path` to `out` (default beside it); (out, figure)."""
    if max_points < 2:
        raise ValueError(f"--max_points must be >= 2, got {max_points}")
    embeddings = files.read(path, field, flag="--embedding")
    rows = np.arange(len(embeddings))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
    coordinates = reduce_2d(embeddings.vectors[rows], method, seed)
    title = title or f"{'PCA' if method == 'pca' else method}: {len(rows):,} rows of {field}"
    figure = map_figure(
        embeddings, coordinates, rows, title=title, thumbnails=thumbnails, seed=seed
    )
    out = out or f"{path.removesuffix('.npz')}_{method}.png"
    with open(out, "wb") as file:
        figure.savefig(file, format="png", dpi=120)
    return out, figure
