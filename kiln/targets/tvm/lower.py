"""Make a kiln output importable by TVM's ONNX frontend: static shapes, folded shape arithmetic, no quantized ops.

TVM 0.27's importer (``tvm.relax.frontend.onnx.from_onnx``) rejects blocked ``DequantizeLinear``, has no converter
for ``com.microsoft`` ops, and fails on exported models whose shapes are computed at run time (Shape -> Concat ->
Reshape chains leave tensors of unknown shape). :func:`prepare` rewrites a copy of the model, in this order:

1. **Shapes**: every symbolic input dimension gets a value, from ``input_shapes`` (whole shapes by input name) or
   ``dims`` (values by dimension name, e.g. ``batch=1, seq=128``). An unresolved dimension is a :class:`KilnError`
   naming the input and dimension.
2. **Quantized weights**:

   * ``Y = com.microsoft.MatMulNBits(A, B, scales[, zero_points][, g_idx=None][, bias])`` ->
     ``Y = MatMul(A, P) (+ bias)`` where ``P`` is a new graph input named ``kiln_packed_weight_<i>`` standing for
     the weight; its codes, scales and zero points (``z = 2^(bits-1)`` without zero points; layout in
     :mod:`kiln.passes.quantize.pack`) go to ``Prepared.packed``. After import,
     :func:`kiln.targets.tvm.gemv.use_kernels` runs each such matmul with at most a few rows of ``A`` (decode) as
     kiln's kernel on the packed codes, and binds ``W[n, k] = (q[n, k] - z[n, k // block]) * s[n, k // block]`` as a
     float constant where ``A`` has more rows (the cost there: fp32 bytes and speed; the numbers are exactly those
     ONNX Runtime dequantizes to);
   * ``Y = ai.kiln.ShiftAddMatMul(A, planes, exponents)`` with constant planes and exponents -> the same, its sign
     planes going to ``Prepared.packed``: kiln's shift-add kernel for a few rows, ``W = sum_i 2^e_i s_i`` as a float
     constant for more (without constants, the op's function form is inlined and runs as standard ops);
   * ``DequantizeLinear(x, scale[, zero_point])`` with constant inputs (per-tensor, per-axis or blocked) ->
     the constant ``(x - zero_point) * scale``, the scale repeated ``block_size`` times along ``axis`` when blocked.

   On CPU targets a QDQ MatMul (both inputs dequantized, the weight constant) becomes ``MatMulInteger`` first
   (:mod:`kiln.targets.tvm.qdq`); ``com.microsoft.DynamicQuantizeMatMul`` becomes ``DynamicQuantizeLinear`` +
   ``MatMulInteger`` on every target. Other DequantizeLinear of activations is left to the importer, which lowers
   per-tensor and per-axis quantization; blocked activation quantization is reported as unsupported.
3. **Folding**: onnxscript's optimizer folds the now-static shape computations into constants.
4. **Check**: every remaining op must have a converter in the importer, and no node may use a form the
   importer converts wrongly (:func:`misconverted`, found by running ONNX's per-operator tests through this target);
   otherwise one :class:`KilnError` lists the ops and the nodes using them, before any long work.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer

from kiln.compiler import io
from kiln.errors import KilnError
from kiln.passes.quantize.pack import unpack_bits
from kiln.runtime_ops import shiftadd
from kiln.targets.tvm import gemv, qdq

_STANDARD = ("", "ai.onnx")
_MS = "com.microsoft"
#: Nodes listed per unsupported op in the error message.
_NODES_SHOWN = 3
#: Names of the graph inputs that stand for MatMulNBits and ShiftAddMatMul weights until
#: :func:`kiln.targets.tvm.gemv.use_kernels`.
PACKED_PREFIX = "kiln_packed_weight_"
_FLOAT = ir.TensorType(ir.DataType.FLOAT)


def static_input_shapes(
    model: ir.Model, input_shapes: Mapping[str, list[int]], dims: Mapping[str, int]
) -> dict[str, list[int]]:
    """The fixed shape of every graph input; a dimension neither option resolves is a :class:`KilnError`."""
    names = {v.name for v in model.graph.inputs}
    unknown = sorted(set(input_shapes) - names)
    if unknown:
        raise KilnError(f"input_shapes names {unknown[0]!r}, not an input of the model (inputs: {sorted(names)})")
    shapes: dict[str, list[int]] = {}
    missing: dict[str, list[str]] = collections.defaultdict(list)
    for value in model.graph.inputs:
        model_dims = list(value.shape) if value.shape is not None else []
        if value.name in input_shapes:
            fixed = list(input_shapes[value.name])
            if len(fixed) != len(model_dims) or any(isinstance(d, int) and d != f for d, f in zip(model_dims, fixed)):
                raise KilnError(f"input_shapes: {value.name!r} {fixed} does not fit the model's {_show(model_dims)}")
            shapes[value.name] = fixed
            continue
        resolved = []
        for d in model_dims:
            if isinstance(d, int):
                resolved.append(d)
            elif d.value is not None and d.value in dims:
                resolved.append(int(dims[d.value]))
            else:
                missing[d.value or "?"].append(value.name)
                resolved.append(-1)
        shapes[value.name] = resolved
    if missing:
        named = [
            f"dimension {dim} (input {users[0]!r}" + (f" and {len(users) - 1} more)" if len(users) > 1 else ")")
            for dim, users in missing.items()
        ]
        raise KilnError(
            "TVM compiles static shapes; give a value for "
            + ", ".join(named)
            + " (target option dims = {name = value}, or input_shapes = {input = [d1, d2, ...]})"
        )
    return shapes


def _show(dims: list) -> str:
    return "[" + ", ".join(str(d if isinstance(d, int) else d.value) for d in dims) + "]"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _dequantize_constant(node: ir.Node) -> np.ndarray | None:
    """``(x - zero_point) * scale`` of a DequantizeLinear whose inputs are all constants, else None."""
    x, scale = _const(node.inputs[0]), _const(node.inputs[1])
    zero = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if x is None or scale is None or (len(node.inputs) > 2 and node.inputs[2] is not None and zero is None):
        return None
    values = x.astype(np.float32)
    if zero is not None:
        zero = zero.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.ndim > 0:  # per-axis (1-D scale) or blocked (scale of x's rank)
        axis = _attr(node, "axis", 1) % x.ndim
        block = _attr(node, "block_size", 0)
        if block:
            scale = np.repeat(scale, block, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
            if zero is not None:
                zero = np.repeat(zero, block, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
        else:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            if zero is not None:
                zero = zero.reshape(shape)
    if zero is not None:
        values = values - zero
    return (values * scale).astype(np.float32)


def _matmulnbits_weight(node: ir.Node) -> gemv.PackedWeight:
    """The codes, scales and zero points of a MatMulNBits node's constant weight (KilnError if not constant)."""
    k, n = _attr(node, "K", 0), _attr(node, "N", 0)
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 0)
    packed, scales = _const(node.inputs[1]), _const(node.inputs[2])
    if packed is None or scales is None:
        raise KilnError(f"MatMulNBits node {node.name!r}: packed weights and scales must be constants")
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        raise KilnError(f"MatMulNBits node {node.name!r}: g_idx (act-order) is not supported by the TVM lowering")
    if bits not in (2, 4, 8):
        raise KilnError(f"MatMulNBits node {node.name!r}: {bits}-bit weights (the TVM lowering reads 2, 4 and 8 bits)")
    n_blocks = -(-k // block)
    codes = unpack_bits(packed.reshape(n * n_blocks, -1), bits, block).reshape(n, n_blocks * block)
    zero_input = node.inputs[3] if len(node.inputs) > 3 else None
    if zero_input is None:
        zero = np.full((n, n_blocks), 2 ** (bits - 1), dtype=np.float32)
    else:
        zp = _const(zero_input)
        if zp is None or zp.dtype != np.uint8:
            raise KilnError(f"MatMulNBits node {node.name!r}: zero points must be constant uint8")
        zero = unpack_bits(zp.reshape(n, -1), bits, n_blocks).astype(np.float32)
    scale = scales.reshape(n, n_blocks).astype(np.float32)
    return gemv.PackedWeight(np.ascontiguousarray(codes.T), scale.T.copy(), zero.T.copy(), bits, block, k)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=_FLOAT)
    value.const_value = ir.Tensor(array, name=name)
    graph.register_initializer(value)
    return value


