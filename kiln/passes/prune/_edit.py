"""Graph edits shared by the pruning passes: slicing weights, adding a bias, dropping dead nodes, counting.

Slicing a weight changes the width of every activation downstream of it, so the shapes recorded on intermediate
values go stale; :func:`finish` forgets them (shape inference recomputes them) and removes what no longer feeds an
output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from kiln.passes import _weights
from kiln.passes.prune.structure import Projection


def replace_constant(node: ir.Node, index: int, array: np.ndarray, names: _weights.NameScope) -> None:
    """Point ``node.inputs[index]`` at a new initializer holding ``array``; the old one goes once unused."""
    old = node.inputs[index]
    graph = _weights.defining_graph(old) or node.graph
    new = _weights.add_initializer(graph, names.fresh(old.name or "pruned"), array)
    node.replace_input_with(index, new)
    _weights.remove_if_unused(old)


def weight_array(value: ir.Value) -> np.ndarray:
    return np.asarray(_weights.constant_array(value))


def slice_projection(projection: Projection, keep: np.ndarray, axis: int, names: _weights.NameScope) -> None:
    """Keep columns (``axis=1``: output features, with the bias) or rows (``axis=0``: input features) ``keep``."""
    weight = weight_array(projection.weight)
    projection_node = projection.matmul
    replace_constant(projection_node, 1, np.ascontiguousarray(np.take(weight, keep, axis=axis)), names)
    if axis == 1 and projection.bias_add is not None:
        bias_node = projection.bias_add
        index = next(i for i, v in enumerate(bias_node.inputs) if v is not projection.matmul.outputs[0])
        replace_constant(bias_node, index, np.ascontiguousarray(weight_array(bias_node.inputs[index])[keep]), names)


def add_to_bias(projection: Projection, delta: np.ndarray, names: _weights.NameScope) -> Projection:
    """``y = x W + b`` -> ``y = x W + (b + delta)``; a projection without a bias gets an Add. Returns the new view."""
    delta = delta.astype(weight_array(projection.weight).dtype)
    if projection.bias_add is not None:
        node = projection.bias_add
        index = next(i for i, v in enumerate(node.inputs) if v is not projection.matmul.outputs[0])
        replace_constant(node, index, weight_array(node.inputs[index]) + delta, names)
        return projection
    matmul = projection.matmul
    graph = matmul.graph
    out = matmul.outputs[0]
    bias = _weights.add_initializer(graph, names.fresh(f"{matmul.name or 'projection'}.bias"), delta)
    add = ir.node("Add", [out, bias], name=names.fresh(f"{matmul.name or 'projection'}.bias_add"))
    added = add.outputs[0]
    added.name = names.fresh(f"{out.name}.biased")
    added.type = out.type
    out.replace_all_uses_with(added, replace_graph_outputs=True)
    add.replace_input_with(0, out)
    graph.insert_after(matmul, add)
    if added.is_graph_output():  # keep the output's name
        out.name, added.name = added.name, out.name
    return Projection(matmul, add)


def finish(model: ir.Model) -> None:
    """Forget intermediate shapes (slicing made some stale) and drop nodes and initializers nothing reads."""
    graph = model.graph
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    common.RemoveUnusedNodesPass()(model)


def keep_indices(count: int, drop: set[int]) -> np.ndarray:
    return np.array([i for i in range(count) if i not in drop], dtype=np.int64)
