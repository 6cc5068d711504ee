"""Weight-only round-to-nearest (RTN) quantization of MatMul and Gemm weights.

Math. A constant weight ``W`` [K, N] (K input features, N output columns) is cut along K into groups of
``group_size`` rows (``group_size=0``: one group per column). Each (group, column) pair gets a scale ``s`` and,
when asymmetric, a zero point ``z``, from the group's range; every weight is rounded to the nearest level::

    asymmetric: q = clip(round(w / s) + z, 0, 2^b - 1),           W' = (q - z) * s
    symmetric:  q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1),    W' = q * s

(exact conventions in :mod:`kiln.passes.quantize.grid`). RTN needs no data; ``Y = A @ W`` becomes
``Y' = A @ W'``, and ``weight_rel_error = ||W - W'|| / ||W||`` is recorded per layer.

Graph changes, for each eligible node (``Y`` keeps its name, type and consumers)::

    Y = MatMul(A, W)          ->  Y = com.microsoft.MatMulNBits(A, B, scales[, zero_points])         "matmulnbits"
                              ->  Y = MatMul(A, DequantizeLinear(Wq, scale[, zero_point]))           "dq"
    Y = Gemm(A, W, C)         ->  Y = MatMulNBits(A, B, scales, zero_points, bias=C)                 "matmulnbits"
      (transB 0 or 1)         ->  Y = Add(MatMul(A, DequantizeLinear(Wq, ...)), C)                   "dq"

Layouts are in :mod:`kiln.passes.quantize.pack`. A Gemm with ``transB=1`` stores ``W`` as [N, K]; it is
quantized as ``W^T`` so the result is always in MatMul orientation. The float ``W`` is removed once nothing else
uses it. The new initializers go into the graph of the node using them (ONNX Runtime's DequantizeLinear + MatMul
fusion fails on subgraph nodes reading outer-scope initializers), so a weight used from several graphs gets a
quantized copy in each. "matmulnbits" adds the ``com.microsoft`` opset import (version 1). "dq" needs a
default-domain opset of at least 21 (INT4/UINT4/INT8/UINT8) or 25 (INT2/UINT2): an older model is converted
with onnxscript's version converter (which also inlines model-local functions), and the pass fails with a
KilnError naming the opsets if that conversion fails. The IR version is raised to the one the opset needs.
Note that ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits with ``accuracy_level`` 4 (int8
activations) unless the session config ``session.qdq_matmulnbits_accuracy_level`` says otherwise.

What is eligible: MatMul and Gemm nodes (``op_types``) of the main graph and of every If/Loop/Scan subgraph
(such layers are recorded with ``"subgraph": true``; model-local functions are not visited), whose weight is a
2-D float32/float16 constant (initializer or Constant node) with ``K >= 16`` and ``K * N >= min_elements``,
not a graph input or output, and not used by any node that keeps it float. A weight shared by several
eligible nodes is quantized once and its initializers are shared. Gemm must have ``transA=0``, ``alpha=1`` and,
with a bias, ``beta=1`` and a 1-D bias [N]. Everything else is left alone, with the reason in
``details["skipped"]``.

LM head: kiln treats a node as the LM head when its output is an output of the main graph, or when its weight
is also the data input of a Gather (a tied embedding table). ``quantize_lm_head=False`` keeps such nodes float.
With ``True``, a tied weight is quantized for the matmul and kept float for the Gather, so the file keeps the
float table and gains the quantized copy (``"kept_float": true``), while the matmul runs on the quantized kernel.

Peak memory: weights are read one at a time (``const_value.numpy()`` memory-maps external data) and released
after packing; only the packed copies stay.

AWQ and GPTQ reuse this pass by overriding :meth:`WeightOnlyRTN.quantize_weight`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Literal

import numpy as np
import onnx.helper
import onnx_ir as ir
from onnxscript import version_converter

from kiln.compiler.registry import register
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.quantize import grid, pack

_OP_TYPES = ("MatMul", "Gemm")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
#: Smaller K is skipped: less than MatMulNBits' smallest block (16) of data per column.
_MIN_K = 16


@dataclasses.dataclass
class RTNOptions:
    """Options of ``quantize.rtn`` (and the base of the AWQ/GPTQ options).

    * ``bits``: 2..8 for the grid; both formats store 2, 4 or 8 bits per code, a 3-bit grid in 4 bits and 5..7 in
      8 (:func:`kiln.passes.quantize.pack.storage_bits`).
    * ``group_size``: rows of K per scale; 0 means per-channel (one group spanning all of K). For "matmulnbits"
      it is the op's ``block_size``: a power of two >= 16 (<= 256 for 2 bits).
    * ``symmetric``: signed codes without zero point, else unsigned codes with a zero point per group.
    * ``format``: "matmulnbits" (``com.microsoft.MatMulNBits``) or "dq" (DequantizeLinear + MatMul).
    * ``accuracy_level``: MatMulNBits' minimum precision of A, 0..4 (4 = int8 activations); "matmulnbits" only.
    * ``op_types``: which of MatMul and Gemm to quantize.
    * ``min_elements``: weights with fewer elements (K * N) stay float.
    * ``exclude``: node names to keep float (an unnamed node is named ``"OpType:output_name"``, as in details).
    * ``quantize_lm_head``: whether the LM head (see the module docstring) is quantized too.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    format: Literal["matmulnbits", "dq"] = "matmulnbits"
    accuracy_level: int = 0
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(_OP_TYPES))
    min_elements: int = 4096
    exclude: list[str] = dataclasses.field(default_factory=list)
    quantize_lm_head: bool = True

    def __post_init__(self) -> None:
        grid.GridSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group_size
        if self.format == "matmulnbits":
            if self.group_size and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
                raise ValueError(
                    f"group_size={self.group_size} with format='matmulnbits': it becomes MatMulNBits' block_size, "
                    "which must be a power of two >= 16 (or use 0 for per-channel)"
                )
            if pack.storage_bits(self.bits) == 2 and self.group_size > pack.MATMULNBITS_MAX_2BIT_BLOCK:
                raise ValueError(
                    f"group_size={self.group_size} with bits=2: ONNX Runtime 1.32 runs 2-bit MatMulNBits only "
                    f"with block_size <= {pack.MATMULNBITS_MAX_2BIT_BLOCK}"
                )
            if not 0 <= self.accuracy_level <= 4:
                raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        elif self.format == "dq":
            if self.accuracy_level:
                raise ValueError("accuracy_level applies only to format='matmulnbits'")
        else:
            raise ValueError(f"format must be 'matmulnbits' or 'dq', got {self.format!r}")
        unknown = sorted(set(self.op_types) - set(_OP_TYPES))
        if unknown:
            raise ValueError(f"op_types may contain only 'MatMul' and 'Gemm', got {unknown}")
        if self.min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {self.min_elements}")

    @property
    def spec(self) -> grid.GridSpec:
        """The quantization grid these options describe."""
        return grid.GridSpec(self.bits, self.group_size, self.symmetric)


