"""float32 -> float16 conversion with float32 islands for the ops fp16 would break.

Halving activations and weights halves memory traffic on a GPU, but some ops lose too much in float16: normalisations
(their variance sums squares that overflow 65504 and their epsilon flushes to zero), Softmax and the reductions (long
sums), Pow/Exp/Log (range). kiln keeps those ops (``fp32_ops``) in float32 and converts the rest:

* a node runs in fp16 when its op has a schema whose float type constraint allows float16; its inputs and outputs
  of that constraint become float16 (an output whose type an attribute sets, like Cast's or ConstantOfShape's,
  stays as it is, except ``Cast(to=FLOAT)``, which becomes ``Cast(to=FLOAT16)``);
* float32 constants read only by fp16 nodes become float16 unless a value would not survive (overflow past 65504,
  or a nonzero value such as a LayerNorm epsilon flushing to zero): then the node reading it stays float32;
* nodes with subgraphs (If/Loop/Scan), calls of model-local functions and ops without a schema stay float32, and so
  does everything inside subgraphs;
* a ``Cast`` is inserted wherever an fp16 value meets a float32 reader or the reverse (one per value and direction);
* the model's inputs and outputs keep their float32 types and names, so every target's runner is called alike.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Collection
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxruntime.capi import _pybind_state

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16

#: Ops kept in float32 unless the target's ``fp32_ops`` option says otherwise.
DEFAULT_FP32_OPS = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "Pow",
    "Exp",
    "Log",
    "CumSum",
    "Range",
)

_HALF_MAX = float(np.finfo(np.float16).max)
_HALF_TINY = float(np.finfo(np.float16).smallest_subnormal)


@functools.cache
def _contrib_schemas() -> dict[tuple[str, str], Any]:
    return {(s.domain, s.name): s for s in _pybind_state.get_all_operator_schema()}


#: Per op: the float16-capable type constraint of each input ("" if none), whether the last input is variadic, and
#: the same for each output.
Slots = tuple[list[str], bool, list[str]]


@functools.cache
def _slots(domain: str, op_type: str, version: int) -> Slots | None:
    """Input type strings, whether the last input is variadic, output type strings (``None``: no schema)."""
    if domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(op_type, version, "")
        except onnx.defs.SchemaError:
            return None
    else:
        schema = _contrib_schemas().get((domain, op_type))
        if schema is None:
            return None
    half = {c.type_param_str for c in schema.type_constraints if "tensor(float16)" in c.allowed_type_strs}

    def type_str(param: Any) -> str:
        name = getattr(param, "type_str", None) or param.typeStr
        return name if name in half else ""

    variadic = bool(schema.inputs) and str(schema.inputs[-1].option).endswith("Variadic")
    return [type_str(p) for p in schema.inputs], variadic, [type_str(p) for p in schema.outputs]


def _constraint(types: list[str], variadic: bool, index: int) -> str:
    if index < len(types):
        return types[index]
    return types[-1] if variadic and types else ""


def _representable(tensor: ir.TensorProtocol) -> bool:
    """Every value keeps its meaning in float16: no overflow, and no nonzero value flushed to zero."""
    values = np.abs(tensor.numpy().astype(np.float64))
    nonzero = values[values > 0]
    return bool(np.all(np.isfinite(values)) and np.all(values <= _HALF_MAX) and np.all(nonzero >= _HALF_TINY))


class _Plan:
    """Which node inputs and outputs become float16."""

    def __init__(self) -> None:
        self.half_inputs: dict[ir.Node, set[int]] = {}
        self.half_outputs: set[ir.Value] = set()
        self.kept: collections.Counter[str] = collections.Counter()


def _plan(graph: ir.Graph, opsets: dict[str, int], fp32_ops: Collection[str]) -> _Plan:
    plan = _Plan()
    for node in graph:
        float_inputs = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype == FLOAT]
        if not float_inputs and not any(v.dtype == FLOAT for v in node.outputs):
            continue
        slots = _slots(node.domain, node.op_type, opsets.get(node.domain, 1))
        reason = _keep_reason(node, slots, fp32_ops)
        if reason is not None:
            plan.kept[reason] += 1
            continue
        assert slots is not None  # a missing schema is a reason to keep the node
        types, variadic, out_types = slots
        follow = {_constraint(types, variadic, i) for i in float_inputs} - {""}
        halves = {i for i in float_inputs if _constraint(types, variadic, i) in follow}
        lossy = [
            node.inputs[i].name
            for i in halves
            if node.inputs[i].const_value is not None and not _representable(node.inputs[i].const_value)
        ]
        if lossy:
            plan.kept[f"constant {lossy[0]!r} does not fit float16"] += 1
        elif node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            if node.attributes.get_int("to") == FLOAT.value:
                node.attributes["to"] = ir.Attr("to", ir.AttributeType.INT, HALF.value)
                plan.half_outputs.add(node.outputs[0])
        else:
            plan.half_inputs[node] = halves
            plan.half_outputs.update(
                out
                for j, out in enumerate(node.outputs)
                if out.dtype == FLOAT and _constraint(out_types, False, j) in follow
            )
    return plan


def _keep_reason(node: ir.Node, slots: Slots | None, fp32_ops: Collection[str]) -> str | None:
    """Why ``node`` stays float32, or ``None`` when it may run in float16."""
    if node.op_type in fp32_ops:
        return f"{node.op_type} is kept in float32"
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return f"{node.op_type} has subgraphs"
    if slots is None:
        return f"{node.domain or 'ai.onnx'}.{node.op_type} has no schema (custom op or model-local function)"
    return None


def convert_to_fp16(model: ir.Model, fp32_ops: Collection[str] = DEFAULT_FP32_OPS) -> dict[str, Any]:
    """Convert ``model``'s main graph in place (see the module docstring); returns what was converted and kept."""
    graph = model.graph
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.ShapeInferencePass()(model)  # every float value must be typed to be found
    plan = _plan(graph, dict(model.opset_imports), frozenset(fp32_ops))

    # Constants read only as float16 are stored as float16; the others get a Cast like any float32 value.
    converted = 0
    for value in list(graph.initializers.values()):
        if value.dtype != FLOAT or value.is_graph_input() or value.is_graph_output():
            continue
        uses = value.uses()
        if uses and all(use.idx in plan.half_inputs.get(use.node, ()) for use in uses):
            array = value.const_value.numpy().astype(np.float16)
            value.const_value = ir.tensor(array, name=value.name)
            value.dtype = HALF
            converted += 1
    for value in plan.half_outputs:
        value.dtype = HALF

    names = _Names(graph)
    casts = _insert_casts(graph, plan, names) + _restore_outputs(graph, names)
    return {
        "fp16_nodes": len(plan.half_inputs),
        "fp32_nodes": dict(plan.kept.most_common()),
        "casts": casts,
        "constants_converted": converted,
    }


