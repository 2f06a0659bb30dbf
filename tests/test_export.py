"""simclr_jax.export to ONNX, run by onnxruntime, against the JAX model: every output of R50,
R50-SK, a CIFAR-stem R18 with squeeze-excitation and the convnet, on random and real
(Fashion-MNIST) images and at two batch sizes through one graph; an official SimCLRv2 R50-SK1
(real width) imported with simclr_jax.convert, against JAX and against the official TF1 outputs;
a wrong max-pool padding is caught; the command's one-line errors."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import export_cases
import numpy as np
import onnx
import pytest

from simclr_jax.data import fashion_mnist
from simclr_jax.export import architecture, exporters, torch_state
from simclr_jax.export import source as source_lib

ROOT = export_cases.FIXTURES.parents[2]

needs_data = pytest.mark.skipif(
    not fashion_mnist.available(), reason="needs the Fashion-MNIST files (dataset-fashion-mnist)"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_workdirs")
    return functools.cache(lambda name: export_cases.write_workdir(root, name))


@needs_data
@pytest.mark.parametrize("name", export_cases.TINY)
def test_onnx_outputs_match_jax_on_random_and_real_images(name, workdir, tmp_path):
    source = source_lib.read_source(str(workdir(name)))
    _, size, channels = export_cases.CASES[name]
    outputs = ["features", "head_1", "projection", "logits"]
    batches = {
        "random": source_lib.test_images(source, count=2, seed=1),
        "real": export_cases.real_images(size, channels, count=5),
    }
    for output in outputs:
        path = tmp_path / f"{output}.onnx"
        done = exporters.export_onnx(source, str(path), output, batch=None, verify=True)
        assert done.files == [str(path)] and done.parity <= export_cases.TOLERANCE
        run = exporters.run_onnx(str(path))
        for kind, images in batches.items():  # batch 2 and 5 through one graph
            expected = source.reference(images, [output])[output]
            export_cases.assert_close(run(images), expected, f"{name} {output} {kind}")


def test_onnx_graph_states_its_input_and_preprocessing(workdir, tmp_path):
    source = source_lib.read_source(str(workdir("r18")), image_size=72)
    path = tmp_path / "r18.onnx"
    exporters.export_onnx(source, str(path), "projection", batch=None, verify=True)
    model = onnx.load(str(path))
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 72, 72, 3]
    (graph_output,) = model.graph.output
    assert graph_output.name == "projection"
    assert [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim] == [
        "batch",
        128,
    ]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["input_layout"] == "NHWC" and meta["input_size"] == "72"
    assert meta["input_range"].startswith("[0, 1] float32") and meta["output"] == "projection"
    assert meta["source_step"] == "7" and "centre crop" in meta["preprocessing"]
    # Inference mode: no training-only operator, BatchNorm on its moving statistics.
    ops = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" in ops and not ops & {"Dropout", "ReduceVariance"}
    # A fixed batch is a fixed first dimension.
    exporters.export_onnx(source, str(path), "features", batch=4, verify=True)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 4


def test_a_wrong_max_pool_padding_fails_the_parity_check(workdir, tmp_path, monkeypatch):
    """torch's symmetric MaxPool2d(3, 2, padding=1) instead of TF SAME (0 before, 1 after on an
    even side): the export's own check refuses it, and the difference is far beyond 1e-4."""
    source = source_lib.read_source(str(workdir("r18")))  # 64 px: a 32-pixel stem map
    same_pads = architecture.same_pads
    symmetric = lambda size, window, stride: (
        (1, 1) if window == 3 else same_pads(size, window, stride)
    )  # noqa: E731
    monkeypatch.setattr(architecture, "same_pads", symmetric)
    with pytest.raises(RuntimeError, match="differs from the JAX model"):
        exporters.export_onnx(source, str(tmp_path / "wrong.onnx"), "features", None, True)
    exporters.export_onnx(source, str(tmp_path / "wrong.onnx"), "features", None, False)
    images = source_lib.test_images(source, count=2, seed=1)
    expected = source.reference(images, ["features"])["features"]
    wrong = exporters.run_onnx(str(tmp_path / "wrong.onnx"))(images)
    assert source_lib.relative_difference(wrong, expected) > 100 * export_cases.TOLERANCE


@pytest.fixture(scope="module")
def official_sk1(tmp_path_factory):
    return export_cases.official_workdir(tmp_path_factory.mktemp("official"), "r50_1x_sk1")


