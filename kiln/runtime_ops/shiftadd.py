"""``ai.kiln.ShiftAddMatMul``: a matmul whose weight is binary-coded with shift-add scales (powers of two, or with
a few mantissa bits).

Semantics (domain ``ai.kiln``, version 1)::

    Y = ShiftAddMatMul(A, planes, exponents)      attributes K, N, bits, group_size, mantissa_bits

    A          float or float16  [..., K]
    planes     uint8             [N, bits, ceil(K / 8)]    bit-planes, 8 sign bits per byte along K, LSB first
    exponents  int8              [N, bits, ceil(K / group_size)]   scale codes
    Y          the type of A     [..., N]

    W[k, n] = sum_{i < bits} scale(exponents[n, i, k // group_size]) * s(n, i, k)
    s(n, i, k) = +1 if bit (k % 8) of planes[n, i, k // 8] is set, else -1
    scale(c) = 2^e * (1 + f / 2^t)   with t = mantissa_bits, e = floor(c / 2^t), f = c - e 2^t
    Y = A @ W

Each bit-plane ``i`` is a {-1, +1} matrix scaled per (column, group of ``group_size`` rows of K), so a kernel
multiplies nothing: it adds or subtracts activations (or looks their signed sums up in a table, for groups of 8
activations sharing one byte of a plane) and shifts the sum by ``e``. With ``mantissa_bits = 0`` (ShiftAddLLM's
power-of-two scales) a scale is ``2^c`` and the shift is all; with ``t > 0`` the code is a fixed-point log2 with
``t`` fraction bits read Mitchell-style (a floating-point number with a ``t``-bit mantissa), and the multiply by
``1 + f / 2^t`` is at most ``t`` more shifts and adds, as ShiftAddLLM's own code scales by sums of three powers of
two ("APoT"). Power-of-two steps cost 3-bit weights most of what binary coding gains (:mod:`kiln.passes.shiftadd.fit`).
Padding bits past K in the last byte of each plane must be 0; with ``t = 0`` the exponents' range keeps every scale
a normal float32 (with ``t >= 1`` every int8 code does). Nodes written before ``mantissa_bits`` existed carry their
own 4-attribute function; kiln's kernels read a missing ``mantissa_bits`` as 0.

Three forms of the same op live here:

* :func:`reference`: numpy, the definition (W in float64, which is exact for bits <= 4 and exponent spreads < 50,
  then ``A @ W`` in float64, cast to A's type);
* :func:`function`: an ONNX function of standard ops (opset >= 18) attached to a model as a model-local function, so
  any ONNX runtime runs the op unchanged (W is rebuilt from the planes on every call, then a float MatMul);
* :func:`check_packed`: the checks every producer and consumer applies to the packed inputs.

:func:`output_shape` is the op's shape inference; :func:`add_node` inserts the op and its function into a model and
sets the output's type and shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError

DOMAIN = "ai.kiln"
OP_TYPE = "ShiftAddMatMul"
VERSION = 1
#: The function body needs BitwiseAnd (opset 18) and ReduceSum with an axes input (13).
MIN_OPSET = 18
MAX_BITS = 4
#: Fraction bits of a scale code: 1 + f / 2^t multiplies with at most t shifts and adds.
MAX_MANTISSA_BITS = 4
#: Scales 2^e stay normal float32 numbers.
EXPONENT_MIN = -126
EXPONENT_MAX = 127
#: The node's attributes, in the order of :class:`PackedWeight`'s size fields.
ATTRIBUTES = ("K", "N", "bits", "group_size", "mantissa_bits")


class PackedInputError(KilnError):
    """Packed shift-add weights that do not match the op's layout."""


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """The weight inputs and attributes of one ShiftAddMatMul node."""

    planes: np.ndarray
    exponents: np.ndarray
    k: int
    n: int
    bits: int
    group_size: int
    mantissa_bits: int = 0

    @property
    def nbytes(self) -> int:
        return self.planes.nbytes + self.exponents.nbytes

    @property
    def attributes(self) -> dict[str, int]:
        return dict(zip(ATTRIBUTES, (self.k, self.n, self.bits, self.group_size, self.mantissa_bits), strict=True))


def code_range(mantissa_bits: int) -> tuple[int, int]:
    """The valid scale codes: with ``t = 0`` those whose 2^c is a normal float32, with ``t >= 1`` every int8."""
    return (EXPONENT_MIN, EXPONENT_MAX) if mantissa_bits == 0 else (-128, 127)


