"""Stratified label subsets (1%, 10%, any fraction) for semi-supervised fine-tuning and evaluation.

The subset is a pure function of (labels, fraction, seed): every host computes the same indices with no
communication, and a rerun picks the same examples.
"""

from __future__ import annotations

import numpy as np


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of `fraction` of the examples of every class (at least one per class)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))
