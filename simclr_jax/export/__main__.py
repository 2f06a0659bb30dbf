"""python -m simclr_jax.export --workdir=W --format=onnx|torch|torchvision --out=PATH
    [--output=features|projection|logits|head_K] [--image_size=N] [--batch=dynamic|N] [--noverify]

Exports the newest checkpoint of any stage's workdir (converted official models included), in
inference mode, and checks the file against the JAX model on random images (onnxruntime or
PyTorch; an export that differs by more than 1e-4 of the output's scale is an error).
  onnx         one graph, NHWC float32 input in [0, 1] at --image_size, a dynamic batch axis;
               the preprocessing and the architecture are in the model's metadata.
  torch        a safetensors state dict for simclr_jax.export.torch_model (no JAX needed there).
  torchvision  the same weights under torchvision's ResNet names (plain ResNet-50 and deeper).
"""

from __future__ import annotations

from absl import flags

from simclr_jax import cli
from simclr_jax.export import exporters
from simclr_jax.export import source as source_lib


def main() -> None:
    """The command line (errors the user can fix in one line: simclr_jax.cli)."""
    flags.DEFINE_string("workdir", None, "Any simclr_jax workdir (or a converted official model).")
    flags.DEFINE_string("format", None, f"One of {', '.join(exporters.FORMATS)}.")
    flags.DEFINE_string("out", None, "File to write (.onnx or .safetensors).")
    flags.DEFINE_string(
        "output", "features", "features, projection, logits or head_K (K-th head layer)."
    )
    flags.DEFINE_integer("image_size", None, "Input side (default: the run's image size).")
    flags.DEFINE_string("batch", "dynamic", "Batch axis of the ONNX input: dynamic or a size.")
    flags.DEFINE_bool("verify", True, "Check the file against the JAX model (needs the runtime).")
    flags.mark_flags_as_required(["workdir", "format", "out"])

    def run(argv: list[str]) -> None:
        del argv
        values = flags.FLAGS
        exporters.check_dependencies(values.format, values.verify)
        batch = exporters.parse_batch(values.batch)
        source = source_lib.read_source(values.workdir, values.image_size)
        if values.format == "onnx":
            done = exporters.export_onnx(source, values.out, values.output, batch, values.verify)
        elif values.format == "torch":
            done = exporters.export_torch(source, values.out, values.output, values.verify)
        else:
            done = exporters.export_torchvision(source, values.out, values.verify)
        parity = (
            "not checked (--noverify)"
            if done.parity is None
            else f"max difference {done.parity:.2g} of the output's scale on random images"
        )
        print(
            f"wrote {', '.join(done.files)}: {values.format}, output {done.output!r}, "
            f"{source.image_size} px, step {source.step} of {source.workdir}; "
            f"against JAX: {parity}"
        )
        if done.note:
            print(done.note)

    cli.run(run)


if __name__ == "__main__":
    main()
