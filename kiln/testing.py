"""Tiny graphs for tests of kiln and of passes users write against kiln's API.

Graphs are built with onnx_ir, fully typed (inputs, outputs and weights), so they pass the ONNX checker and run in
ONNX Runtime as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT


def value(name: str, shape: Sequence[int | str], dtype: ir.DataType = FLOAT) -> ir.Value:
    """A typed graph value."""
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def initializer(name: str, array: np.ndarray) -> ir.Value:
    """A value holding ``array`` as a constant, ready for ``Graph(initializers=...)``."""
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))


def model(
    inputs: Sequence[ir.Value],
    outputs: Sequence[ir.Value],
    nodes: Sequence[ir.Node],
    initializers: Sequence[ir.Value] = (),
    *,
    opset: int = 21,
    name: str = "tiny",
) -> ir.Model:
    """A model with the default opset ``opset`` (ir_version 10)."""
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": opset}, name=name)
    return ir.Model(graph, ir_version=10, producer_name="kiln.testing")


def mlp(sizes: Sequence[int], *, batch: int | str = "batch", seed: int = 0, opset: int = 21) -> ir.Model:
    """x -> MatMul -> Add(bias) -> Relu -> ... -> y, one layer per consecutive pair in ``sizes``.

    The last layer has no Relu. Weights are N(0, 1/sqrt(fan_in)) so activations stay O(1).
    """
    rng = np.random.default_rng(seed)
    x = value("x", [batch, sizes[0]])
    current, nodes, inits = x, [], []
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        w = initializer(f"w{i}", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        b = initializer(f"b{i}", (0.1 * rng.standard_normal(n)).astype(np.float32))
        inits += [w, b]
        mm = ir.node("MatMul", [current, w], name=f"matmul{i}")
        add = ir.node("Add", [mm.outputs[0], b], name=f"add{i}")
        nodes += [mm, add]
        current = add.outputs[0]
        if i < len(sizes) - 2:
            relu = ir.node("Relu", [current], name=f"relu{i}")
            nodes.append(relu)
            current = relu.outputs[0]
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"h{i}"
    current.name = "y"
    current.type = ir.TensorType(FLOAT)
    current.shape = ir.Shape([batch, sizes[-1]])
    return model([x], [current], nodes, inits, opset=opset, name="mlp")


def write_matmul_chain(directory: str | Path, *, layers: int, dim: int, seed: int = 0) -> Path:
    """Write ``directory/model.onnx``: ``layers`` MatMuls of ``dim`` x ``dim`` fp32 weights in external data.

    Weights are generated and written one at a time and referenced as external tensors, so a model larger than
    memory is written without ever holding more than one weight (nor a large ModelProto) in memory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    x = value("x", ["batch", dim])
    current, nodes, inits, offset = x, [], [], 0
    with open(directory / data_name, "wb") as data:
        for i in range(layers):
            weight = (rng.standard_normal((dim, dim), dtype=np.float32) / np.float32(np.sqrt(dim))).astype(np.float32)
            data.write(weight.tobytes())
            tensor = ir.ExternalTensor(
                data_name, offset, weight.nbytes, FLOAT, shape=ir.Shape([dim, dim]), name=f"w{i}", base_dir=directory
            )
            offset += weight.nbytes
            w = ir.Value(name=f"w{i}", const_value=tensor, type=ir.TensorType(FLOAT), shape=ir.Shape([dim, dim]))
            inits.append(w)
            node = ir.node("MatMul", [current, w], name=f"matmul{i}")
            current = node.outputs[0]
            current.name = f"h{i}"
            current.type, current.shape = ir.TensorType(FLOAT), ir.Shape(["batch", dim])
            nodes.append(node)
    current.name = "y"
    path = directory / "model.onnx"
    ir.save(model([x], [current], nodes, inits, name="matmul_chain"), path)
    return path