def _insert_casts(graph: ir.Graph, plan: _Plan, names: _Names) -> int:
    """A Cast wherever a value's type differs from what a reader expects (subgraph readers of outer values too)."""
    made: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    for node in list(graph.all_nodes()):
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype not in (FLOAT, HALF):
                continue
            if node in plan.half_inputs:
                wanted = HALF if index in plan.half_inputs[node] else FLOAT
            elif node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
                continue  # a Cast reads any type
            else:
                wanted = FLOAT
            if value.dtype == wanted:
                continue
            key = (value, wanted)
            if key not in made:
                made[key] = _cast(graph, value, wanted, names)
            node.replace_input_with(index, made[key])
    return len(made)


class _Names:
    """Fresh value and node names: the graph's names must stay unique."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used = {v.name for node in graph.all_nodes() for v in (*node.inputs, *node.outputs) if v is not None}
        self.used |= {v.name for v in graph.inputs} | set(graph.initializers)

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, names: _Names) -> ir.Value:
    suffix = "fp16" if to == HALF else "fp32"
    cast = ir.node("Cast", [value], attributes={"to": to.value}, name=names.fresh(f"{value.name}_to_{suffix}"))
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = names.fresh(f"{value.name}_{suffix}"), to, value.shape
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, cast)
    else:
        graph.insert_before(graph.node(0), cast)
    return out


def _restore_outputs(graph: ir.Graph, names: _Names) -> int:
    """Graph outputs that became float16 are cast back, under their original names."""
    count = 0
    for i, value in enumerate(list(graph.outputs)):
        if value.dtype != HALF:
            continue
        name = value.name
        value.name = names.fresh(f"{name}_fp16")
        cast = ir.node("Cast", [value], attributes={"to": FLOAT.value}, name=names.fresh(f"{name}_to_fp32"))
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = name, FLOAT, value.shape
        graph.append(cast)
        graph.outputs[i] = out
        count += 1
    return count
