"""Dynamic 8-bit quantization: int8 weights per channel, activations quantized at run time, no calibration.

Math. A constant weight ``W`` [K, N] goes on the per-column int8 grid of :mod:`kiln.passes.quantize.int8`
(``s_n = max|W_n| / 127``). At run time each call quantizes its input ``A`` to uint8 over ``A``'s own range::

    s_a = (max(A, 0) - min(A, 0)) / 255,   z_a = round(-min(A, 0) / s_a),   A_q = clip(round(A / s_a) + z_a, 0, 255)
    Y = (A_q - z_a) @ (W_q - z_w) * s_a * s_n  (+ bias)          integer products, int32 accumulation

Graph change (``Y`` keeps its name, type and consumers)::

    "contrib":  Y = MatMul(A, W)      ->  Y = com.microsoft.DynamicQuantizeMatMul(A, Wq, s, z)
                Y = Gemm(A, W, C)     ->  Y = com.microsoft.DynamicQuantizeMatMul(A, Wq, s, z, C)
                Y = Add(MatMul(A, W), C) (C a constant [N], the MatMul's only reader)  ->  the same, with bias C
    "onnx":     (A_q, s_a, z_a) = DynamicQuantizeLinear(A)                     (one per input tensor, shared)
                Y = Mul(Cast<float>(MatMulInteger(A_q, Wq, z_a, z)), Mul(s_a, s))  [then Add(., C) for a Gemm]

"contrib" is the op ONNX Runtime runs; "onnx" is standard ONNX (opset >= 11), which ONNX Runtime fuses back into
DynamicQuantizeMatMul at ``ORT_ENABLE_EXTENDED`` and above (or, where layers share one DynamicQuantizeLinear,
into MatMulIntegerToFloat, so the input is quantized once for all of them). Weights are stored as uint8 (zero
point 128) by default: int8 weights saturate in ONNX Runtime's kernels on x86 CPUs without VNNI (see the int8
module).

Eligible: MatMul and Gemm of the main graph (subgraphs are left alone) whose second input is a 2-D float32
constant and whose first input is a float32 activation; Gemm with ``transA=0``, ``alpha=1`` and, with a bias,
``beta=1`` and a constant 1-D bias [N]. A weight shared by several layers is quantized once; the float weight
is removed once nothing reads it (a tied embedding's Gather keeps it). Conv is not handled: ONNX Runtime has no
fast dynamic Conv kernel. Reasons for what stays float are in ``details["skipped"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.registry import register
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.quantize import int8, ort_fusion

_OP_TYPES = ("MatMul", "Gemm")
#: DynamicQuantizeLinear appeared in opset 11.
_ONNX_FORMAT_OPSET = 11


@dataclasses.dataclass
class DynamicInt8Options:
    """Options of ``quantize.dynamic-int8``.

    * ``format``: "contrib" (``com.microsoft.DynamicQuantizeMatMul``) or "onnx" (DynamicQuantizeLinear +
      MatMulInteger + scale multiply, standard ONNX).
    * ``weight_type``: "uint8" (zero point 128, exact on every x86 CPU) or "int8" (saturates without VNNI).
    * ``op_types``: which of MatMul and Gemm to quantize.
    * ``exclude``: node names to keep float (an unnamed node is named ``"OpType:output_name"``, as in details).
    * ``check_fusion``: ask ONNX Runtime which layers run on integer kernels (costs one session build).
    """

    format: Literal["contrib", "onnx"] = "contrib"
    weight_type: int8.WeightType = "uint8"
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(_OP_TYPES))
    exclude: list[str] = dataclasses.field(default_factory=list)
    check_fusion: bool = True

    def __post_init__(self) -> None:
        if self.format not in ("contrib", "onnx"):
            raise ValueError(f"format must be 'contrib' or 'onnx', got {self.format!r}")
        if self.weight_type not in ("uint8", "int8"):
            raise ValueError(f"weight_type must be 'uint8' or 'int8', got {self.weight_type!r}")
        unknown = sorted(set(self.op_types) - set(_OP_TYPES))
        if unknown:
            raise ValueError(f"op_types may contain only MatMul and Gemm, got {unknown}")


@dataclasses.dataclass
class _Site:
    label: str
    node: ir.Node
    weight: ir.Value
    #: Gemm ``transB=1``: the weight is stored [N, K].
    transposed: bool
    bias: ir.Value | None
    #: "contrib" format: the Add of a constant bias after a MatMul, folded into DynamicQuantizeMatMul.
    bias_add: ir.Node | None = None


@register("quantize.dynamic-int8")
class DynamicInt8(KilnPass):
    """Dynamic W8A8: int8 per-channel weights, activations quantized at run time (DynamicQuantizeMatMul)."""

    Options = DynamicInt8Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        self.details = {"format": opts.format, "weight_type": opts.weight_type, "layers": {}, "skipped": {}}
        sites = self._find_sites(model)
        if not sites:
            return ir.passes.PassResult(model, modified=False)
        if opts.format == "onnx":
            converted = int8.ensure_opset(model, _ONNX_FORMAT_OPSET)
            if converted:
                self.details["opset"] = converted
                sites = self._find_sites(model)
        else:
            model.opset_imports.setdefault("com.microsoft", 1)

        names = _weights.NameScope(model)
        weights: dict[tuple[ir.Value, bool], tuple[list[ir.Value], float]] = {}
        activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        new_names = []
        for site in sites:
            key = (site.weight, site.transposed)
            if key not in weights:
                weights[key] = self._quantize_weight(site, names)
            initializers, rel_error = weights[key]
            new_names.append(self._rewrite(site, initializers, activations, names))
            self.details["layers"][site.label] = {"op": site.node.op_type, "weight_rel_error": rel_error}
        for site in sites:
            _weights.remove_if_unused(site.weight)

        if opts.check_fusion:
            report = ort_fusion.fusion_report(model, new_names)
            self.details["ort_fusion"] = report.to_dict()
            fused = set(report.fused)
            for site, name in zip(sites, new_names):
                self.details["layers"][site.label]["fused"] = name in fused
        return ir.passes.PassResult(model, modified=True)

    def _find_sites(self, model: ir.Model) -> list[_Site]:
        skipped: dict[str, str] = {}
        self.details["skipped"] = skipped
        sites = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.options.op_types:
                continue
            label = node.name or f"{node.op_type}:{node.outputs[0].name}"
            site = self._inspect(node, label, model.graph)
            if isinstance(site, str):
                skipped[label] = site
            else:
                sites.append(site)
        return sites

    def _inspect(self, node: ir.Node, label: str, main_graph: ir.Graph) -> _Site | str:
        """The site for ``node``, or why it stays float."""
        if label in self.options.exclude:
            return "excluded by option 'exclude'"
        if node.graph is not main_graph:
            return "in a subgraph"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "node lacks an input"
        activation, weight = node.inputs[0], node.inputs[1]
        if activation.dtype not in (None, ir.DataType.FLOAT) or _weights.constant_tensor(activation) is not None:
            return f"first input {activation.name!r} is not a float32 activation"
        tensor = _weights.constant_tensor(weight)
        if tensor is None:
            return f"second input {weight.name!r} is not a constant"
        if weight.is_graph_input():
            return f"weight {weight.name!r} is a graph input (it can be overridden at run time)"
        shape = tuple(tensor.shape.numpy())
        if tensor.dtype != ir.DataType.FLOAT or len(shape) != 2:
            return f"weight {weight.name!r} is not a 2-D float32 constant"
        if node.op_type == "MatMul":
            if self.options.format == "contrib":
                add, bias = _bias_add(node, shape[1])
                return _Site(label, node, weight, False, bias, add)
            return _Site(label, node, weight, False, None)
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return "Gemm with transA=1 is not handled"
        transposed = bool(attrs.get_int("transB", 0))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if attrs.get_float("alpha", 1.0) != 1.0 or (bias is not None and attrs.get_float("beta", 1.0) != 1.0):
            return "Gemm with alpha or beta other than 1 is not handled"
        if bias is not None:
            bias_tensor = _weights.constant_tensor(bias)
            n = shape[0] if transposed else shape[1]
            if bias_tensor is None or tuple(bias_tensor.shape.numpy()) != (n,):
                return f"Gemm bias {bias.name!r} is not a constant vector [{n}]"
        return _Site(label, node, weight, transposed, bias)

    def _quantize_weight(self, site: _Site, names: _weights.NameScope) -> tuple[list[ir.Value], float]:
        """Codes [K, N], scales [N] and zero points [N] as initializers of the main graph, and the weight's error."""
        tensor = _weights.constant_tensor(site.weight)
        assert tensor is not None  # checked in _inspect
        array = tensor.numpy()
        w = array.T if site.transposed else array
        quantized = int8.quantize_weight(w, 1, self.options.weight_type)
        rel_error = int8.relative_error(w, quantized.dequantize())
        del array, w
        _weights.release(tensor)
        graph = site.node.graph
        assert isinstance(graph, ir.Graph)
        base = site.weight.name or site.label
        initializers = [
            _weights.add_initializer(graph, names.fresh(f"{base}_quantized"), np.ascontiguousarray(quantized.codes)),
            _weights.add_initializer(graph, names.fresh(f"{base}_scale"), quantized.scales),
            _weights.add_initializer(graph, names.fresh(f"{base}_zero_point"), quantized.zero_points),
        ]
        return initializers, rel_error

    def _rewrite(
        self,
        site: _Site,
        initializers: list[ir.Value],
        activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]],
        names: _weights.NameScope,
    ) -> str:
        """Replace the layer by its dynamic-quantized form; returns the name of the node computing the product."""
        node = site.node
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        a = node.inputs[0]
        assert a is not None
        old = (site.bias_add or node).outputs[0]
        codes, scale, zero_point = initializers
        product_name = names.fresh(f"{site.label.replace(':', '_')}_quantized")
        new_nodes: list[ir.Node] = []
        if self.options.format == "contrib":
            inputs = [a, codes, scale, zero_point, site.bias]
            product = ir.node(
                "DynamicQuantizeMatMul", inputs[: 5 if site.bias else 4], domain="com.microsoft", name=product_name
            )
            new_nodes.append(product)
        else:
            if a not in activations:
                dql = ir.node("DynamicQuantizeLinear", [a], num_outputs=3, name=names.fresh(f"{a.name}_dynamic_q"))
                for value, suffix, dtype in zip(
                    dql.outputs,
                    ("quantized", "scale", "zero_point"),
                    (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8),
                ):
                    value.name = names.fresh(f"{a.name}_{suffix}")
                    value.type = ir.TensorType(dtype)
                value_shape = a.shape
                dql.outputs[0].shape = ir.Shape(value_shape) if value_shape is not None else None
                graph.insert_before(node, dql)
                activations[a] = (dql.outputs[0], dql.outputs[1], dql.outputs[2])
            a_q, a_scale, a_zero_point = activations[a]
            product = ir.node("MatMulInteger", [a_q, codes, a_zero_point, zero_point], name=product_name)
            cast = ir.node(
                "Cast",
                [product.outputs[0]],
                attributes={"to": ir.DataType.FLOAT},
                name=names.fresh(f"{product_name}_cast"),
            )
            scales = ir.node("Mul", [a_scale, scale], name=names.fresh(f"{product_name}_scales"))
            rescale = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=names.fresh(f"{product_name}_rescale"))
            new_nodes += [product, cast, scales, rescale]
            if site.bias is not None:
                new_nodes.append(
                    ir.node("Add", [rescale.outputs[0], site.bias], name=names.fresh(f"{product_name}_bias"))
                )
            for inner in new_nodes[:-1]:
                inner.outputs[0].name = names.fresh(f"{inner.name}_out")
        graph.insert_before(node, new_nodes)
        out = new_nodes[-1].outputs[0]
        out.type, out.shape = old.type, old.shape
        name = old.name
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove([n for n in (site.bias_add, node) if n is not None], safe=True)
        out.name = name
        return product_name


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add of a constant vector [N] that is the only reader of a MatMul's output, and that vector."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    bias = add.inputs[1 - uses[0].idx]
    tensor = None if bias is None else _weights.constant_tensor(bias)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or tuple(tensor.shape.numpy()) != (n,):
        return None, None
    return add, bias
