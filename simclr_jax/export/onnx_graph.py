"""The network as an ONNX graph: architecture.forward run over ONNX nodes (no JAX needed).

Why not jax2onnx or jax2tf + tf2onnx: see the export notes in the README. Here every layer is
one standard ONNX operator (Conv, BatchNormalization, MaxPool, ...) with its padding written out,
so the graph reads like the network and any runtime runs it. Input: float32 NHWC images in
[0, 1] (transposed to NCHW inside), batch axis dynamic or fixed; one output, the one asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from simclr_jax.export import architecture as arch_lib

OPSET = 18
IR_VERSION = 9  # what onnxruntime >= 1.16 reads
INPUT_NAME = "images"
EXTERNAL_DATA_BYTES = 1 << 30  # larger weights go beside the graph (protobuf's 2 GiB limit)


class OnnxOps:
    """architecture.Ops as ONNX nodes. A value is a tensor name; its spatial size is tracked."""

    def __init__(self, weights: Mapping[str, np.ndarray], epsilon: float):
        self.weights, self.epsilon = weights, epsilon
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.sizes: dict[str, tuple[int, int]] = {}
        self._names: set[str] = set()

    def _name(self, hint: str) -> str:
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, size=None, outputs=1, **attrs) -> Any:
        names = [self._name(hint if outputs == 1 else f"{hint}_{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=names[0], **attrs))
        size = size if size is not None else self.sizes.get(inputs[0])
        for name in names:
            if size is not None:
                self.sizes[name] = size
        return names[0] if outputs == 1 else names

    def has(self, path: str) -> bool:
        return any(
            key.startswith((f"params/{path}/", f"batch_stats/{path}/")) for key in self.weights
        )

    def conv(self, path: str, x: str, stride: int = 1) -> str:
        kernel = self.weights[f"params/{path}/kernel"]  # HWIO
        kh, kw = kernel.shape[:2]
        inputs = [x, self.constant(f"{path}/weight", kernel.transpose(3, 2, 0, 1))]  # OIHW
        if f"params/{path}/bias" in self.weights:
            inputs.append(self.constant(f"{path}/bias", self.weights[f"params/{path}/bias"]))
        height, width = self.sizes[x]
        pads = [
            (kh - 1) // 2,
            (kw - 1) // 2,
            kh // 2,
            kw // 2,
        ]  # TF fixed: [top, left, bottom, right]
        size = ((height - 1) // stride + 1, (width - 1) // stride + 1)
        return self.node(
            "Conv", inputs, path, size, kernel_shape=[kh, kw], strides=[stride] * 2, pads=pads
        )

    def batch_norm(self, path: str, x: str) -> str:
        mean = self.weights[f"batch_stats/{path}/mean"]
        scale = self.weights.get(f"params/{path}/scale", np.ones_like(mean))
        bias = self.weights.get(f"params/{path}/bias", np.zeros_like(mean))
        inputs = [x] + [
            self.constant(f"{path}/{role}", value)
            for role, value in (
                ("scale", scale),
                ("bias", bias),
                ("mean", mean),
                ("var", self.weights[f"batch_stats/{path}/var"]),
            )
        ]
        return self.node("BatchNormalization", inputs, path, epsilon=self.epsilon)

    def dense(self, path: str, x: str) -> str:
        y = self.node(
            "MatMul",
            [x, self.constant(f"{path}/kernel", self.weights[f"params/{path}/kernel"])],
            path,
        )
        if f"params/{path}/bias" not in self.weights:
            return y
        return self.node(
            "Add", [y, self.constant(f"{path}/bias", self.weights[f"params/{path}/bias"])], path
        )

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], "relu")

    def sigmoid(self, x: str) -> str:
        return self.node("Sigmoid", [x], "sigmoid")

    def add(self, x: str, y: str) -> str:
        return self.node("Add", [x, y], "add")

    def mul(self, x: str, y: str) -> str:
        size = self.sizes.get(x) if self.sizes.get(x) != (1, 1) else self.sizes.get(y)
        return self.node("Mul", [x, y], "mul", size)

    def spatial_size(self, x: str) -> tuple[int, int]:
        return self.sizes[x]

    def _pool(self, op: str, x: str, window: int, stride: int, pads, **attrs) -> str:
        (top, bottom), (left, right) = pads
        height, width = self.sizes[x]
        size = (
            (height + top + bottom - window) // stride + 1,
            (width + left + right - window) // stride + 1,
        )
        return self.node(
            op, [x], op.lower(), size, kernel_shape=[window] * 2, strides=[stride] * 2,
            pads=[top, left, bottom, right], **attrs,
        )  # fmt: skip

    def max_pool(self, x: str, window: int, stride: int, pads) -> str:
        return self._pool("MaxPool", x, window, stride, pads)

    def avg_pool(self, x: str, window: int, stride: int, pads, count_pads: bool) -> str:
        return self._pool("AveragePool", x, window, stride, pads, count_include_pad=int(count_pads))

    def edge_pad(self, x: str, bottom: int, right: int) -> str:
        pads = self.constant("edge_pads", np.asarray([0, 0, 0, 0, 0, 0, bottom, right], np.int64))
        height, width = self.sizes[x]
        return self.node(
            "Pad", [x, pads], "edge_pad", (height + bottom, width + right), mode="edge"
        )

    def mean_hw(self, x: str, keepdims: bool) -> str:
        axes = self.constant("hw_axes", np.asarray([2, 3], np.int64))
        size = (1, 1) if keepdims else None
        name = self.node("ReduceMean", [x, axes], "mean_hw", size, keepdims=int(keepdims))
        if not keepdims:
            self.sizes.pop(name, None)
        return name

    def split_channels(self, x: str) -> tuple[str, str]:
        first, second = self.node("Split", [x], "split", outputs=2, axis=1, num_outputs=2)
        return first, second

    def softmax_pair(self, a: str, b: str) -> tuple[str, str]:
        axis = self.constant("axis0", np.asarray([0], np.int64))
        stacked = self.node(
            "Concat",
            [
                self.node("Unsqueeze", [a, axis], "unsqueeze"),
                self.node("Unsqueeze", [b, axis], "unsqueeze"),
            ],
            "stack",
            axis=0,
        )
        weights = self.node("Softmax", [stacked], "softmax", axis=0)
        first, second = self.node("Split", [weights], "split", outputs=2, axis=0, num_outputs=2)
        return self.node("Squeeze", [first, axis], "squeeze"), self.node(
            "Squeeze", [second, axis], "squeeze"
        )


def output_width(
    architecture: Mapping[str, Any], weights: Mapping[str, np.ndarray], output: str
) -> int:
    """The size of `output`'s last axis."""
    if output == "logits":
        return weights["params/classifier/kernel"].shape[1]
    layers = architecture["head_layers"]
    layer = {"features": 0, "projection": layers}.get(output)
    layer = int(output.removeprefix("head_")) if layer is None else layer
    if layer == 0:  # the backbone's features: the input of the head (or of the classifier)
        key = "params/head/dense1/kernel" if layers else "params/classifier/kernel"
        return weights[key].shape[0]
    return weights[f"params/head/dense{layer}/kernel"].shape[1]