def _shiftadd_weight(node: ir.Node) -> gemv.SignPlanes | None:
    """The packed weight of a ShiftAddMatMul node, or None where it is computed at run time (then its function form
    runs, inlined)."""
    planes, exponents = _const(node.inputs[1]), _const(node.inputs[2])
    if planes is None or exponents is None:
        return None
    weight = shiftadd.PackedWeight(planes, exponents, *(_attr(node, name, 0) for name in shiftadd.ATTRIBUTES))
    shiftadd.check_packed(weight, f"ShiftAddMatMul node {node.name!r}")
    return gemv.SignPlanes(weight)


def _lower_quantized(model: ir.Model, packed: dict[str, gemv.PackedWeight | gemv.SignPlanes]) -> dict[str, int]:
    """Replace MatMulNBits and ShiftAddMatMul by a MatMul with a placeholder input (its weight, in ``packed``), and
    constant DequantizeLinear nodes of the main graph by float constants."""
    graph = model.graph
    counts: dict[str, int] = collections.Counter()
    for node in list(graph):
        kernel_weight: gemv.PackedWeight | gemv.SignPlanes | None = None
        if node.domain == _MS and node.op_type == "MatMulNBits":
            kernel_weight = _matmulnbits_weight(node)
        elif node.domain == shiftadd.DOMAIN and node.op_type == shiftadd.OP_TYPE:
            kernel_weight = _shiftadd_weight(node)
        if kernel_weight is not None:
            name = f"{PACKED_PREFIX}{len(packed)}"
            packed[name] = kernel_weight
            weight = ir.Value(name=name, shape=ir.Shape([kernel_weight.k, kernel_weight.n]), type=_FLOAT)
            graph.inputs.append(weight)
            output = node.outputs[0]
            matmul = ir.node("MatMul", [node.inputs[0], weight], name=f"{node.name}.matmul")
            replacement = [matmul]
            result = matmul.outputs[0]
            bias = node.inputs[5] if len(node.inputs) > 5 else None
            if bias is not None:
                add = ir.node("Add", [result, bias], name=f"{node.name}.bias")
                replacement.append(add)
                result = add.outputs[0]
            result.shape, result.type = output.shape, output.type
            ir.convenience.replace_nodes_and_values(graph, node, [node], replacement, [output], [result])
            counts[node.op_type] += 1
        elif node.domain in _STANDARD and node.op_type == "DequantizeLinear":
            array = _dequantize_constant(node)
            if array is None:
                continue
            output = node.outputs[0]
            folded = _initializer(graph, f"{output.name}.tvm_weight", array)
            output.replace_all_uses_with(folded, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            counts["DequantizeLinear"] += 1
    return dict(counts)


def importer_ops() -> set[str]:
    """Op types TVM's ONNX frontend converts (default domain), with kiln's converters
    (:func:`kiln.targets.tvm.qdq.importer_converters`)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map()) | set(qdq.CONVERTED_OPS)


def _bfloat16(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.BFLOAT16


def _used(value: ir.Value | None, graph_outputs: set[str]) -> bool:
    return value is not None and (bool(value.uses()) or value.name in graph_outputs)


def misconverted(node: ir.Node, graph_outputs: set[str]) -> str | None:
    """Why TVM 0.27's importer would convert ``node`` into something that computes the wrong result, or None.

    Each case was found by ONNX's per-operator tests (libonnx-testdata) through this target: the library built and
    ran, and its outputs differed from the expected ones.
    """
    op = node.op_type
    if op == "LayerNormalization" and any(_used(v, graph_outputs) for v in node.outputs[1:]):
        return "Mean/InvStdDev outputs used (the importer returns placeholders)"
    if op in ("Cast", "CastLike") and (
        _bfloat16(node.outputs[0]) or _bfloat16(node.inputs[0]) or _attr(node, "to", 0) == ir.DataType.BFLOAT16
    ):
        return "bfloat16 (converted wrongly)"
    if op == "ConvTranspose" and "output_shape" in node.attributes:
        return "output_shape attribute (ignored by the importer)"
    if op == "BatchNormalization" and _attr(node, "training_mode", 0):
        return "training_mode = 1 (batch statistics converted wrongly)"
    if op == "IsInf" and not (_attr(node, "detect_negative", 1) and _attr(node, "detect_positive", 1)):
        return "detect_negative/detect_positive = 0 (ignored by the importer)"
    if op == "Expand" and len(node.inputs) > 1 and node.inputs[1] is not None and _const(node.inputs[1]) is None:
        return "shape computed at run time (broadcast wrongly)"
    if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        return "training_mode input (the importer always runs inference mode)"
    if op == "NonMaxSuppression":
        return "selected boxes differ from ONNX's"
    return None


def unsupported_nodes(model: ir.Model) -> dict[str, list[str]]:
    """Nodes (by ``domain.op``) the importer has no converter for or converts wrongly, including in subgraphs."""
    known = importer_ops()
    outputs = {str(v.name) for v in model.graph.outputs}
    found: dict[str, list[str]] = collections.defaultdict(list)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = node.op_type if node.domain in _STANDARD else f"{node.domain}.{node.op_type}"
        label = node.name or f"{node.op_type}:{node.outputs[0].name if node.outputs else '?'}"
        if node.domain not in _STANDARD or node.op_type not in known:
            found[op].append(label)
        elif node.op_type in ("DequantizeLinear", "QuantizeLinear") and _attr(node, "block_size", 0):
            found[f"{op} (blocked, non-constant)"].append(label)
        elif (why := misconverted(node, outputs)) is not None:
            found[f"{op} ({why})"].append(label)
    return dict(found)


def check_supported(model: ir.Model, path: Path) -> None:
    """One :class:`KilnError` listing every op (with some of its nodes) that TVM cannot import."""
    found = unsupported_nodes(model)
    if found:
        parts = []
        for op, nodes in sorted(found.items()):
            shown = ", ".join(repr(n) for n in nodes[:_NODES_SHOWN])
            more = f" and {len(nodes) - _NODES_SHOWN} more" if len(nodes) > _NODES_SHOWN else ""
            parts.append(f"{op} ({len(nodes)} nodes: {shown}{more})")
        raise KilnError(f"{path}: TVM cannot lower these ops: " + "; ".join(parts))


@dataclasses.dataclass
class Prepared:
    """A model ready for ``from_onnx``, and what the runner needs to know about it."""

    proto: onnx.ModelProto
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    outputs: list[str]
    #: Every input and output has the same symbolic first dimension: a larger batch can run in compiled-size chunks.
    batch_split: bool
    lowered: dict[str, int]
    #: MatMulNBits and ShiftAddMatMul weights by the name of the graph input that stands for each (after the model's
    #: own inputs).
    packed: dict[str, gemv.PackedWeight | gemv.SignPlanes] = dataclasses.field(default_factory=dict)


def _first_dim(value: ir.Value) -> str | None:
    dims = list(value.shape) if value.shape is not None else []
    return dims[0].value if dims and not isinstance(dims[0], int) else None


def weight_bytes(model: ir.Model, packed: Mapping[str, gemv.PackedWeight | gemv.SignPlanes]) -> int:
    """Bytes of the main graph's constant weights as TVM will hold them: float32 initializers, and MatMulNBits and
    ShiftAddMatMul weights at their packed size (a matmul with many rows gets a float32 copy instead)."""
    constants = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return constants + sum(w.nbytes for w in packed.values())


def prepare(
    model_file: Path,
    input_shapes: Mapping[str, list[int]],
    dims: Mapping[str, int],
    max_weight_mb: float = math.inf,
    integer_qdq: bool = False,
) -> Prepared:
    """Fix shapes, lower quantized weights, fold, and check every op (see the module docstring).

    Weights over ``max_weight_mb`` after lowering are a KilnError (checked before folding and import). With
    ``integer_qdq``, QDQ matmuls and 1x1 convolutions become integer ones first
    (:func:`kiln.targets.tvm.qdq.integer_matmuls`, :func:`~kiln.targets.tvm.qdq.integer_convs`).
    """
    model = io.load(model_file, check=False)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise KilnError(
                f"{model_file}: {value.name!r} has type {value.type}; the TVM targets take and return tensors only"
            )
    firsts = {_first_dim(v) for v in [*model.graph.inputs, *model.graph.outputs]}
    batch_split = len(firsts) == 1 and None not in firsts
    shapes = static_input_shapes(model, input_shapes, dims)
    dtypes = {v.name: str(v.dtype.numpy()) for v in model.graph.inputs}
    for value in model.graph.inputs:
        value.shape = ir.Shape(shapes[value.name])
    packed: dict[str, gemv.PackedWeight | gemv.SignPlanes] = {}
    integer = qdq.integer_matmuls(model) if integer_qdq else 0
    convs = qdq.integer_convs(model) if integer_qdq else 0
    dynamic = qdq.dynamic_matmuls(model)
    lowered = _lower_quantized(model, packed)
    if integer:
        lowered["QDQ MatMul"] = integer
    if convs:
        lowered["QDQ Conv"] = convs
    if dynamic:
        lowered["DynamicQuantizeMatMul"] = dynamic
    size_mb = weight_bytes(model, packed) / 2**20
    if size_mb > max_weight_mb:
        raise KilnError(
            f"{model_file}: {size_mb:.0f} MB of weights once lowered for TVM (blocked DequantizeLinear weights become "
            "float32), over "
            f"max_weight_mb ({max_weight_mb:.0f}): import and compilation hold the weights several times over in "
            "memory (raise max_weight_mb to compile it anyway; SmolLM2's 538 MB peaked at 4.9 GB)"
        )
    onnxscript.optimizer.optimize(model, num_iterations=2)
    check_supported(model, model_file)
    ir.external_data.load_to_model(model)  # the importer reads tensors from the proto, not from disk
    outputs = [v.name for v in model.graph.outputs]
    return Prepared(ir.serde.serialize_model(model), shapes, dtypes, outputs, batch_split, lowered, packed)
