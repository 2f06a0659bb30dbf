"""Brute-force retrieval scores (the whole similarity matrix, a full stable sort per query), the
independent reference for simclr_jax.neighbors in test_neighbors.py and test_demo.py."""

from __future__ import annotations

import numpy as np


def brute_force_scores(
    bank, bank_labels, queries, query_labels, *, leave_out=None, recall_at=(1, 5, 10)
):
    bank = np.asarray(bank, np.float64)
    queries = np.asarray(queries, np.float64)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = queries @ bank.T
    recall = {k: 0 for k in recall_at}
    precisions = []
    for q in range(len(queries)):
        order = np.argsort(-similarity[q], kind="stable")  # ties: lower index first
        if leave_out is not None:
            order = order[order != leave_out[q]]
        same = bank_labels[order] == query_labels[q]
        for k in recall_at:
            recall[k] += bool(same[:k].any())
        r = int(same.sum())
        if r:
            hits = same[:r]
            precisions.append(sum(np.sum(hits[: i + 1]) / (i + 1) for i in range(r) if hits[i]) / r)
    scores = {f"recall@{k}": recall[k] / len(queries) for k in recall_at}
    scores["map@r"] = float(np.mean(precisions))
    return scores