def build_onnx(
    architecture: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    *,
    output: str,
    image_size: int,
    channels: int,
    batch: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """The ONNX model of the network's `output` for [batch, image_size, image_size, channels]
    float32 images (batch None: a dynamic 'batch' axis)."""
    arch_lib.check_output(output, architecture)
    ops = OnnxOps(weights, architecture["bn_epsilon"])
    ops._names.add(INPUT_NAME)
    nchw = ops.node(
        "Transpose", [INPUT_NAME], "to_nchw", (image_size, image_size), perm=[0, 3, 1, 2]
    )
    result = arch_lib.forward(ops, architecture, nchw, [output])[output]
    ops.nodes.append(helper.make_node("Identity", [result], [output], name=f"{output}_out"))
    batch_dim = "batch" if batch is None else batch
    graph = helper.make_graph(
        ops.nodes,
        "simclr_jax",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, [batch_dim, image_size, image_size, channels]
            )
        ],
        [
            helper.make_tensor_value_info(
                output, TensorProto.FLOAT, [batch_dim, output_width(architecture, weights, output)]
            )
        ],
        initializer=ops.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="simclr_jax"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, dict(metadata or {}))
    return model


def save(model: onnx.ModelProto, path: str) -> list[str]:
    """Write `model` (weights beside it when large); check it; the files written."""
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data = f"{path}.data"
    onnx.save_model(
        model,
        path,
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=data.rsplit("/", 1)[-1],
    )
    onnx.checker.check_model(path, full_check=True)
    return [path, data] if large else [path]