@dataclasses.dataclass
class WeightSite:
    """A node whose weight will be quantized: what a ``quantize_weight`` override may want to know."""

    label: str
    node: ir.Node
    weight: ir.Value
    #: Gemm ``transB=1``: the stored weight is [N, K] and is quantized transposed.
    transposed: bool
    bias: ir.Value | None
    k: int
    n: int
    lm_head: bool
    #: The weight also feeds a Gather (tied embedding) and stays in the model as float.
    kept_float: bool = False


@dataclasses.dataclass
class _Packed:
    """The new initializers of one weight, shared by the nodes of one graph that use it."""

    inputs: list[ir.Value | None]
    attributes: dict[str, int]
    rel_error: float
    bytes_before: int
    bytes_after: int


@register("quantize.rtn")
class WeightOnlyRTN(KilnPass):
    """Weight-only round-to-nearest quantization of MatMul/Gemm weights to MatMulNBits or DequantizeLinear."""

    Options = RTNOptions

    def quantize_weight(self, weight: np.ndarray, site: WeightSite) -> grid.QuantizedWeight:
        """Put one [K, N] weight on the grid. AWQ and GPTQ override this; the graph rewriting stays shared."""
        return grid.quantize(weight, self.options.spec)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        self.details = {
            "format": opts.format,
            "bits": opts.bits,
            "group_size": opts.group_size,
            "symmetric": opts.symmetric,
            "layers": {},
            "skipped": {},
        }
        sites = self._find_sites(model)
        if not sites:
            return ir.passes.PassResult(model, modified=False)
        if opts.format == "dq":
            if self._ensure_opset(model, pack.dq_min_opset(opts.bits)):
                sites = self._find_sites(model)  # the converter may have rebuilt nodes
        else:
            model.opset_imports.setdefault("com.microsoft", 1)

        names = _weights.NameScope(model)
        # New initializers go into the graph of the node using them: ONNX Runtime's DequantizeLinear + MatMul
        # fusion fails on a subgraph node whose DequantizeLinear reads an outer-scope initializer. A weight used
        # from several graphs is thus quantized once per graph.
        packed: dict[tuple[ir.Value, bool, ir.Graph | None], _Packed] = {}
        users = collections.Counter((site.weight, site.transposed, site.node.graph) for site in sites)
        for site in sites:
            key = (site.weight, site.transposed, site.node.graph)
            if key not in packed:
                packed[key] = self._quantize(site, names)
            self._rewrite(site, packed[key], names, model.graph, shared=users[key] > 1)

        # Totals count each weight once; a tied embedding table kept float for its Gather counts as after, too.
        float_bytes = {weight: entry.bytes_before for (weight, _, _), entry in packed.items()}
        self.details["bytes_before"] = sum(float_bytes.values())
        self.details["bytes_after"] = sum(entry.bytes_after for entry in packed.values()) + sum(
            nbytes for weight, nbytes in float_bytes.items() if not _weights.remove_if_unused(weight)
        )
        return ir.passes.PassResult(model, modified=True)

    # -- finding what to rewrite -------------------------------------------------------------------------------

    def _find_sites(self, model: ir.Model) -> list[WeightSite]:
        skipped: dict[str, str] = {}
        self.details["skipped"] = skipped
        candidates: list[WeightSite] = []
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.options.op_types:
                continue
            label = node.name or f"{node.op_type}:{node.outputs[0].name}"
            site = self._inspect(node, label, model.graph)
            if isinstance(site, str):
                skipped[label] = site
            else:
                candidates.append(site)

        # A weight is replaced only if every use of it is rewritten (a tied embedding's Gather may keep it).
        by_weight: dict[ir.Value, list[WeightSite]] = {}
        for site in candidates:
            by_weight.setdefault(site.weight, []).append(site)
        sites = []
        for weight, group in by_weight.items():
            rewritten = {(site.node, 1) for site in group}
            others = _weights.blocking_uses(weight, rewritten)
            kept_float = bool(others) and all(_is_gather_of(node, weight) for node in others)
            reason = None if kept_float else _weights.replace_blocker(weight, rewritten)
            for site in group:
                if reason is None:
                    site.kept_float = kept_float
                    sites.append(site)
                else:
                    skipped[site.label] = reason
        return sites

    def _inspect(self, node: ir.Node, label: str, main_graph: ir.Graph) -> WeightSite | str:
        """The site for ``node``, or why it is skipped."""
        opts = self.options
        if label in opts.exclude:
            return "excluded by option 'exclude'"
        bias = None
        transposed = False
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0):
                return "Gemm with transA=1 is not handled"
            alpha = attrs.get_float("alpha", 1.0)
            if alpha != 1.0:
                return f"Gemm with alpha={alpha} is not handled (only 1)"
            transposed = bool(attrs.get_int("transB", 0))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            beta = attrs.get_float("beta", 1.0)
            if bias is not None and beta != 1.0:
                return f"Gemm with beta={beta} is not handled (only 1)"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "node has no second input"
        weight = node.inputs[1]
        tensor = _weights.constant_tensor(weight)
        if tensor is None:
            return f"weight {weight.name!r} is not a constant (initializer or Constant node)"
        if weight.is_graph_input():
            return f"weight {weight.name!r} is a graph input (it can be overridden at run time)"
        shape = tuple(tensor.shape.numpy())
        if len(shape) != 2:
            return f"weight {weight.name!r} has shape {list(shape)}: only 2-D weights are quantized"
        if tensor.dtype not in _FLOAT_TYPES:
            return f"weight {weight.name!r} has dtype {tensor.dtype.name}: only FLOAT and FLOAT16 are quantized"
        k, n = (shape[1], shape[0]) if transposed else shape
        if k < _MIN_K:
            return f"K={k} is too small to quantize in groups (needs K >= {_MIN_K})"
        if k * n < opts.min_elements:
            return f"weight has {k * n} elements, fewer than min_elements={opts.min_elements}"
        if bias is not None:
            bias_shape = bias.shape if bias.shape is not None else _const_shape(bias)
            if bias_shape is None or list(bias_shape) != [n]:
                shown = "unknown" if bias_shape is None else list(bias_shape)
                return f"Gemm bias must be 1-D of length N={n}, got shape {shown}"
        if opts.format == "matmulnbits":
            try:
                pack.check_matmulnbits(opts.bits, pack.matmulnbits_block_size(k, opts.group_size))
            except ValueError as e:
                return f"per-channel quantization of K={k}: {e}"
            a_shape = node.inputs[0].shape
            if a_shape is not None and len(a_shape) < 2:
                return "input A is 1-D; MatMulNBits needs A of rank >= 2"
        tied = any(_is_gather_of(use.node, weight) for use in weight.uses())
        lm_head = tied or node.outputs[0] in main_graph.outputs
        if lm_head and not opts.quantize_lm_head:
            why = "its weight is tied to a Gather (embedding)" if tied else "it produces a graph output"
            return f"LM head ({why}) kept float: quantize_lm_head is false"
        return WeightSite(label, node, weight, transposed, bias, k, n, lm_head)

    def _ensure_opset(self, model: ir.Model, target: int) -> bool:
        """Raise the default-domain opset to ``target`` for the DequantizeLinear types; True if converted."""
        current = model.opset_imports.get("")
        converted = False
        if current is None or current < target:
            why = f"format='dq' with bits={self.options.bits} needs the default opset >= {target}"
            try:
                version_converter.convert_version(model, target)
            except Exception as e:
                raise KilnError(
                    f"{why}; converting the model from opset {current} failed ({e}). Use format='matmulnbits'."
                ) from e
            if model.opset_imports.get("", 0) < target:
                raise KilnError(
                    f"{why}; the version converter left the model at opset {model.opset_imports.get('')}. "
                    "Use format='matmulnbits'."
                )
            self.details["opset"] = {"from": current, "to": target}
            converted = True
        needed_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
        model.ir_version = max(model.ir_version, needed_ir)
        return converted

    # -- rewriting ---------------------------------------------------------------------------------------------

    def _quantize(self, site: WeightSite, names: _weights.NameScope) -> _Packed:
        """Quantize and pack one weight, registering its new initializers in the graph of ``site.node``."""
        opts = self.options
        tensor = _weights.constant_tensor(site.weight)
        assert tensor is not None  # checked in _inspect
        array = tensor.numpy()
        w = array.T if site.transposed else array
        q = self.quantize_weight(w, site)
        rel_error = grid.relative_error(w, q)
        bytes_before = array.nbytes
        del array, w
        _weights.release(tensor)
        graph = site.node.graph
        assert isinstance(graph, ir.Graph)
        base = site.weight.name or site.label
        if opts.format == "matmulnbits":
            mnb = pack.to_matmulnbits(q, opts.accuracy_level)
            zero_points = None
            if mnb.zero_points is not None:
                zero_points = _weights.add_initializer(graph, names.fresh(f"{base}_zp"), mnb.zero_points)
            inputs = [
                _weights.add_initializer(graph, names.fresh(f"{base}_q{opts.bits}"), mnb.b),
                _weights.add_initializer(graph, names.fresh(f"{base}_scales"), mnb.scales),
                zero_points,
            ]
            attributes, bytes_after = mnb.attributes, mnb.nbytes
        else:
            dq = pack.to_dequantize_linear(q)
            zero_point = None
            if dq.zero_point is not None:
                zero_point = _weights.add_initializer(graph, names.fresh(f"{base}_zp"), dq.zero_point)
            inputs = [
                _weights.add_initializer(graph, names.fresh(f"{base}_q{opts.bits}"), dq.x),
                _weights.add_initializer(graph, names.fresh(f"{base}_scale"), dq.scale),
                zero_point,
            ]
            attributes, bytes_after = dq.attributes, dq.nbytes
        return _Packed(inputs, attributes, rel_error, bytes_before, bytes_after)

    def _rewrite(
        self, site: WeightSite, packed: _Packed, names: _weights.NameScope, main_graph: ir.Graph, shared: bool
    ) -> ir.Value:
        """Replace ``site.node`` by its quantized form, keeping its output value's name and consumers; returns the
        new output value."""
        opts = self.options
        node = site.node
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        a = node.inputs[0]
        old = node.outputs[0]
        if opts.format == "matmulnbits":
            inputs = [a, *packed.inputs, None, site.bias]
            while inputs[-1] is None:
                inputs.pop()
            new_nodes = [
                ir.node(
                    "MatMulNBits",
                    inputs,
                    attributes=packed.attributes,
                    domain="com.microsoft",
                    name=names.fresh(f"{site.label}_MatMulNBits"),
                )
            ]
        else:
            x, scale, zero_point = packed.inputs
            dq_inputs = [x, scale] if zero_point is None else [x, scale, zero_point]
            dq = ir.node(
                "DequantizeLinear", dq_inputs, attributes=packed.attributes, name=names.fresh(f"{site.label}_dq")
            )
            dq.outputs[0].name = names.fresh(f"{site.weight.name or site.label}_dequantized")
            dq.outputs[0].type = scale.type
            dq.outputs[0].shape = ir.Shape([site.k, site.n])
            matmul = ir.node("MatMul", [a, dq.outputs[0]], name=names.fresh(f"{site.label}_matmul"))
            new_nodes = [dq, matmul]
            if site.bias is not None:
                matmul.outputs[0].name = names.fresh(f"{old.name}_matmul")
                matmul.outputs[0].type, matmul.outputs[0].shape = old.type, old.shape
                new_nodes.append(ir.node("Add", [matmul.outputs[0], site.bias], name=names.fresh(f"{site.label}_bias")))
        graph.insert_before(node, new_nodes)
        out = new_nodes[-1].outputs[0]
        out.type, out.shape = old.type, old.shape
        name = old.name
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = name

        layer: dict[str, Any] = {
            "K": site.k,
            "N": site.n,
            "bits": opts.bits,
            "group_size": opts.group_size,
            "weight": site.weight.name,
            "weight_rel_error": packed.rel_error,
            "bytes_before": packed.bytes_before,
            "bytes_after": packed.bytes_after,
        }
        if graph is not main_graph:
            layer["subgraph"] = True
        if shared:
            layer["shared_weight"] = True
        if site.lm_head:
            layer["lm_head"] = True
        if site.kept_float:
            layer["kept_float"] = True
        self.details["layers"][site.label] = layer
        return out


def _is_gather_of(node: ir.Node, weight: ir.Value) -> bool:
    """``node`` gathers rows of ``weight`` (an embedding lookup)."""
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.inputs[0] is weight


def _const_shape(value: ir.Value) -> tuple[int, ...] | None:
    tensor = _weights.constant_tensor(value)
    return None if tensor is None else tuple(tensor.shape.numpy())
