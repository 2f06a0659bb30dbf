"""simclr_jax.plot: curves of a real tiny run and of a hand-written metrics file (the real writer's
format), the label-efficiency figure, and one-line errors for bad input."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import forked_commands
import numpy as np
import pytest

from simclr_jax import plot
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import fashion_mnist
from simclr_jax.train import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 120  # plot._save


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def lines_by_label(figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
        for ax in figure.axes
        for line in ax.get_lines()
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not fashion_mnist.available():
        pytest.fail("needs the Fashion-MNIST files: apt-get install dataset-fashion-mnist")
    workdir = tmp_path_factory.mktemp("tiny_run")
    # The same flags as tests/test_pretrain.py's CLI test: the compilation cache serves both.
    result = subprocess.run(
        [
            sys.executable, "-m", "simclr_jax.pretrain",
            f"--config={pretrain_fashion_mnist.__file__}:tiny", f"--workdir={workdir}",
            "--config.num_steps=3", "--config.dataset.train_split=train[:1024]",
            "--config.dataset.eval_split=test[:300]",
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_cli_plots_a_real_run(tiny_run):
    result = subprocess.run(
        [sys.executable, "-m", "simclr_jax.plot", f"--workdir={tiny_run}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tiny_run / "curves.png"
    assert str(out) in result.stdout
    # A pretraining run logs the contrastive loss and the probe (training batches and the
    # exact evaluation at the end); it has no classifier evaluation.
    assert "Contrastive loss" in result.stdout and "Online probe accuracy" in result.stdout
    assert "Evaluation top-1" not in result.stdout
    width, height = png_size(out)
    panels = len(result.stdout.split(": ", 1)[1].split(", "))
    assert (width, height) == (round(4.2 * panels * DPI), round(3.6 * DPI))
    assert out.stat().st_size > 20_000  # drawn curves and text, not an empty canvas


def test_real_run_series_match_the_metrics_file(tiny_run, tmp_path):
    figure = plot.plot_training_curves(tiny_run, out=tmp_path / "sub" / "c.png")
    assert png_size(tmp_path / "sub" / "c.png")[0] == round(4.2 * len(figure.axes) * DPI)
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    expected_loss = {r["step"]: r["contrastive_loss"] for r in records if "contrastive_loss" in r}
    probe_top1 = {r["step"]: r["eval_probe_top1"] for r in records if "eval_probe_top1" in r}
    lines = lines_by_label(figure)
    steps, values = lines["contrastive_loss"]
    assert dict(zip(steps.tolist(), values.tolist(), strict=True)) == expected_loss
    steps, values = lines["eval_probe_top1"]  # a fraction in the file, percent on the axis
    assert steps.tolist() == [3]
    np.testing.assert_allclose(values, [100 * probe_top1[3]])


def test_hand_written_metrics_newest_record_wins_and_prefixes_are_read(tmp_path):
    """A resumed run's repeated steps, a line cut short by a crash, 'train/' and 'eval/' names,
    the evaluation job's eval/metrics.jsonl, and a distillation-style eval_top1."""
    writer = metrics.JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write_hparams({"batch_size": 32})
    for step in (1, 2, 3, 4):
        writer.write_scalars(step, {"train/contrastive_loss": 5.0 - step, "learning_rate": 0.1})
    for step in (3, 4):  # resumed from step 2: steps 3 and 4 again, with other values
        writer.write_scalars(step, {"train/contrastive_loss": 10.0 + step})
    writer.write_scalars(4, {"eval_top1": 0.25, "eval_count": 200})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/contrastive_loss": 0.')  # cut short
    eval_writer = metrics.JsonlWriter(tmp_path / "eval" / "metrics.jsonl")
    eval_writer.write_scalars(2, {"eval/knn_top1": 0.5})
    eval_writer.write_scalars(4, {"eval/knn_top1": 0.625})
    eval_writer.close()

    figure = plot.plot_training_curves(tmp_path)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["Contrastive loss", "kNN accuracy", "Evaluation top-1"]
    lines = lines_by_label(figure)
    assert set(lines) == {"train/contrastive_loss", "eval/knn_top1", "eval_top1"}
    steps, values = lines["train/contrastive_loss"]
    assert steps.tolist() == [1, 2, 3, 4] and values.tolist() == [4.0, 3.0, 13.0, 14.0]
    assert lines["eval/knn_top1"][1].tolist() == [50.0, 62.5]
    assert lines["eval_top1"][0].tolist() == [4] and lines["eval_top1"][1].tolist() == [25.0]
    assert png_size(tmp_path / "curves.png") == (round(4.2 * 3 * DPI), round(3.6 * DPI))


def test_label_efficiency_figure(tmp_path):
    results = {
        "SimCLR fine-tuned": {60: 0.62, 600: 0.79, 6000: 0.87, 60000: 0.92},
        "SimCLR linear": {60: 0.6, 600: 0.75, 6000: 0.83, 60000: 0.86},
        "supervised from scratch": {600: 0.7, 60: 0.45, 6000: 0.85, 60000: 0.915},
        "raw-pixel logistic regression": {60: 0.55, 600: 0.73, 6000: 0.8, 60000: 0.84},
    }
    out = tmp_path / "label_efficiency.png"
    figure = plot.plot_label_efficiency(results, str(out), title="t")
    assert png_size(out) == (round(6.4 * DPI), round(4.4 * DPI))
    (ax,) = figure.axes
    assert ax.get_xscale() == "log" and ax.get_title() == "t"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(results)
    lines = ax.get_lines()
    assert len({line.get_marker() for line in lines}) == 4
    scratch = lines[2]  # sorted by the number of labels, in percent
    assert scratch.get_xdata().tolist() == [60, 600, 6000, 60000]
    np.testing.assert_allclose(scratch.get_ydata(), [45.0, 70.0, 85.0, 91.5])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["60", "600", "6,000", "60,000"]


