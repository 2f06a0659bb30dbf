"""Figures: training curves of any workdir, test accuracy against the number of labels, and
2-D maps of an embedding (embedding_map.py).

    python -m simclr_jax.plot --workdir=W [--out=FILE.png]      # default W/curves.png
    python -m simclr_jax.plot --embedding=E.npz --method=pca|tsne|umap [--out=FILE.png]
        [--field=features|projection] [--thumbnails=N] [--max_points=5000]

The curves come from the workdir's metrics files (train/metrics.py: one JSON object per line,
{"step": s, name: value, ...}), the training run's and, when present, the evaluation job's
(WORKDIR/eval/metrics.jsonl), so one command plots a pretraining, fine-tuning or distillation
run. Metric names are matched against a small table per panel, with or without a 'train/' or
'eval/' prefix, so renamed metrics still plot; a panel is drawn only if the run logged one of its
names. A step written twice (a resumed run) keeps its newest value. Figures are drawn on
matplotlib `Figure` objects (Agg), never through pyplot, so no global backend is touched.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from absl import flags
from etils import epath
from matplotlib import ticker
from matplotlib.figure import Figure

from simclr_jax import cli, embedding_map
from simclr_jax import embedding_file as files
from simclr_jax.train import metrics as metrics_lib

EVAL_DIR = "eval"  # the evaluation job's folder inside a workdir (train/checkpoint_follower.py)
CURVES_FILE = "curves.png"
PREFIXES = ("", "train/", "eval/")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

Series = dict[str, dict[int, float]]  # metric name -> {step: value}


class NoMetricsError(ValueError):
    """The workdir has no metrics file, or nothing in it that a panel plots."""


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: its title, the metric names it accepts (unprefixed) and its y axis."""

    title: str
    names: tuple[str, ...]
    ylabel: str
    percent: bool = False  # values are fractions, shown in percent
    prefixes: tuple[str, ...] = PREFIXES

    def accepted(self) -> list[str]:
        return [prefix + name for name in self.names for prefix in self.prefixes]


# What each trainer logs today (pretrain.py, finetune.py, distill.py, train/evaluators.py) and the
# same names with the 'train/' / 'eval/' prefixes that distinct train and eval names may take.
PANELS = (
    Panel("Contrastive loss", ("contrastive_loss",), "NT-Xent loss"),
    Panel(
        "Online probe accuracy",
        ("probe_acc", "probe_top1", "eval_probe_top1"),
        "accuracy (%)",
        percent=True,
    ),
    Panel("kNN accuracy", ("knn_top1",), "accuracy (%)", percent=True),
    # Only evaluation names: a 'train/top1' is a training-batch accuracy.
    Panel("Evaluation top-1", ("eval_top1", "top1"), "accuracy (%)", True, ("", "eval/")),
    # train/collapse.py: spread of the normalised projections (about 1/sqrt(d) healthy, 0
    # collapsed) and the effective rank of the backbone features.
    Panel("Projection std (collapse at 0)", ("proj_std",), "std of L2-normalised projection"),
    Panel("Effective rank of the features", ("effective_rank",), "effective rank"),
)


def read_metrics(path: epath.PathLike, series: Series | None = None) -> Series:
    """{name: {step: value}} of the numbers in a metrics.jsonl file (added to `series`).

    Lines are read in order and a later value of the same (name, step) replaces an earlier one,
    so a step logged again after a resume keeps its newest value. Lines cut short by a crash,
    records without a step (hyperparameters) and non-numbers are skipped.
    """
    series = {} if series is None else series
    for line in epath.Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(name, {})[step] = float(value)
    return series


def read_workdir(workdir: epath.PathLike) -> Series:
    """The series of WORKDIR/metrics.jsonl and WORKDIR/eval/metrics.jsonl (either may be absent)."""
    workdir = epath.Path(workdir)
    if not workdir.is_dir():
        raise NoMetricsError(f"{workdir} is not a folder")
    paths = [workdir / metrics_lib.METRICS_FILE, workdir / EVAL_DIR / metrics_lib.METRICS_FILE]
    found = [p for p in paths if p.exists()]
    if not found:
        raise NoMetricsError(f"{workdir} has no {metrics_lib.METRICS_FILE}: is it a run's workdir?")
    series: Series = {}
    for path in found:
        read_metrics(path, series)
    return series


def panels_for(series: Mapping[str, Mapping[int, float]]) -> list[tuple[Panel, list[str]]]:
    """The panels with at least one logged series, each with its metric names found."""
    chosen = []
    for panel in PANELS:
        names = [name for name in panel.accepted() if series.get(name)]
        if names:
            chosen.append((panel, names))
    return chosen