def scales(exponents: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """The scales (float64, exact) of int8 scale codes ``exponents`` with ``mantissa_bits`` fraction bits."""
    codes = exponents.astype(np.int64)
    e = codes >> mantissa_bits  # floor division by 2^t
    fraction = codes - (e << mantissa_bits)
    return np.ldexp(1.0 + fraction / float(1 << mantissa_bits), e)


def n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def pack(signs: np.ndarray, exponents: np.ndarray, group_size: int, mantissa_bits: int = 0) -> PackedWeight:
    """Pack plane signs ``signs`` [N, bits, K] (True = +1) and scale codes ``exponents`` [N, bits, groups] into the
    op's layout."""
    if signs.ndim != 3:
        raise PackedInputError(f"signs must be [N, bits, K], got shape {list(signs.shape)}")
    n, bits, k = signs.shape
    planes = np.packbits(signs.astype(bool), axis=-1, bitorder="little")
    codes = np.ascontiguousarray(exponents, dtype=np.int8)
    packed = PackedWeight(planes, codes, k, n, bits, group_size, mantissa_bits)
    check_packed(packed)
    return packed


def check_packed(packed: PackedWeight, where: str = "ShiftAddMatMul") -> None:
    """Reject packed inputs that break the layout: shapes, dtypes, bit counts, exponent range, padding bits."""
    k, n, bits, group = packed.k, packed.n, packed.bits, packed.group_size
    if not 1 <= bits <= MAX_BITS:
        raise PackedInputError(f"{where}: bits={bits}, must be 1..{MAX_BITS}")
    if k < 1 or n < 1:
        raise PackedInputError(f"{where}: K={k} and N={n} must be positive")
    if group < 1:
        raise PackedInputError(f"{where}: group_size={group} must be positive")
    if not 0 <= packed.mantissa_bits <= MAX_MANTISSA_BITS:
        raise PackedInputError(f"{where}: mantissa_bits={packed.mantissa_bits}, must be 0..{MAX_MANTISSA_BITS}")
    planes, exponents = packed.planes, packed.exponents
    if planes.dtype != np.uint8:
        raise PackedInputError(f"{where}: planes must be uint8, got {planes.dtype}")
    if exponents.dtype != np.int8:
        raise PackedInputError(f"{where}: exponents must be int8, got {exponents.dtype}")
    want_planes = (n, bits, math.ceil(k / 8))
    if planes.shape != want_planes:
        raise PackedInputError(
            f"{where}: planes have shape {list(planes.shape)}, expected [N, bits, ceil(K/8)] = {list(want_planes)}"
        )
    want_exponents = (n, bits, n_groups(k, group))
    if exponents.shape != want_exponents:
        raise PackedInputError(
            f"{where}: exponents have shape {list(exponents.shape)}, expected [N, bits, ceil(K/group_size)] = "
            f"{list(want_exponents)}"
        )
    low, high = int(exponents.min()), int(exponents.max())
    valid_low, valid_high = code_range(packed.mantissa_bits)
    if low < valid_low or high > valid_high:
        raise PackedInputError(
            f"{where}: exponents span [{low}, {high}], outside [{valid_low}, {valid_high}] (2^e must be a normal "
            "float32)"
        )
    if k % 8 and np.any(planes[..., -1] >> (k % 8)):
        raise PackedInputError(f"{where}: padding bits past K={k} in the last byte of a plane must be 0")


def signs(packed: PackedWeight) -> np.ndarray:
    """The {-1, +1} planes as int8 [N, bits, K]."""
    bits = np.unpackbits(packed.planes, axis=-1, count=packed.k, bitorder="little")
    return (2 * bits.astype(np.int8) - 1).astype(np.int8)


def dequantize(packed: PackedWeight) -> np.ndarray:
    """The weight ``W`` [K, N] the op computes with, in float64 (exact: a sum of at most 4 signed scales of at most
    5 significant bits)."""
    check_packed(packed)
    per_group = scales(packed.exponents, packed.mantissa_bits)  # [N, bits, groups]
    per_row = np.repeat(per_group, packed.group_size, axis=-1)[..., : packed.k]
    return np.einsum("nik,nik->kn", signs(packed), per_row)


def reference(a: np.ndarray, packed: PackedWeight) -> np.ndarray:
    """The op's definition: ``A @ W`` in float64, cast to A's type."""
    if a.shape[-1:] != (packed.k,):
        raise PackedInputError(f"ShiftAddMatMul: A has shape {list(a.shape)}, its last axis must be K={packed.k}")
    return (a.astype(np.float64) @ dequantize(packed)).astype(a.dtype)


def output_shape(a_shape: ir.Shape | None, n: int) -> ir.Shape | None:
    """Shape inference: ``[..., K] -> [..., N]`` (unknown when A's rank is unknown)."""
    if a_shape is None or len(a_shape) < 1:
        return None
    return ir.Shape([*a_shape[:-1], n])


def _const(name: str, array: np.ndarray) -> ir.Node:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)})
    node.outputs[0].name = name
    return node


