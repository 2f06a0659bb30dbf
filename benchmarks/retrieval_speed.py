"""Exact cosine k-NN search speed on this CPU: simclr_jax.neighbors (blockwise NumPy matmul +
top-k) against faiss-cpu's exact inner-product index, where faiss is installed.

    python benchmarks/retrieval_speed.py --bank=100000 --dims=512 --queries=100000   # all pairs
    python benchmarks/retrieval_speed.py --bank=1000000 --dims=2048 --queries=2000   # queries/s

Random unit vectors (float32); k=10. Prints one JSON line per method: seconds, queries/s, and
whether its neighbours equal neighbors.search's. The numbers go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from simclr_jax import neighbors

flags.DEFINE_integer("bank", 100_000, "Bank rows.")
flags.DEFINE_integer("dims", 512, "Vector size.")
flags.DEFINE_integer("queries", 2_000, "Queries (the first rows of the bank, themselves left out).")
flags.DEFINE_integer("k", 10, "Neighbours per query.")


def unit_rows(rows: int, dims: int, seed: int = 0) -> np.ndarray:
    """Random unit rows, made in chunks (no float64 temporary of the whole bank)."""
    out = np.empty((rows, dims), np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 65536):
        chunk = rng.standard_normal((min(65536, rows - start), dims), dtype=np.float32)
        out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def main(argv) -> None:
    del argv
    values = flags.FLAGS
    bank = unit_rows(values.bank, values.dims)
    queries = bank[: values.queries]
    leave_out = np.arange(values.queries)
    common = {"bank": values.bank, "dims": values.dims, "queries": values.queries,
              "k": values.k, "load_average": os.getloadavg()[0]}  # fmt: skip
    start = time.perf_counter()
    ours, _ = neighbors.search(bank, queries, values.k, leave_out=leave_out)
    seconds = time.perf_counter() - start
    print(json.dumps({"method": "neighbors.search (numpy)", "seconds": round(seconds, 2),
                      "queries_per_s": round(values.queries / seconds, 1), **common}))  # fmt: skip
    try:
        import faiss
    except ImportError:
        print(json.dumps({"method": "faiss", "skipped": "faiss-cpu is not installed"}))
        return
    start = time.perf_counter()
    index = faiss.IndexFlatIP(values.dims)
    index.add(bank)
    _, found = index.search(queries, values.k + 1)
    seconds = time.perf_counter() - start
    found = np.array([row[row != q][: values.k] for q, row in enumerate(found)])
    print(json.dumps({"method": f"faiss {faiss.__version__} IndexFlatIP", "seconds": round(seconds, 2),
                      "queries_per_s": round(values.queries / seconds, 1),
                      "same_neighbours": float(np.mean(found == ours)), **common}))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