@pytest.mark.parametrize(
    "results, message",
    [
        ({}, "no results"),
        ({"a": {600: 78.0}}, "not a fraction"),
        ({"a": {0: 0.5}}, "positive integer"),
    ],
)
def test_label_efficiency_rejects_bad_results(tmp_path, results, message):
    with pytest.raises(ValueError, match=message):
        plot.plot_label_efficiency(results, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def one_line(err: str) -> str:
    """The command's error line (absl may log a line or two before it)."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("simclr_jax.plot: error: "), err
    return last


def run_mains(*runs: list[str]) -> list[tuple[int, str, str]]:
    """Several `python -m simclr_jax.plot` runs side by side (tests/forked_commands.py)."""
    done = forked_commands.run([["simclr_jax.plot", *argv] for argv in runs], cwd=ROOT)
    return [(result.returncode, result.stdout, result.stderr) for result in done]


def test_folder_without_metrics_says_so_in_one_line(tmp_path):
    (code, out, err), (missing, _, missing_err) = run_mains(
        [f"--workdir={tmp_path}"], [f"--workdir={tmp_path / 'missing'}"]
    )
    assert code == 1 and out == ""
    last = one_line(err)
    assert "has no metrics.jsonl" in last and str(tmp_path) in last
    assert missing == 1 and "is not a folder" in one_line(missing_err)
    assert not (tmp_path / "curves.png").exists()


def test_metrics_without_plottable_series_say_so_in_one_line(tmp_path):
    writer = metrics.JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write_hparams({"batch_size": 32})
    writer.write_scalars(1, {"learning_rate": 0.1, "steps_per_sec": 3.0})
    writer.close()
    ((code, out, err),) = run_mains([f"--workdir={tmp_path}", f"--out={tmp_path / 'c.png'}"])
    assert code == 1 and out == ""
    last = one_line(err)
    assert "no plottable series" in last and "learning_rate, steps_per_sec" in last
    assert not (tmp_path / "c.png").exists()


def test_collapse_monitor_series_get_their_panels(tmp_path):
    writer = metrics.JsonlWriter(tmp_path / "metrics.jsonl")
    for step in (10, 20):
        writer.write_scalars(
            step, {"contrastive_loss": 1.0, "proj_std": 0.08, "effective_rank": 30.0}
        )
    writer.close()
    figure = plot.plot_training_curves(tmp_path)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [
        "Contrastive loss",
        "Projection std (collapse at 0)",
        "Effective rank of the features",
    ]
    assert lines_by_label(figure)["effective_rank"][1].tolist() == [30.0, 30.0]


def clustered_embedding(path, n_per_class: int = 60) -> np.ndarray:
    """Three well-separated classes in 16 dims, with labels, names and thumbnails."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n_per_class)
    centers = 5 * np.eye(16)[:3]
    vectors = centers[labels] + rng.normal(size=(len(labels), 16))
    thumbnails = (
        np.repeat((labels * 100)[:, None, None, None], 8, axis=1).repeat(8, 2).astype(np.uint8)
    )
    np.savez(path, features=vectors.astype(np.float32), labels=labels,
             label_names=np.asarray(["a", "b", "c"]), thumbnails=thumbnails)  # fmt: skip
    return vectors


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_map_scatters_each_class(tmp_path, method):
    from simclr_jax import embedding_map

    vectors = clustered_embedding(tmp_path / "e.npz")
    out, figure = embedding_map.draw_map(str(tmp_path / "e.npz"), method=method, thumbnails=5)
    assert out == str(tmp_path / f"e_{method}.png") and png_size(tmp_path / f"e_{method}.png")
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    points = [c.get_offsets() for c in ax.collections]
    assert [len(p) for p in points] == [60, 60, 60]
    # The classes stay apart: each class's centre is nearer its own points than the others'.
    centres = np.array([p.mean(0) for p in points])
    for c, p in enumerate(points):
        distances = np.linalg.norm(p[:, None] - centres[None], axis=-1)
        assert (distances.argmin(1) == c).mean() > 0.95
    if method == "pca":  # against NumPy's SVD of the centred, normalised vectors (up to sign)
        x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        x = x - x.mean(0)
        expected = x @ np.linalg.svd(x, full_matrices=False)[2][:2].T
        found = np.concatenate(points)
        np.testing.assert_allclose(np.abs(found), np.abs(expected), rtol=1e-4, atol=1e-5)


def test_embedding_map_command_and_its_errors(tmp_path):
    embedding = f"--embedding={tmp_path / 'e.npz'}"
    clustered_embedding(tmp_path / "e.npz")
    no_umap = importlib.util.find_spec("umap") is None
    drawn, wrong_field, two_inputs, *umap = run_mains(
        [embedding, "--method=pca", f"--out={tmp_path / 'm.png'}"],
        [embedding, "--field=projection"],
        [embedding, f"--workdir={tmp_path}"],
        *([[embedding, "--method=umap"]] if no_umap else []),
    )
    code, out, err = drawn
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'm.png'}" and png_size(tmp_path / "m.png")
    assert wrong_field[0] == 1 and "has no 'projection' array" in one_line(wrong_field[2])
    assert two_inputs[0] == 1 and "give one of --workdir" in one_line(two_inputs[2])
    for code, _, err in umap:  # without the extra: one line naming it
        assert code == 1 and "pip install 'simclr_jax[umap]'" in one_line(err)
