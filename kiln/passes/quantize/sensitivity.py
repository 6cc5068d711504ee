"""Each quantized layer's effect on the model's outputs, measured alone: what decides which layers stay float.

Why. A layer's own output error says little about what it does to the model. A convolution that computes an STFT
of raw audio quantizes with a small relative error (the loud samples dominate its energy) and still ruins the
model: per-tensor 8-bit codes flatten the quiet samples, and the log of the spectrum that follows turns that into
a large error everywhere. Only the model's outputs show it.

How. One temporary copy of the float model in which every layer ``l`` reads, instead of its input ``x``::

    x_l = x + g_l (DQ(Q(x)) - x)          Q, DQ on the grid the layer's input will get; g_l a scalar graph input

(and its output, where it gets a QuantizeLinear too, likewise), and whose weights are graph inputs that default to
the float ones. ONNX Runtime runs it once for the float outputs (all gates 0) and once per layer with that layer's
gate at 1 and its quantized weight fed; the layer's sensitivity is ``sqrt(sum ||y_l - y||^2 / sum ||y||^2)`` over
all outputs and the first calibration batches. One session serves every layer.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln.compiler import io
from kiln.compiler.calibration import Feed
from kiln.passes import _weights
from kiln.passes.quantize import int8
from kiln.targets.ort.runner import make_session

_GATE = "kiln_sensitivity_gate"


@dataclasses.dataclass
class Probe:
    """One layer to measure: its node, its input and the input's grid, its weight and that weight quantized, and
    the tensor after it that gets a QuantizeLinear too (with its grid), if any."""

    label: str
    node: ir.Node
    activation: ir.Value
    grid: int8.ActivationGrid
    weight: ir.Value
    quantized: int8.QuantizedWeight
    output: ir.Value | None = None
    output_grid: int8.ActivationGrid | None = None


def model_errors(model: ir.Model, probes: list[Probe], feeds: list[Feed]) -> dict[str, float]:
    """Relative output error of the model with each probe's layer alone quantized (module docstring).

    ``model`` is left as it was: the gates are added to a clone.
    """
    clone = model.clone()
    graph = clone.graph
    values = {value.name: value for node in graph for value in node.outputs}
    values.update({value.name: value for value in graph.inputs})
    values.update(graph.initializers)
    nodes = dict(zip(model.graph, graph))  # a clone keeps the nodes' order
    gates: dict[str, str] = {}
    weights: dict[str, str] = {}
    for i, probe in enumerate(probes):
        gate = ir.Value(name=f"{_GATE}_{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
        graph.inputs.append(gate)
        gates[probe.label] = gate.name
        node = nodes[probe.node]
        node.replace_input_with(0, _gated(graph, node, values[probe.activation.name], probe.grid, gate))
        weight = values[probe.weight.name]
        if not weight.is_initializer():  # a Constant node's output: the layer reads an initializer copy instead
            tensor = _weights.constant_tensor(weight)
            assert tensor is not None  # static-int8 quantizes constant weights only
            weight = _weights.add_initializer(graph, f"{gate.name}_weight", tensor.numpy())
            node.replace_input_with(1, weight)
        if weight not in graph.inputs:
            graph.inputs.append(weight)  # an initializer listed as an input is a default a feed may override
        weights[probe.label] = weight.name
        if probe.output is not None and probe.output_grid is not None:
            output = values[probe.output.name]
            readers = [(use.node, use.idx) for use in output.uses()]
            gated = _gated(graph, output.producer(), output, probe.output_grid, gate)
            for reader, index in readers:
                reader.replace_input_with(index, gated)
    with tempfile.TemporaryDirectory(prefix="kiln-sensitivity-") as tmp:
        session = make_session(io.save(clone, Path(tmp) / "sensitivity.onnx"))
    off = {name: np.array(0.0, np.float32) for name in gates.values()}
    references = [session.run(None, feed | off) for feed in feeds]
    errors = {}
    for probe in probes:
        noise = signal = 0.0
        feed_weight = {weights[probe.label]: np.ascontiguousarray(probe.quantized.dequantize(), dtype=np.float32)}
        on = off | {gates[probe.label]: np.array(1.0, np.float32)}
        for feed, reference in zip(feeds, references):
            for y, expected in zip(session.run(None, feed | on | feed_weight), reference):
                noise += float(np.square(y - expected, dtype=np.float64).sum())
                signal += float(np.square(expected, dtype=np.float64).sum())
        errors[probe.label] = float(np.sqrt(noise / signal)) if signal else 0.0
    return errors


def _gated(graph: ir.Graph, after: ir.Node | None, x: ir.Value, grid: int8.ActivationGrid, gate: ir.Value) -> ir.Value:
    """``x + gate (DQ(Q(x)) - x)``, its nodes placed after ``after`` (the start of the graph when None)."""
    scale = _weights.add_initializer(graph, f"{gate.name}_{x.name}_scale", np.array(grid.scale, np.float32))
    zero = _weights.add_initializer(graph, f"{gate.name}_{x.name}_zero", np.array(grid.zero_point, grid.dtype))
    quantize = ir.node("QuantizeLinear", [x, scale, zero])
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero])
    delta = ir.node("Sub", [dequantize.outputs[0], x])
    scaled = ir.node("Mul", [delta.outputs[0], gate])
    gated = ir.node("Add", [x, scaled.outputs[0]])
    chain = [quantize, dequantize, delta, scaled, gated]
    for node in chain:
        node.outputs[0].name = f"{gate.name}_{x.name}_{node.op_type}"
    if after is None:
        graph.insert_before(next(iter(graph)), chain)
    else:
        graph.insert_after(after, chain)
    return gated.outputs[0]
