"""The one figure of the experiment, ``label_complexity.png``.

Top row: test error against the number of labels ``n`` for every SNR, supervised and SimCLR +
fine-tuning on the same axes, and the n_0 x SNR diagram of pretraining. Bottom row: the phase
diagrams over SNR x n for both methods, with the fitted supervised boundary and the analysis'
slope ``-q``, and the augmentation ablation.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simclr_jax.theory import analysis  # noqa: E402


def _log_edges(values: list[float]) -> np.ndarray:
    """Cell edges for ``pcolormesh`` on a log axis: geometric midpoints, extended at the ends."""
    v = np.log(np.asarray(values, float))
    if len(v) == 1:
        return np.exp(np.array([v[0] - 0.5, v[0] + 0.5]))
    mid = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]]))


def _heatmap(ax, grid: dict[tuple[float, float], float], xlabel: str, ylabel: str, title: str):
    """Error heatmap over (x, y) keys with the value written in every cell."""
    xs = sorted({x for x, _ in grid})
    ys = sorted({y for _, y in grid})
    z = np.array([[grid.get((x, y), np.nan) for x in xs] for y in ys])
    mesh = ax.pcolormesh(
        _log_edges(xs), _log_edges(ys), z, cmap="RdYlGn_r", vmin=0.0, vmax=0.5, shading="flat"
    )
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            if np.isfinite(z[i, j]):
                ax.text(
                    x,
                    y,
                    f"{z[i, j]:.2f}".lstrip("0") or "0",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=7)
    ax.set_yticks(ys, [f"{y:g}" for y in ys], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return mesh


def _error_curves(ax, records: list[dict], cfg, n0_main: int) -> None:
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(cfg.snr_grid)))
    sup = analysis.seed_mean(records, "last_test_error", method="supervised")
    ssl = analysis.seed_mean(records, "last_test_error", method="simclr", n0=n0_main)
    for colour, snr in zip(colours, cfg.snr_grid, strict=True):
        ns = sorted(n for s, n in sup if s == snr)
        ax.plot(ns, [sup[(snr, n)] for n in ns], "-o", color=colour, ms=3, label=f"{snr:g}")
        ns = sorted(n for s, n in ssl if s == snr)
        ax.plot(ns, [ssl[(snr, n)] for n in ns], "--s", color=colour, ms=3, alpha=0.8)
    ax.plot([], [], "k-o", ms=3, label="supervised")
    ax.plot([], [], "k--s", ms=3, label=f"SimCLR (n0={n0_main}) + FT")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 0.78)
    ax.set_xlabel("labels n")
    ax.set_ylabel("test error (last iterate)")
    ax.set_title("Test error vs labels, one colour per SNR", fontsize=10)
    ax.legend(fontsize=6.5, ncol=4, title="SNR", title_fontsize=7, loc="upper center")
    ax.grid(alpha=0.3)


def _boundary_lines(ax, boundary: dict, q: float, snrs: list[float]) -> None:
    if not boundary["points"]:
        return
    xlim, ylim = ax.get_xlim(), ax.get_ylim()  # keep the heatmap's extent
    xs, ys = zip(*boundary["points"], strict=True)
    ax.plot(xs, ys, "kD", ms=5, label=f"n* (error < {boundary['threshold']:g})")
    if "slope" in boundary:
        grid = np.geomspace(min(snrs), max(snrs), 50)
        fit = np.exp(boundary["intercept"]) * grid ** boundary["slope"]
        ax.plot(grid, fit, "k-", lw=1.5, label=f"fit: slope {boundary['slope']:.2f}")
        centre_x, centre_y = np.exp(np.mean(np.log(xs))), np.exp(np.mean(np.log(ys)))
        theory = centre_y * (grid / centre_x) ** (-q)
        ax.plot(grid, theory, "w--", lw=1.5, label=f"analysis: slope {-q:g}")
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.legend(fontsize=6.5, loc="upper right", framealpha=0.8)


def _ablation(ax, records: list[dict]) -> None:
    rows = [r for r in records if r["method"] == "simclr_ablation"]
    if not rows:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no ablation in this run", ha="center", va="center")
        return
    # Colour = SNR, line style = metric, marker = augmentation kind.
    snrs = sorted({r["snr"] for r in rows})
    kinds = sorted({r["augmentation"] for r in rows})
    colours = dict(zip(snrs, plt.cm.tab10(np.arange(len(snrs))), strict=True))
    markers = dict(zip(kinds, "osv^D", strict=False))
    for kind in kinds:
        for snr in snrs:
            cell = [r for r in rows if r["augmentation"] == kind and r["snr"] == snr]
            strengths = sorted({r["strength"] for r in cell})
            for field, style in (("alignment", "-"), ("last_test_error", "--")):
                values = [
                    np.mean([r[field] for r in cell if r["strength"] == s]) for s in strengths
                ]
                ax.plot(strengths, values, style, marker=markers[kind], color=colours[snr], ms=4)
    for snr in snrs:
        ax.plot([], [], "-", color=colours[snr], label=f"SNR {snr:g}")
    ax.plot([], [], "k-", label="mean |cos(w, mu)|")
    ax.plot([], [], "k--", label="test error")
    for kind in kinds:
        ax.plot([], [], "k", ls="none", marker=markers[kind], label=kind)
    ax.set_xlabel("noise shared by the positives (augmentation strength)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"Realistic augmentations (n0={rows[0]['n0']}, n={rows[0]['n']})", fontsize=10)
    ax.legend(fontsize=7, loc="center left")
    ax.grid(alpha=0.3)


def plot(records: list[dict], cfg, boundary: dict, path: str) -> None:
    """Write the six-panel figure to ``path``."""
    n0_main = max(cfg.n0_grid)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5), constrained_layout=True)
    _error_curves(axes[0, 0], records, cfg, n0_main)

    sup = analysis.seed_mean(records, "last_test_error", method="supervised")
    mesh = _heatmap(axes[1, 0], sup, "SNR", "labels n", "Supervised: test error over SNR x n")
    _boundary_lines(axes[1, 0], boundary, cfg.q, list(cfg.snr_grid))

    ssl = analysis.seed_mean(records, "last_test_error", method="simclr", n0=n0_main)
    _heatmap(axes[1, 1], ssl, "SNR", "labels n", f"SimCLR (n0={n0_main}) + FT: test error")

    n_ref = max(n for n in cfg.simclr_n_grid if n <= 10) if min(cfg.simclr_n_grid) <= 10 else None
    if n_ref is None:
        n_ref = min(cfg.simclr_n_grid)
    by_n0: dict[tuple[float, float], list[float]] = {}
    for r in records:
        if r["method"] == "simclr" and r["n"] == n_ref:
            by_n0.setdefault((r["snr"], r["n0"]), []).append(r["last_test_error"])
    grid = {k: float(np.mean(v)) for k, v in by_n0.items()}
    ax = axes[0, 1]
    _heatmap(ax, grid, "SNR", "unlabeled n0", f"SimCLR + FT with n={n_ref} labels: test error")
    snr_line = np.geomspace(min(cfg.snr_grid), max(cfg.snr_grid), 50)
    for level, style in ((1.0, ":"), (4.0, "--")):
        ax.plot(snr_line, level / snr_line**2, "k" + style, lw=1.2, label=f"n0 SNR^2 = {level:g}")
    ax.set_ylim(*_log_edges(sorted({n0 for _, n0 in grid}))[[0, -1]])
    ax.legend(fontsize=6.5, loc="upper right", framealpha=0.8)

    align = analysis.seed_mean(records, "alignment", method="simclr", n0=n0_main)
    snrs = sorted({s for s, _ in align})
    ax = axes[0, 2]
    for n0 in sorted(cfg.n0_grid):
        values = analysis.seed_mean(records, "alignment", method="simclr", n0=n0)
        first_n = min(n for _, n in values)
        ax.plot(snrs, [values[(s, first_n)] for s in snrs], "-o", ms=3, label=f"n0={n0}")
    ax.set_xscale("log")
    ax.set_xticks(snrs, [f"{s:g}" for s in snrs], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("SNR")
    ax.set_ylabel("mean |cos(w_r, mu)| after pretraining")
    ax.set_ylim(0, 1.02)
    ax.set_title("Pretraining aligns the filters with +-mu", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    _ablation(axes[1, 2], records)
    fig.colorbar(mesh, ax=axes[1, :2], shrink=0.8, label="test error (mean over seeds)")
    fig.suptitle(
        f"Two-layer CNN, d={cfg.dim}, m={cfg.filters_per_sign} filters/sign, q={cfg.q:g}, "
        f"{cfg.seeds} seeds: SimCLR pretraining cuts the labels needed",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
