"""Measured importance: how much the model's outputs change when one unit is switched off.

A unit is switched off through a gate, an extra graph input multiplied into the graph where the unit's signal
passes. The gated graph is a temporary edit of the model: it is saved for one ONNX Runtime session and undone at
once, so the model the pass goes on to prune is untouched. The session then runs every calibration batch once with
all gates open and once per unit with that unit's gate closed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.compiler import io
from kiln.compiler.calibration import Feed
from kiln.passes import _weights
from kiln.targets.ort.runner import make_session

NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}


def relative_change(got: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """``sum_outputs ||got - reference||^2 / ||reference||^2``."""
    return sum(
        float(np.sum((g.astype(np.float64) - r) ** 2) / max(np.sum(r.astype(np.float64) ** 2), 1e-300))
        for g, r in zip(got, reference, strict=True)
    )


def session_with_edit(model: ir.Model, edit: Callable[[], Callable[[], None]]) -> ort.InferenceSession:
    """An ONNX Runtime session of ``model`` as ``edit()`` leaves it; the undo function ``edit`` returns runs right
    after the save, whatever happens."""
    undo = edit()
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-prune-") as tmp:
            return make_session(io.save(model, Path(tmp) / "gated.onnx"))
    finally:
        undo()


def masked_channel_errors(
    model: ir.Model, values: list[ir.Value], masks: list[tuple[int, np.ndarray]], feeds: list[Feed]
) -> list[float]:
    """Mean over ``feeds`` of the outputs' relative change (:func:`relative_change`) when ``values[i]`` is multiplied
    by the channel mask of each ``(i, mask)`` in turn (a [C] vector on the last axis; every other value ungated)."""
    names = _weights.NameScope(model)
    gates: list[ir.Value] = []

    def edit() -> Callable[[], None]:
        inserted = []
        for value in values:
            channels = value.shape[-1] if value.shape is not None else None
            dtype = value.dtype or ir.DataType.FLOAT
            gate = ir.Value(name=names.fresh("kiln_prune_mask"), type=ir.TensorType(dtype), shape=ir.Shape([channels]))
            uses = list(value.uses())
            mul = ir.node("Mul", [value, gate], name=names.fresh("kiln_prune_mask.mul"))
            mul.outputs[0].name = names.fresh("kiln_prune_mask.out")
            producer = value.producer()
            if producer is None:  # a graph input
                model.graph.insert_before(model.graph[0], [mul])
            else:
                model.graph.insert_after(producer, [mul])
            for use in uses:
                use.node.replace_input_with(use.idx, mul.outputs[0])
            model.graph.inputs.append(gate)
            gates.append(gate)
            inserted.append((value, mul))

        def undo() -> None:
            for value, mul in inserted:
                mul.outputs[0].replace_all_uses_with(value)
                model.graph.remove(mul, safe=True)
            for gate in gates:
                model.graph.inputs.remove(gate)

        return undo

    session = session_with_edit(model, edit)
    outputs = [o.name for o in session.get_outputs() if "float" in o.type]
    width = {i: len(mask) for i, mask in masks}
    ones = {}
    for i, (value, gate) in enumerate(zip(values, gates, strict=True)):
        channels = value.shape[-1] if value.shape is not None else None
        ones[gate.name] = np.ones(width.get(i, channels if isinstance(channels, int) else 1), NUMPY[gate.dtype])
    errors = np.zeros(len(masks))
    for feed in feeds:
        reference = session.run(outputs, {**feed, **ones})
        for k, (i, mask) in enumerate(masks):
            closed = {gates[i].name: mask.astype(NUMPY[gates[i].dtype])}
            errors[k] += relative_change(session.run(outputs, {**feed, **ones, **closed}), reference)
    return [float(e / len(feeds)) for e in errors]
