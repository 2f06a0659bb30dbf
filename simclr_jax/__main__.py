"""`python -m simclr_jax`: the commands, one line each (`python -m simclr_jax.<command> --help`).

COMMANDS names every module of the package that runs as a program (tests/test_entry_points.py
checks it against the modules with a `__main__` guard, so a new command is listed here).
"""

from __future__ import annotations

from simclr_jax import __version__, cli

COMMANDS = {
    "pretrain": "contrastive pretraining (SimCLR v1/v2) with an online linear probe",
    "finetune": "fine-tuning, linear evaluation or the supervised baseline",
    "distill": "a fine-tuned teacher labels unlabelled images for a student",
    "evaluate": "evaluates each new checkpoint of a training run's workdir once",
    "plan": "compiles a stage for a TPU slice or GPU machine here: fits? how long? (no hardware)",
    "prepare": "a folder of images, once, into a dataset every stage streams (any size)",
    "embed": "features of every image in a folder, from any workdir",
    "neighbors": "nearest neighbours of embeddings: a picture, recall@k and mAP@R",
    "export": "a workdir's network to ONNX, or to PyTorch (safetensors, torchvision's keys)",
    "convert": "an official SimCLR checkpoint (TF1 or TF2) into a workdir",
    "demo": "`make demo`: SimCLR on Fashion-MNIST on this CPU, against pixels and scratch",
    "transfer_demo": "the demo's network on handwritten digits (transfer learning)",
    "plot": "figures: training curves, accuracy against labels, a 2-D map of embeddings",
    "data.show": "a PNG of training images next to their two SimCLR views",
    "models": "the model card: parameters and GFLOPs of each ResNet variant",
    "theory": "the two-layer-CNN case study: SimCLR cuts the labels needed",
}


def listing() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"simclr_jax {__version__}: python -m simclr_jax.<command> --help shows its flags"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"no command {argv[1]!r} here: run python -m simclr_jax.<command>")
    print(listing())


if __name__ == "__main__":
    cli.run(main)
