"""Export parity table: ONNX (onnxruntime) and PyTorch against the JAX model, and torchvision's
resnet50 with and without TF's SAME max-pool (benchmarks/RESULTS.md, "Export parity").

    python benchmarks/export_parity.py      # needs torch, torchvision, onnxruntime, tensorflow

The cases are the tests' (tests/export_cases.py: tiny ResNets and the convnet with measured
BatchNorm statistics; the official R50-1x-SK1/SK0 fixtures converted at real width). Prints one
JSON line per model (export time and size), per (model, images, output) and per torchvision size.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import export_cases  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402  (before TensorFlow: see tests/test_export_torch.py)

from simclr_jax.export import exporters, torch_model  # noqa: E402
from simclr_jax.export import source as source_lib  # noqa: E402

OUTPUTS = ("features", "projection", "logits")


def nchw(images):
    return torch.tensor(images).permute(0, 3, 1, 2)


def measure(root: pathlib.Path, name: str, source, size: int, channels: int, real: int) -> list:
    """Rows {model, images, output, onnx, torch} of relative differences; prints the model's line."""
    start = time.perf_counter()
    exporters.export_onnx(source, str(root / f"{name}.onnx"), "features", None, False)
    onnx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    exporters.export_torch(source, str(root / f"{name}.safetensors"), "features", False)
    torch_seconds = time.perf_counter() - start
    net = torch_model.load(str(root / f"{name}.safetensors"))
    rows = []
    batches = {
        "random": source_lib.test_images(source, 4, seed=3),
        "real": export_cases.real_images(size, channels, real),
    }
    for kind, images in batches.items():
        expected = source.reference(images, OUTPUTS)
        with torch.no_grad():
            found = net.outputs(nchw(images), OUTPUTS)
        for output in OUTPUTS:
            path = root / f"{name}_{output}.onnx"
            exporters.export_onnx(source, str(path), output, None, False)
            onnx_found = exporters.run_onnx(str(path))(images)
            rows.append(dict(
                model=name, images=kind, output=output,
                onnx=source_lib.relative_difference(onnx_found, expected[output]),
                torch=source_lib.relative_difference(found[output].numpy(), expected[output]),
            ))  # fmt: skip
    print(json.dumps(dict(
        model=name, params_M=round(source_lib.parameter_count(source.weights) / 1e6, 2),
        onnx_write_s=round(onnx_seconds, 1),
        onnx_MiB=round(os.path.getsize(root / f"{name}.onnx") / 2**20, 1),
        torch_write_s=round(torch_seconds, 1),
        torch_MiB=round(os.path.getsize(root / f"{name}.safetensors") / 2**20, 1),
    )), flush=True)  # fmt: skip
    return rows


def torchvision_rows(root: pathlib.Path, label: str, workdir: pathlib.Path) -> None:
    """torchvision's resnet50 from a --format=torchvision file, TF max-pool swapped in or not."""
    from safetensors.torch import load_file

    for size in (64, 66, 224, 225):
        source = source_lib.read_source(str(workdir), image_size=size)
        path = root / "torchvision.safetensors"
        exporters.export_torchvision(source, str(path), False)
        images = export_cases.real_images(size, 3, 2)
        expected = source.reference(images, ["logits"])["logits"]
        found = {}
        for swap in (True, False):
            model = exporters.torchvision_resnet(
                torchvision, 50, source.architecture["num_classes"]
            )
            model.load_state_dict(load_file(str(path)))
            if swap:
                model.maxpool = torch_model.SamePadMaxPool2d()
            with torch.no_grad():
                logits = model.eval()(nchw(images)).numpy()
            found[swap] = source_lib.relative_difference(logits, expected)
        print(json.dumps(dict(
            torchvision=label, size=size, stem_side=(size + 1) // 2,
            with_SamePadMaxPool2d=f"{found[True]:.2e}", plain_torchvision=f"{found[False]:.2e}",
        )), flush=True)  # fmt: skip


def main() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="export_parity_"))
    rows = []
    for name in export_cases.TINY:
        _, size, channels = export_cases.CASES[name]
        source = source_lib.read_source(str(export_cases.write_workdir(root, name)))
        rows += measure(root, name, source, size, channels, 4)
    sk1 = export_cases.official_workdir(root, "r50_1x_sk1")
    rows += measure(root, "official_r50_1x_sk1", source_lib.read_source(str(sk1), 64), 64, 3, 4)
    sk0 = export_cases.official_workdir(root, "r50_1x_sk0")
    source = source_lib.read_source(str(sk0), image_size=224)
    rows += measure(root, "official_r50_1x_sk0_224px", source, 224, 3, 2)
    for row in rows:
        print(json.dumps({k: f"{v:.2e}" if isinstance(v, float) else v for k, v in row.items()}))
    print(json.dumps({"max_onnx": max(r["onnx"] for r in rows),
                      "max_torch": max(r["torch"] for r in rows)}))  # fmt: skip
    torchvision_rows(root, "r50_1x run (probe folded)", export_cases.write_workdir(root, "r50_1x"))
    torchvision_rows(root, "official r50_1x_sk0", sk0)


if __name__ == "__main__":
    main()