def curves_figure(series: Mapping[str, Mapping[int, float]], title: str = "") -> Figure:
    """A row of panels (PANELS order), each series against step, labelled by its metric name."""
    chosen = panels_for(series)
    if not chosen:
        raise NoMetricsError(
            "no plottable series: none of "
            + ", ".join(name for panel in PANELS for name in panel.names)
            + f" was logged (found: {', '.join(sorted(series)) or 'nothing'})"
        )
    figure = Figure(figsize=(4.2 * len(chosen), 3.6), layout="constrained")
    axes = figure.subplots(1, len(chosen), squeeze=False)[0]
    # One step range for every panel, so a few evaluation points line up with the curves.
    last_step = max((max(series[n]) for _, names in chosen for n in names), default=0)
    for ax, (panel, names) in zip(axes, chosen, strict=True):
        scale = 100.0 if panel.percent else 1.0
        for name, marker in zip(names, MARKERS, strict=False):
            steps = sorted(series[name])
            values = [scale * series[name][s] for s in steps]
            # Markers only for sparse series (evaluations), so a single point shows.
            ax.plot(steps, values, marker=marker if len(steps) <= 30 else None, ms=4, label=name)
        ax.set_title(panel.title)
        ax.set_xlim(0, max(last_step, 1) * 1.03)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def plot_training_curves(workdir: epath.PathLike, out: epath.PathLike | None = None) -> Figure:
    """Writes the training curves of `workdir` to `out` (default WORKDIR/curves.png) as a PNG.

    Returns the figure (its axes' titles name the panels drawn). Raises NoMetricsError (one line)
    when the workdir has no metrics file or nothing plottable in it.
    """
    workdir = epath.Path(workdir)
    figure = curves_figure(read_workdir(workdir), title=workdir.name)
    _save(figure, workdir / CURVES_FILE if out is None else epath.Path(out))
    return figure


def plot_label_efficiency(
    results: Mapping[str, Mapping[int, float]],
    out: epath.PathLike,
    title: str = "Fashion-MNIST: test accuracy against the number of labels",
) -> Figure:
    """Test accuracy (in percent) against the number of labels, log x axis, one line per method.

    results: {method: {number of labels: accuracy as a fraction}}, e.g.
    {"SimCLR fine-tuned": {60: 0.61, 600: 0.78, 6000: 0.86, 60000: 0.92}, ...}; methods are drawn
    in the mapping's order. Returns the figure, written to `out` as a PNG.
    """
    _check_label_results(results)
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.subplots()
    counts = sorted({n for points in results.values() for n in points})
    for (method, points), marker in zip(results.items(), _cycle(MARKERS), strict=False):
        labels = sorted(points)
        ax.plot(labels, [100.0 * points[n] for n in labels], marker=marker, label=method)
    ax.set_xscale("log")
    ax.set_xticks(counts)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda n, _: f"{n:,.0f}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("number of labelled training images (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(figure, epath.Path(out))
    return figure


def _cycle(items: Sequence[str]):
    while True:
        yield from items


def _check_label_results(results: Mapping[str, Mapping[int, float]]) -> None:
    if not results or not any(results.values()):
        raise ValueError("plot_label_efficiency: no results to plot")
    for method, points in results.items():
        for labels, accuracy in points.items():
            if isinstance(labels, bool) or not isinstance(labels, int) or labels < 1:
                raise ValueError(
                    f"plot_label_efficiency: {method!r}: the number of labels must be a positive "
                    f"integer, got {labels!r}"
                )
            if not (isinstance(accuracy, int | float) and 0.0 <= accuracy <= 1.0):
                raise ValueError(
                    f"plot_label_efficiency: {method!r} at {labels} labels: accuracy {accuracy!r} "
                    "is not a fraction in [0, 1] (pass 0.78, not 78)"
                )


def _save(figure: Figure, out: epath.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        figure.savefig(f, format="png", dpi=120)


def main() -> None:
    """The command line (errors the user can fix in one line: simclr_jax.cli)."""
    flags.DEFINE_string("workdir", None, "A pretrain / finetune / distill workdir: its curves.")
    flags.DEFINE_string("embedding", None, "An embedding .npz (embed's, the demo's): its 2-D map.")
    flags.DEFINE_string("out", None, f"PNG to write (default W/{CURVES_FILE} or E_<method>.png).")
    flags.DEFINE_enum("method", "tsne", list(embedding_map.METHODS), "Map: the 2-D projection.")
    flags.DEFINE_enum("field", "features", list(files.FIELDS), "Map: which vectors.")
    flags.DEFINE_integer("thumbnails", 0, "Map: draw this many images at their points.")
    flags.DEFINE_integer("max_points", 5000, "Map: a random subset of at most this many rows.")

    def run(argv: list[str]) -> None:
        del argv
        values = flags.FLAGS
        if (values.workdir is None) == (values.embedding is None):
            raise ValueError("give one of --workdir (training curves) or --embedding (a 2-D map)")
        if values.embedding is not None:
            out, _ = embedding_map.draw_map(
                values.embedding, method=values.method, field=values.field, out=values.out,
                max_points=values.max_points, thumbnails=values.thumbnails,
            )  # fmt: skip
            print(f"wrote {out}")
            return
        figure = plot_training_curves(values.workdir, values.out)
        out = values.out or epath.Path(values.workdir) / CURVES_FILE
        print(f"wrote {out}: {', '.join(ax.get_title() for ax in figure.axes)}")

    cli.run(run)


if __name__ == "__main__":
    main()
