"""Tiny graphs for tests of kiln and of passes users write against kiln's API.

Graphs are built with onnx_ir, fully typed (inputs, outputs and weights), so they pass the ONNX checker and run in
ONNX Runtime as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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
