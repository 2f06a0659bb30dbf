"""simclr_jax.export --format=torch / torchvision against the JAX model, where PyTorch is
installed (skipped, as a module, where it is not: torch is an optional extra; the README's
results say where this file was run). The torch module imports no JAX; every output of the tiny
cases and of the official R50-SK1 (real width, also against the official TF1 outputs) matches;
a wrong max-pool padding is caught; torchvision's ResNet-50 takes a plain 1x network's weights
under its own names and equals it once its max-pool pads as TF does (and only then, at an even
stem side)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import export_cases
import numpy as np
import pytest

from simclr_jax.data import fashion_mnist
from simclr_jax.export import architecture, exporters
from simclr_jax.export import source as source_lib

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra (simclr_jax[torch])")
try:  # before TensorFlow (the official cases write TF checkpoints): torchvision 0.29 imported
    import torchvision  # after TF 2.21 crashes the process (in triton's import)
except ImportError:
    torchvision = None
from simclr_jax.export import torch_model  # noqa: E402  (imports torch)

needs_data = pytest.mark.skipif(
    not fashion_mnist.available(), reason="needs the Fashion-MNIST files (dataset-fashion-mnist)"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_workdirs")
    return functools.cache(lambda name: export_cases.write_workdir(root, name))


def nchw(images: np.ndarray):
    return torch.tensor(images).permute(0, 3, 1, 2)


@needs_data
@pytest.mark.parametrize("name", export_cases.TINY)
def test_torch_outputs_match_jax_on_random_and_real_images(name, workdir, tmp_path):
    source = source_lib.read_source(str(workdir(name)))
    _, size, channels = export_cases.CASES[name]
    path = tmp_path / f"{name}.safetensors"
    done = exporters.export_torch(source, str(path), "projection", verify=True)
    assert done.parity <= export_cases.TOLERANCE
    net = torch_model.load(str(path))
    assert not net.training and net.output == "projection"
    names = ["features", "head_1", "projection", "logits"]
    for kind, images in {
        "random": source_lib.test_images(source, count=2, seed=1),
        "real": export_cases.real_images(size, channels, count=5),
    }.items():
        with torch.no_grad():
            found = net.outputs(nchw(images), names)
        expected = source.reference(images, names)
        for output in names:
            export_cases.assert_close(found[output], expected[output], f"{name} {output} {kind}")


def test_the_state_dict_is_torch_layout_and_trains_like_the_run(workdir, tmp_path):
    source = source_lib.read_source(str(workdir("r50_sk")))
    path = tmp_path / "r50_sk.safetensors"
    exporters.export_torch(source, str(path), "features", verify=False)
    net = torch_model.load(str(path))
    state = net.state_dict()
    flax = source.weights["params/backbone/block_group2/block1/sk_conv/conv/kernel"]  # HWIO
    torch_kernel = state["backbone.block_group2.block1.sk_conv.conv.weight"].numpy()  # OIHW
    np.testing.assert_array_equal(torch_kernel, flax.transpose(3, 2, 0, 1))
    bn = net.get_submodule("backbone.stem.bn1")
    assert bn.eps == source.architecture["bn_epsilon"] and bn.momentum == pytest.approx(0.1)
    # Every weight of the checkpoint is in the module, once (+ torch's num_batches_tracked).
    assert len(state) == len(source.weights) + sum(k.endswith("/mean") for k in source.weights) + 1
    last = net.get_submodule("head.bn3")  # no offset in the reference head: zero and frozen
    assert not last.bias.requires_grad and not torch.any(last.bias)


def test_the_torch_module_imports_no_jax(workdir, tmp_path):
    source = source_lib.read_source(str(workdir("r18")))
    path = tmp_path / "r18.safetensors"
    exporters.export_torch(source, str(path), "logits", verify=False)
    code = (
        "import sys, torch\n"
        "from simclr_jax.export.torch_model import load\n"
        f"net = load({str(path)!r})\n"
        "print(tuple(net(torch.rand(2, 3, 64, 64)).shape))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=os.environ.copy())  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["(2, 10)", "[]"]


def test_a_wrong_max_pool_padding_fails_the_torch_parity_check(workdir, tmp_path, monkeypatch):
    source = source_lib.read_source(str(workdir("r50_sk")))
    same_pads = architecture.same_pads
    symmetric = lambda size, window, stride: (
        (1, 1) if window == 3 else same_pads(size, window, stride)
    )  # noqa: E731
    monkeypatch.setattr(architecture, "same_pads", symmetric)
    with pytest.raises(RuntimeError, match="PyTorch export's 'features' differs"):
        exporters.export_torch(source, str(tmp_path / "wrong.safetensors"), "features", True)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return functools.cache(lambda arch: export_cases.official_workdir(root, arch))


@needs_data
def test_official_r50_sk1_in_torch_gives_the_official_outputs(official, tmp_path):
    source = source_lib.read_source(str(official("r50_1x_sk1")), image_size=64)
    path = tmp_path / "r50_1x_sk1.safetensors"
    exporters.export_torch(source, str(path), "features", verify=True)
    net = torch_model.load(str(path))
    images, reference = export_cases.official_reference("r50_1x_sk1")
    real = export_cases.real_images(64, 3, count=3)
    expected = source.reference(real, list(reference))
    with torch.no_grad():
        found = net.outputs(nchw(images), list(reference))
        found_real = net.outputs(nchw(real), list(reference))
    for output in reference:
        export_cases.assert_close(found[output], reference[output], f"{output} vs TF1", spread=1e-3)
        export_cases.assert_close(
            found_real[output], expected[output], f"{output} vs JAX, real images"
        )


def torchvision_model(path, depth: int, classes: int, *, tf_pool: bool):
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    from safetensors.torch import load_file

    model = exporters.torchvision_resnet(torchvision, depth, classes)
    model.load_state_dict(load_file(str(path)), strict=True)
    if tf_pool:
        model.maxpool = torch_model.SamePadMaxPool2d()
    return model.eval()


@needs_data
def test_torchvision_resnet50_takes_a_plain_run_and_its_probe(workdir, tmp_path):
    """`torchvision.models.resnet50(num_classes=10).load_state_dict(...)` (strict) takes a 1x
    ResNet-50 pretraining run; its fc is the online probe with the probe's input BatchNorm
    folded in. Equal outputs need TF's SAME max-pool at an even stem side (64 px -> 32);
    at an odd one (66 px -> 33) both paddings are the same."""
    source = source_lib.read_source(str(workdir("r50_1x")))
    path = tmp_path / "tv.safetensors"
    done = exporters.export_torchvision(source, str(path), verify=True)
    assert done.output == "logits" and done.parity <= export_cases.TOLERANCE
    assert "resnet50(num_classes=10).load_state_dict" in done.note
    for size, same_without_swap in ((64, False), (66, True)):
        images = export_cases.real_images(size, 3, count=3)
        expected = source.reference(images, ["logits", "features"])["logits"]
        with torch.no_grad():
            swapped = torchvision_model(path, 50, 10, tf_pool=True)(nchw(images))
            plain = torchvision_model(path, 50, 10, tf_pool=False)(nchw(images)).numpy()
        export_cases.assert_close(swapped, expected, f"torchvision + SamePadMaxPool2d at {size} px")
        plain_difference = source_lib.relative_difference(plain, expected)
        assert (plain_difference <= export_cases.TOLERANCE) == same_without_swap, (
            size,
            plain_difference,
        )


@needs_data
def test_torchvision_takes_the_official_r50_1x_sk0(official, tmp_path):
    source = source_lib.read_source(str(official("r50_1x_sk0")), image_size=64)
    path = tmp_path / "tv_official.safetensors"
    exporters.export_torchvision(source, str(path), verify=True)
    images, reference = export_cases.official_reference("r50_1x_sk0")
    model = torchvision_model(path, 50, 1000, tf_pool=True)
    with torch.no_grad():
        export_cases.assert_close(
            model(nchw(images)), reference["logits"], "logits vs TF1", spread=1e-3
        )
