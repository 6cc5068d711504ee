"""Helpers shared by the passes that rewrite constant weights (quantization, pruning, factorization).

A weight is an ``ir.Value`` whose content is known when the model is compiled: an initializer (``const_value``)
or the output of a ``Constant`` node. A pass may replace it only if nothing else can observe the old value: it is
not a graph input (which a caller may override at run time) nor a graph output, and every use of it is one the
pass rewrites.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np
import onnx_ir as ir


def constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` if it is an initializer or a ``Constant`` node's output, else None.

    Nothing is read yet: an external-data tensor stays on disk until ``.numpy()`` is called, so callers can look
    at ``shape`` and ``dtype`` of every weight and load them one at a time.
    """
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node (several outputs or attributes)
        return None


def constant_array(value: ir.Value) -> np.ndarray | None:
    """``value``'s constant content as numpy (memory-mapped for external data), or None if not constant."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def release(tensor: ir.TensorProtocol) -> None:
    """Unmap an external-data tensor after reading it, so resident memory does not grow with every weight read.

    Each ``ExternalTensor`` maps the whole data file and keeps the pages it touched resident until released; a
    later ``.numpy()`` maps it again. The caller must hold no array obtained from the tensor.
    """
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def blocking_uses(value: ir.Value, rewritten: Collection[tuple[ir.Node, int]]) -> list[ir.Node]:
    """Nodes that use ``value`` other than through the ``(node, input index)`` pairs in ``rewritten``."""
    return [use.node for use in value.uses() if (use.node, use.idx) not in rewritten]


def replace_blocker(value: ir.Value, rewritten: Collection[tuple[ir.Node, int]]) -> str | None:
    """Why ``value`` cannot be replaced when only the uses in ``rewritten`` change; None when it can."""
    if value.is_graph_input():
        return f"weight {value.name!r} is a graph input (it can be overridden at run time)"
    if value.is_graph_output():
        return f"weight {value.name!r} is a graph output"
    others = blocking_uses(value, rewritten)
    if others:
        other = others[0]
        return f"weight {value.name!r} is also used by {other.op_type} node {other.name!r}"
    return None


def defining_graph(value: ir.Value) -> ir.Graph | None:
    """The graph an initializer or a Constant node's output belongs to."""
    graph = value.graph
    return graph if isinstance(graph, ir.Graph) else None


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol | np.ndarray) -> ir.Value:
    """Register ``tensor`` as a new initializer named ``name`` in ``graph`` and return its value."""
    if isinstance(tensor, np.ndarray):
        tensor = ir.tensor(tensor, name=name)
    else:
        tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def remove_if_unused(value: ir.Value) -> bool:
    """Drop an initializer, or the Constant node producing ``value``, once nothing uses it; True if dropped."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return False
    graph = defining_graph(value)
    if graph is None:
        return False
    if value.is_initializer():
        graph.initializers.pop(value.name)
        return True
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        graph.remove(producer, safe=True)
        return True
    return False


class NameScope:
    """Hands out value and node names not yet used anywhere in a model (all graphs, all subgraphs)."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in model.graphs():
            self._taken.update(_names(graph))

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... whichever is free first; the name is then taken."""
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


def _names(graph: ir.Graph) -> Iterable[str]:
    for value in graph.inputs:
        yield value.name or ""
    yield from graph.initializers
    for node in graph:
        if node.name:
            yield node.name
        for value in node.outputs:
            yield value.name or ""
