"""The trained network outside JAX: ONNX graphs and PyTorch modules with the same outputs.

    python -m simclr_jax.export --workdir=W --format=onnx|torch|torchvision --out=PATH

Nothing here imports JAX except the command (`__main__`) and `source.py`, which read a workdir:
`architecture.py` (the forward pass written once, over abstract operations), `onnx_graph.py`
(those operations as ONNX nodes) and `torch_model.py` (as a torch.nn.Module, for PyTorch users,
who import only it) run without JAX.
"""

METADATA_KEY = "simclr_jax"  # the safetensors metadata entry of a --format=torch file (JSON)