@needs_data
def test_official_r50_sk1_exports_with_the_official_outputs(official_sk1, tmp_path):
    """TF1 checkpoint -> simclr_jax.convert -> ONNX at real width (35M parameters): equal to
    JAX on random and real images, and to the official TF1 graph's outputs."""
    source = source_lib.read_source(str(official_sk1), image_size=64)
    assert source.architecture["sk"] and source.architecture["resnet_d"]
    assert source_lib.parameter_count(source.weights) > 30e6
    images, official = export_cases.official_reference("r50_1x_sk1")
    real = export_cases.real_images(64, 3, count=3)
    for output in ("features", "projection", "logits"):
        path = tmp_path / f"{output}.onnx"
        exporters.export_onnx(source, str(path), output, batch=None, verify=True)
        run = exporters.run_onnx(str(path))
        # The generator's two noise images differ by ~0.4% of the scale at the features.
        export_cases.assert_close(run(images), official[output], f"{output} vs TF1", spread=1e-3)
        expected = source.reference(real, [output])[output]
        export_cases.assert_close(run(real), expected, f"{output} vs JAX, real images")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("r18", "projection shortcut"),
        ("r50_sk", "selective kernels"),
        ("r50", "1x (base width 64)"),
        ("r18_cifar_se", "squeeze-excitation"),
        ("convnet", "the convnet"),
    ],
)
def test_torchvision_names_are_refused_where_the_layers_differ(name, reason, workdir):
    source = source_lib.read_source(str(workdir(name)))
    assert reason in torch_state.torchvision_refusal(source.architecture)
    with pytest.raises(ValueError, match="--format=torchvision: .*; use --format=torch"):
        torch_state.torchvision_state(source.weights, source.architecture)


# ----------------------------------------------------------------------------- the command


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.export", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env or os.environ.copy(),
    )  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("simclr_jax.export: error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def test_the_command_exports_and_checks_a_workdir(workdir, tmp_path):
    out = tmp_path / "convnet.onnx"
    result = run_cli(
        f"--workdir={workdir('convnet')}", "--format=onnx", f"--out={out}", "--output=logits"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and "against JAX: max difference" in result.stdout
    assert onnx.load(str(out)).graph.output[0].name == "logits"


def test_the_command_errors_in_one_line(workdir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "x.onnx")
    result = run_cli(f"--workdir={empty}", "--format=onnx", f"--out={out}")
    assert_one_line_error(result, "holds no checkpoints")
    result = run_cli(f"--workdir={workdir('convnet')}", "--format=onnx", f"--out={out}",
                     "--output=pooled")  # fmt: skip
    assert_one_line_error(result, "--output='pooled'", "features, projection, logits, head_0..")
    assert not os.path.exists(out)
    # Without PyTorch (here: a `torch` that fails to import, as a missing one does).
    shadow = tmp_path / "no_torch"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]),
    }
    result = run_cli(f"--workdir={workdir('convnet')}", "--format=torch",
                     f"--out={tmp_path / 'x.safetensors'}", env=env)  # fmt: skip
    assert_one_line_error(result, "torch", "pip install torch", "--noverify")


def test_the_torch_file_holds_every_weight_in_torch_layout(workdir, tmp_path):
    """Read back without PyTorch (safetensors' NumPy reader): kernels OIHW and [out, in], BatchNorm
    as weight/bias/running_*, the description in the metadata (so this runs in CI too)."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file

    source = source_lib.read_source(str(workdir("r50_sk")))
    path = tmp_path / "r50_sk.safetensors"
    exporters.export_torch(source, str(path), "logits", verify=False)
    stored = load_file(str(path))
    for key, value in source.weights.items():
        collection, rest = key.split("/", 1)
        layer, leaf = rest.rsplit("/", 1)
        name = layer.replace("/", ".") + "." + {
            "kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var",
        }[leaf]  # fmt: skip
        expected = value
        if leaf == "kernel":
            expected = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        np.testing.assert_array_equal(stored[name], expected, err_msg=key)
    assert stored["backbone.stem.bn1.num_batches_tracked"].shape == ()
    with safe_open(str(path), framework="numpy") as file:
        described = json.loads(file.metadata()["simclr_jax"])
    assert described["architecture"] == source.architecture and described["output"] == "logits"
