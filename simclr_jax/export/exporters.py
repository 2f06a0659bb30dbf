"""Write a workdir's network as ONNX, as a PyTorch file, or under torchvision's names, and check
each against the JAX model (onnxruntime, PyTorch) before saying it is done."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np

from simclr_jax.export import METADATA_KEY, torch_state
from simclr_jax.export import architecture as arch_lib
from simclr_jax.export import source as source_lib

FORMATS = ("onnx", "torch", "torchvision")
EXTRAS_HINT = "pip install 'simclr_jax[export]'"


@dataclasses.dataclass(frozen=True)
class Exported:
    """What an export wrote, and how far it is from the JAX model (None: not checked)."""

    files: list[str]
    output: str
    parity: float | None
    note: str = ""


def _require(module: str, why: str, hint: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{why} needs the {module} package, which is not installed: {hint}"
        ) from None


def check_dependencies(export_format: str, verify: bool) -> None:
    """One-line ImportErrors for a missing optional package, before anything slow."""
    if export_format not in FORMATS:
        raise ValueError(f"--format={export_format!r}: allowed: {', '.join(FORMATS)}")
    if export_format == "onnx":
        _require("onnx", "--format=onnx", EXTRAS_HINT)
        if verify:
            _require("onnxruntime", "checking the ONNX export", EXTRAS_HINT + " (or --noverify)")
        return
    _require("safetensors", f"--format={export_format}", EXTRAS_HINT)
    if verify:
        _require(
            "torch",
            f"checking the --format={export_format} export",
            "pip install torch (or pass --noverify to write it unchecked)",
        )


def parse_batch(batch: str) -> int | None:
    """--batch: 'dynamic' (None) or a positive integer."""
    if batch == "dynamic":
        return None
    if not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"--batch={batch!r}: allowed: dynamic or a positive integer")
    return int(batch)


def export_onnx(
    source: source_lib.ExportSource, out: str, output: str, batch: int | None, verify: bool
) -> Exported:
    from simclr_jax.export import onnx_graph

    arch_lib.check_output(output, source.architecture)
    model = onnx_graph.build_onnx(
        source.architecture,
        source.weights,
        output=output,
        image_size=source.image_size,
        channels=source.channels,
        batch=batch,
        metadata={
            **source.metadata(output, "dynamic" if batch is None else str(batch)),
            "input_layout": "NHWC",
            "architecture": json.dumps(source.architecture),
        },
    )
    files = onnx_graph.save(model, out)
    if not verify:
        return Exported(files, output, None)
    return Exported(files, output, _check(run_onnx(out), source, output, batch, "ONNX"))


def run_onnx(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime session of `path` as a function of NHWC images (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _check(run_export, source, output: str, batch: int | None, what: str) -> float:
    images = source_lib.test_images(source, count=batch or 2)
    return source_lib.check_parity(run_export, source, output, images, what)


def _torch_metadata(source: source_lib.ExportSource, output: str, layout: str) -> dict[str, str]:
    metadata = {**source.metadata(output, "dynamic"), "input_layout": layout}
    description = {
        "architecture": source.architecture,
        "output": output,
        "bn_momentum": float(source.model.bn_momentum),
        **{key: metadata[key] for key in ("input_range", "input_size", "preprocessing")},
    }
    return {**metadata, METADATA_KEY: json.dumps(description)}


def export_torch(source: source_lib.ExportSource, out: str, output: str, verify: bool) -> Exported:
    from safetensors.numpy import save_file

    arch_lib.check_output(output, source.architecture)
    save_file(torch_state.torch_state(source.weights), out, _torch_metadata(source, output, "NCHW"))
    if not verify:
        return Exported([out], output, None)
    from simclr_jax.export import torch_model

    net = torch_model.load(out)
    return Exported([out], output, _check(_torch_runner(net), source, output, None, "PyTorch"))


def _torch_runner(net) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()

    return run


def export_torchvision(source: source_lib.ExportSource, out: str, verify: bool) -> Exported:
    from safetensors.numpy import save_file

    state, with_fc = torch_state.torchvision_state(source.weights, source.architecture)
    output = "logits" if with_fc else "features"
    metadata = {**source.metadata(output, "dynamic"), "input_layout": "NCHW"}
    save_file(state, out, metadata)
    depth = source.architecture["depth"]
    classes = source.architecture["num_classes"]
    note = (
        f"torchvision.models.resnet{depth}(num_classes={classes}).load_state_dict(...)"
        if with_fc
        else f"m = torchvision.models.resnet{depth}(); m.fc = torch.nn.Identity(); "
        "m.load_state_dict(...) (the classifier reads a projection-head layer: no fc)"
    )
    note += "; set m.maxpool = simclr_jax.export.torch_model.SamePadMaxPool2d() for TF's padding"
    if not verify:
        return Exported([out], output, None, note)
    return Exported([out], output, _check_torchvision(out, source, output, with_fc), note)


def _check_torchvision(out: str, source, output: str, with_fc: bool) -> float:
    """Parity of torchvision's ResNet (TF SAME max-pool swapped in) loaded from `out`."""
    _require("torchvision", "checking --format=torchvision", "pip install torchvision")
    import torch
    import torchvision
    from safetensors.torch import load_file

    from simclr_jax.export import torch_model

    model = torchvision_resnet(
        torchvision, source.architecture["depth"], source.architecture["num_classes"]
    )
    if not with_fc:
        model.fc = torch.nn.Identity()
    model.load_state_dict(load_file(out), strict=True)
    model.maxpool = torch_model.SamePadMaxPool2d()
    return _check(_torch_runner(model.eval()), source, output, None, "torchvision")


def torchvision_resnet(torchvision, depth: int, num_classes: int):
    """torchvision's ResNet of `depth` (200 has no constructor there: built from its blocks)."""
    if depth == 200:
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, list(arch_lib.BLOCKS_PER_GROUP[200]), num_classes=num_classes)
    return getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