def function(opset: int) -> ir.Function:
    """The op as an ONNX function of standard ops, for a model whose default opset is ``opset`` (>= 18)."""
    if opset < MIN_OPSET:
        raise KilnError(f"{DOMAIN}.{OP_TYPE}'s function form needs the default opset >= {MIN_OPSET}, got {opset}")
    a = ir.Value(name="A")
    planes = ir.Value(name="planes")
    exponents = ir.Value(name="exponents")
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: Sequence[ir.Value], name: str, **attributes: object) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes)
        node.outputs[0].name = name
        nodes.append(node)
        return node.outputs[0]

    constants = {
        "shifts": np.arange(8, dtype=np.uint8),
        "one_u8": np.array(1, dtype=np.uint8),
        "zero": np.array([0], dtype=np.int64),
        "zero_scalar": np.array(0, dtype=np.int64),
        "one_scalar": np.array(1, dtype=np.int64),
        "minus_one": np.array([-1], dtype=np.int64),
        "last_axis": np.array([-1], dtype=np.int64),
        "plane_axis": np.array([1], dtype=np.int64),
        "k_axis": np.array([2], dtype=np.int64),
        "two": np.array(2.0, dtype=np.float32),
        "one": np.array(1.0, dtype=np.float32),
    }
    c = {}
    for name, array in constants.items():
        nodes.append(_const(name, array))
        c[name] = nodes[-1].outputs[0]
    group_node = ir.Node("", "Constant", [], [ir.RefAttr("value_int", "group_size", ir.AttributeType.INT)])
    group_node.outputs[0].name = "group_size"
    nodes.append(group_node)
    mantissa_node = ir.Node("", "Constant", [], [ir.RefAttr("value_int", "mantissa_bits", ir.AttributeType.INT)])
    mantissa_node.outputs[0].name = "mantissa_bits"
    nodes.append(mantissa_node)

    # Sign bits: [N, bits, C] bytes -> [N, bits, C, 8] bits -> [N, bits, K] values +-1.
    unsqueezed = op("Unsqueeze", [planes, c["last_axis"]], "planes_4d")
    shifted = op("BitShift", [unsqueezed, c["shifts"]], "shifted", direction="RIGHT")
    bits = op("BitwiseAnd", [shifted, c["one_u8"]], "bits")
    k = op("Shape", [a], "k", start=-1)
    n_bits = op("Shape", [planes], "n_bits", end=2)
    flat = op("Reshape", [bits, op("Concat", [n_bits, c["minus_one"]], "flat_shape", axis=0)], "flat_bits")
    cut = op("Slice", [flat, c["zero"], k, c["k_axis"]], "k_bits")
    doubled = op("Mul", [op("Cast", [cut], "bits_f", to=ir.DataType.FLOAT), c["two"]], "bits_2")
    sign = op("Sub", [doubled, c["one"]], "sign")
    # Scales per row of K: 2^e (1 + f / 2^t) [N, bits, groups] gathered at k // group_size.
    unit = op("Pow", [c["two"], op("Cast", [mantissa_node.outputs[0]], "t_f", to=ir.DataType.FLOAT)], "unit")
    code = op("Div", [op("Cast", [exponents], "exponents_f", to=ir.DataType.FLOAT), unit], "code")
    exponent = op("Floor", [code], "exponent")
    mantissa = op("Add", [c["one"], op("Sub", [code, exponent], "fraction")], "mantissa")
    scales = op("Mul", [op("Pow", [c["two"], exponent], "power"), mantissa], "scales")
    k_scalar = op("Squeeze", [k, c["zero"]], "k_scalar")
    rows = op("Range", [c["zero_scalar"], k_scalar, c["one_scalar"]], "rows")
    groups = op("Div", [rows, group_node.outputs[0]], "row_groups")
    per_row = op("Gather", [scales, groups], "row_scales", axis=2)
    weight_t = op("ReduceSum", [op("Mul", [sign, per_row], "planes_scaled"), c["plane_axis"]], "weight_t", keepdims=0)
    weight = op("CastLike", [op("Transpose", [weight_t], "weight_f", perm=[1, 0]), a], "weight")
    y = op("MatMul", [a, weight], "Y")
    graph = ir.Graph([a, planes, exponents], [y], nodes=nodes, opset_imports={"": opset}, name=OP_TYPE)
    attributes = [ir.Attr(name, ir.AttributeType.INT, None) for name in ATTRIBUTES]
    return ir.Function(DOMAIN, OP_TYPE, graph=graph, attributes=attributes)


def add_node(
    model: ir.Model, a: ir.Value, planes: ir.Value, exponents: ir.Value, packed: PackedWeight, name: str
) -> ir.Node:
    """A ShiftAddMatMul node reading ``a`` (not yet inserted), with the op's function and opset added to ``model``.

    The output gets A's type and the inferred shape. Raises KilnError if the model's opset is below MIN_OPSET.
    """
    check_packed(packed, name)
    key = (DOMAIN, OP_TYPE, "")
    if key not in model.functions:
        model.functions[key] = function(model.opset_imports.get("", 0))
    model.opset_imports.setdefault(DOMAIN, VERSION)
    node = ir.node(OP_TYPE, [a, planes, exponents], attributes=packed.attributes, domain=DOMAIN, name=name)
    out = node.outputs[0]
    out.type = a.type
    out.shape = output_shape(a.shape, packed.n)
    return node
