"""``inspect_model``: what is in a model — ops, constant elements and bytes by dtype, opsets, inputs and outputs.

Weights are counted from their declared shapes and dtypes, never read, so inspecting a model of any size is fast.
Elements are tensor elements as stored: a packed 4-bit weight counts its uint8 bytes, not the weights it encodes.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import onnx_ir as ir

from kiln.compiler import io


def _shape(value: ir.Value) -> list[int | str] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def _tensor_bytes(tensor: ir.TensorProtocol) -> int:
    # 4-bit and 2-bit types pack several elements per byte; itemsize is fractional for them.
    return int(-(-tensor.size * tensor.dtype.itemsize // 1))


def constant_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    """Initializers of every graph plus the ``value`` tensors of Constant nodes (how some exporters store weights)."""
    tensors = []
    for graph in model.graphs():
        tensors.extend(v.const_value for v in graph.initializers.values() if v.const_value is not None)
        for node in graph:
            if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
                tensors.append(node.attributes["value"].as_tensor())
    return tensors


def inspect_model(path: str | Path) -> dict[str, Any]:
    """A JSON-able description of the model at ``path``."""
    path = Path(path)
    model = io.load(path)
    ops: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in constant_tensors(model):
        entry = by_dtype.setdefault(tensor.dtype.name, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += tensor.size
        entry["bytes"] += _tensor_bytes(tensor)
    from kiln import zoo

    identity = zoo.identify(model)
    return {
        "path": str(path),
        "file_bytes": io.model_bytes(path),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())),
        "zoo": {"name": identity[0].name, "variant": identity[1]} if identity else None,
        "inputs": [
            {"name": v.name, "dtype": v.dtype.name if v.dtype else None, "shape": _shape(v)}
            for v in model.graph.inputs
            if v.name not in model.graph.initializers
        ],
        "outputs": [
            {"name": v.name, "dtype": v.dtype.name if v.dtype else None, "shape": _shape(v)}
            for v in model.graph.outputs
        ],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "constant_elements": sum(e["elements"] for e in by_dtype.values()),
        "weights_by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        "subgraphs": sum(1 for _ in model.graphs()) - 1,
        "functions": len(model.functions),
    }


def inspect_structure(path: str | Path) -> dict[str, Any]:
    """The transformer structure of the model at ``path`` (blocks, attention and MLP sublayers, residual stream).

    Raises :class:`kiln.passes.prune.structure.StructureError` when the graph is not a recognized transformer.
    """
    from kiln.passes.prune.structure import StructureError, find_structure

    try:
        structure = find_structure(io.load(Path(path)))
    except StructureError as e:
        raise StructureError(f"{path}: {e}") from None
    return {"path": str(path)} | structure.describe()
