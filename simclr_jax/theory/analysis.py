"""Turning the sweep's records into the claims: the success boundary, its slope, and tables.

The supervised boundary: for each SNR, the number of labels ``n*`` at which the seed-mean
last-iterate test error first drops below ``success_error`` (log-linear interpolation between grid
points). The analysis predicts ``n* SNR^q = const``, i.e. a line of slope ``-q`` in log-log axes;
the fit uses only SNRs whose crossing lies inside the ``n`` grid.
"""

from __future__ import annotations

import collections
import math

import numpy as np


def seed_mean(records: list[dict], field: str, **match) -> dict[tuple[float, int], float]:
    """``{(snr, n): mean over seeds of field}`` for the records matching ``match``."""
    groups: dict[tuple[float, int], list[float]] = collections.defaultdict(list)
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            groups[(r["snr"], r["n"])].append(r[field])
    return {key: float(np.mean(values)) for key, values in groups.items()}


def crossing(ns: list[int], errors: list[float], threshold: float) -> float | None:
    """First ``n`` where ``errors`` falls below ``threshold``, interpolated in ``log n``; ``None``
    when it never does or already does at the smallest ``n`` (no crossing inside the grid)."""
    for i in range(1, len(ns)):
        if errors[i] < threshold <= errors[i - 1]:
            frac = (errors[i - 1] - threshold) / (errors[i - 1] - errors[i])
            return math.exp(math.log(ns[i - 1]) + frac * math.log(ns[i] / ns[i - 1]))
        if errors[i - 1] < threshold:
            return None
    return None


def supervised_boundary(records: list[dict], threshold: float, q: float) -> dict:
    """Crossing ``n*`` per SNR and the least-squares slope of ``log n*`` on ``log SNR``."""
    errors = seed_mean(records, "last_test_error", method="supervised")
    snrs = sorted({snr for snr, _ in errors})
    ns = sorted({n for _, n in errors})
    points = []
    for snr in snrs:
        n_star = crossing(ns, [errors[(snr, n)] for n in ns], threshold)
        if n_star is not None:
            points.append((snr, n_star))
    result: dict = {"threshold": threshold, "predicted_slope": -q, "points": points}
    if len(points) >= 2:
        x = np.log([p[0] for p in points])
        y = np.log([p[1] for p in points])
        (slope, intercept), cov = np.polyfit(x, y, 1, cov=len(points) > 2)
        result["slope"] = float(slope)
        result["intercept"] = float(intercept)
        result["slope_stderr"] = float(np.sqrt(cov[0, 0])) if len(points) > 2 else None
        # n* SNR^q at the crossings: constant if the analysis' scaling holds.
        result["n_snr_q"] = [float(n * snr**q) for snr, n in points]
    return result


def _grid_table(values: dict[tuple[float, int], float], fmt: str = "{:.2f}") -> list[str]:
    snrs = sorted({s for s, _ in values})
    ns = sorted({n for _, n in values})
    lines = ["| SNR | " + " | ".join(f"n={n}" for n in ns) + " |"]
    lines.append("|---" * (len(ns) + 1) + "|")
    for snr in snrs:
        cells = [fmt.format(values[(snr, n)]) if (snr, n) in values else "" for n in ns]
        lines.append(f"| {snr:g} | " + " | ".join(cells) + " |")
    return lines


def n0_table(records: list[dict], n: int) -> list[str]:
    """SimCLR+FT last-iterate error and pretraining alignment over ``n_0`` x SNR at ``n`` labels."""
    rows = [r for r in records if r["method"] == "simclr" and r["n"] == n]
    n0s = sorted({r["n0"] for r in rows})
    snrs = sorted({r["snr"] for r in rows})
    lines = [
        "| SNR | " + " | ".join(f"n0={n0}" for n0 in n0s) + " |",
        "|---" * (len(n0s) + 1) + "|",
    ]
    for snr in snrs:
        cells = []
        for n0 in n0s:
            cell = [r for r in rows if r["n0"] == n0 and r["snr"] == snr]
            err = np.mean([r["last_test_error"] for r in cell])
            align = np.mean([r["alignment"] for r in cell])
            cells.append(f"{err:.2f} ({align:.2f})")
        lines.append(f"| {snr:g} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(records: list[dict]) -> list[str]:
    """Alignment and error per augmentation, strength and SNR (mean over seeds)."""
    rows = [r for r in records if r["method"] == "simclr_ablation"]
    if not rows:
        return []
    keys = sorted({(r["augmentation"], r["snr"]) for r in rows})
    strengths = sorted({r["strength"] for r in rows})
    lines = [
        "| augmentation | SNR | " + " | ".join(f"shared {s:g}" for s in strengths) + " |",
        "|---" * (len(strengths) + 2) + "|",
    ]
    for kind, snr in keys:
        cells = []
        for s in strengths:
            cell = [
                r for r in rows if (r["augmentation"], r["snr"], r["strength"]) == (kind, snr, s)
            ]
            err = np.mean([r["last_test_error"] for r in cell])
            align = np.mean([r["alignment"] for r in cell])
            cells.append(f"{err:.2f} ({align:.2f})")
        lines.append(f"| {kind} | {snr:g} | " + " | ".join(cells) + " |")
    return lines


def report(records: list[dict], cfg, boundary: dict) -> str:
    """The printed (and README) summary: markdown tables plus the boundary fit."""
    n0_main = max(cfg.n0_grid)
    n_ref = max(n for n in cfg.simclr_n_grid if n <= 10) if min(cfg.simclr_n_grid) <= 10 else None
    out = ["Supervised: test error (last iterate, mean over seeds)"]
    out += _grid_table(seed_mean(records, "last_test_error", method="supervised"))
    out += ["", "Supervised: best-iterate test error (oracle early stopping)"]
    out += _grid_table(seed_mean(records, "best_test_error", method="supervised"))
    out += ["", "Supervised: final training loss"]
    out += _grid_table(seed_mean(records, "train_loss", method="supervised"), "{:.0e}")
    out += ["", f"SimCLR (n0={n0_main}) + fine-tuning: test error (last iterate)"]
    out += _grid_table(seed_mean(records, "last_test_error", method="simclr", n0=n0_main))
    out += ["", f"SimCLR (n0={n0_main}) + fine-tuning: test loss (last iterate)"]
    out += _grid_table(seed_mean(records, "last_test_loss", method="simclr", n0=n0_main), "{:.0e}")
    if n_ref is not None:
        out += ["", f"SimCLR + fine-tuning with n={n_ref} labels: error (alignment |cos(w, mu)|)"]
        out += n0_table(records, n_ref)
    ablation = ablation_table(records)
    if ablation:
        out += ["", "Augmentation ablation: error (alignment); 'shared' = strength of the noise"]
        out += ablation
    out += ["", f"Supervised success boundary (mean error < {boundary['threshold']}):"]
    for snr, n_star in boundary["points"]:
        out.append(f"  SNR={snr:g}: n*={n_star:.1f}  n* SNR^q={n_star * snr**cfg.q:.2f}")
    if "slope" in boundary:
        err = boundary["slope_stderr"]
        err_text = f" +- {err:.2f}" if err is not None else ""
        out.append(f"  log-log slope {boundary['slope']:.2f}{err_text} (analysis: {-cfg.q:g})")
    else:
        out.append("  fewer than two SNRs cross inside the n grid: no slope")
    return "\n".join(out)
