"""The two output formats of a quantized weight, built from :class:`~kiln.passes.quantize.grid.QuantizedWeight`.

(a) ``com.microsoft.MatMulNBits`` (ONNX Runtime contrib op, opset ``com.microsoft`` 1), computing
    ``Y = A @ dequant(B) (+ bias)``:

    * ``B``: uint8 ``[N, n_blocks, blob_size]``, ``n_blocks = ceil(K / block_size)``,
      ``blob_size = block_size * bits / 8``; column n's codes, block by block along K, packed LSB first
      (4 bits: element 2i in the low nibble, 2i+1 in the high nibble). Codes are unsigned: a symmetric code q is
      stored as ``q + 2^(bits-1)``. The ragged tail of the last block is filled with that block's zero point,
      so it dequantizes to exactly 0.
    * ``scales``: ``[N, n_blocks]``, the dtype of A.
    * ``zero_points`` (asymmetric only): uint8 ``[N, ceil(n_blocks * bits / 8)]``, packed like ``B``, unused
      slots filled with the default ``2^(bits-1)``. Symmetric weights omit it: the op then uses ``2^(bits-1)``.
    * attributes ``K``, ``N``, ``bits``, ``block_size``, and ``accuracy_level`` when not 0 (0 is the op's
      default, and omitting it keeps the model loadable by execution providers that do not know the attribute).

    What ONNX Runtime 1.32's CPU kernel accepts and runs (probed): ``bits`` 2, 4 or 8 (3, 5, 6, 7 are refused
    at session creation, although the schema says 2..8; see "Storage width" below); ``block_size`` a power of two
    >= 16, and at most 256 for 2 bits; uint8 zero points for every width (float zero points are refused for 8
    bits, so kiln never emits them). Per-channel (``group_size=0``) uses one block of ``max(16, next_pow2(K))`` rows.

(b) ONNX ``DequantizeLinear(x, scale[, zero_point])`` of an integer initializer ``x`` [K, N], followed by the
    original ``MatMul``. ``x`` is INT8/UINT8 (opset 21), INT4/UINT4 (opset 21) or INT2/UINT2 (opset 25), signed
    when symmetric (no zero point), unsigned with a zero point of the same type otherwise. Several groups
    along K use blocked quantization (``axis=0``, ``block_size=group_size``, scale ``[n_groups, N]``); a single
    group (per-channel, or ``group_size >= K``) uses per-axis quantization (``axis=1``, scale ``[N]``), which
    more runtimes support.

Storage width. Neither format has 3, 5, 6 or 7-bit storage (ONNX has no such integer types; ONNX Runtime's kernel
refuses those ``bits``), so a weight on a b-bit grid is stored in the next width that exists, ``storage_bits(b)``
(3 -> 4, 5..7 -> 8), unchanged: an unsigned code and its zero point are the same numbers in the wider type, and a
symmetric code q is stored as ``q + 2^(w-1)`` for the storage width w, which the op's default zero point
``2^(w-1)`` undoes. The model computes exactly the b-bit grid's weights, at the w-bit size: a "W3" model is as
accurate as W3 and as large as W4.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kiln.passes.quantize.grid import QuantizedWeight

#: Bit widths ONNX Runtime 1.32's CPU MatMulNBits kernel runs, and the integer widths ONNX's DequantizeLinear takes.
STORAGE_BITS = (2, 4, 8)
#: ONNX Runtime 1.32 refuses 2-bit MatMulNBits with a larger block.
MATMULNBITS_MAX_2BIT_BLOCK = 256

_DQ_TYPES = {
    (2, True): ir.DataType.INT2,
    (2, False): ir.DataType.UINT2,
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
}
_DQ_MIN_OPSET = {2: 25, 4: 21, 8: 21}


def storage_bits(bits: int) -> int:
    """The narrowest stored width that holds a ``bits``-wide grid (module docstring)."""
    return next(width for width in STORAGE_BITS if width >= bits)


def dq_min_opset(bits: int) -> int:
    """The first default-domain opset whose DequantizeLinear takes the storage type of a ``bits``-wide grid."""
    return _DQ_MIN_OPSET[storage_bits(bits)]


def pack_bits(values: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack ``bits``-wide unsigned integers along the last axis into uint8, least significant bits first.

    Value j of a row occupies bits ``[j * bits, (j + 1) * bits)`` of the row's little-endian bit string; a row
    is padded to whole bytes with ``fill``. This is MatMulNBits' layout, and, applied to a flattened array,
    ONNX's INT4/UINT4/INT2/UINT2 layout. Only widths dividing 8 exist in either format.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"only 2, 4 and 8-bit values can be packed, got {bits} bits")
    mask = (1 << bits) - 1
    v = (values.astype(np.int16) & mask).astype(np.uint8)
    if bits == 8:
        return v
    per_byte = 8 // bits
    pad = -v.shape[-1] % per_byte
    if pad:
        v = np.concatenate([v, np.full((*v.shape[:-1], pad), fill & mask, dtype=np.uint8)], axis=-1)
    v = v.reshape(*v.shape[:-1], -1, per_byte)
    packed = np.zeros(v.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        packed |= v[..., j] << np.uint8(bits * j)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` unsigned values of each row, as uint8."""
    if bits not in (2, 4, 8):
        raise ValueError(f"only 2, 4 and 8-bit values can be unpacked, got {bits} bits")
    if bits == 8:
        return packed[..., :count].astype(np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def matmulnbits_block_size(k: int, group_size: int) -> int:
    """MatMulNBits ``block_size`` for a grid: the group size, or one power-of-two block covering K when 0."""
    return group_size if group_size else max(16, 1 << (k - 1).bit_length())


def check_matmulnbits(bits: int, block_size: int) -> None:
    """Raise ValueError unless ONNX Runtime 1.32's MatMulNBits runs a ``bits``-wide grid with this block size."""
    if not 2 <= bits <= 8:
        raise ValueError(f"MatMulNBits holds grids of 2 to 8 bits; got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")
    if storage_bits(bits) == 2 and block_size > MATMULNBITS_MAX_2BIT_BLOCK:
        raise ValueError(
            f"2-bit MatMulNBits block_size must be at most {MATMULNBITS_MAX_2BIT_BLOCK} "
            f"(ONNX Runtime 1.32 refuses larger blocks), got {block_size}"
        )


@dataclasses.dataclass
class MatMulNBitsWeights:
    """Initializers and attributes of one ``com.microsoft.MatMulNBits`` node (layouts in the module docstring)."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    attributes: dict[str, int]

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.b.nbytes + self.scales.nbytes + zp


def to_matmulnbits(q: QuantizedWeight, accuracy_level: int = 0) -> MatMulNBitsWeights:
    """Pack a quantized ``[K, N]`` weight for MatMulNBits; ValueError if ONNX Runtime cannot run the result."""
    spec = q.spec
    k, n = q.k, q.n
    block = matmulnbits_block_size(k, spec.group_size)
    check_matmulnbits(spec.bits, block)
    bits = storage_bits(spec.bits)
    if not 0 <= accuracy_level <= 4:
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
    n_blocks = q.scales.shape[0]
    offset = 1 << (bits - 1) if spec.symmetric else 0
    # Codes as stored: unsigned, [K padded to whole blocks, N], the tail of the last block at its zero point.
    stored = np.empty((n_blocks * block, n), dtype=np.uint8)
    stored[:k] = (q.codes.astype(np.int16) + offset).astype(np.uint8)
    stored[k:] = offset if q.zero_points is None else q.zero_points[-1]
    b = pack_bits(stored.T.reshape(n, n_blocks, block), bits)
    zero_points = None
    if q.zero_points is not None:
        zero_points = pack_bits(q.zero_points.T, bits, fill=1 << (bits - 1))
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return MatMulNBitsWeights(b, np.ascontiguousarray(q.scales.T), zero_points, attributes)


@dataclasses.dataclass
class DequantizeLinearWeights:
    """Inputs and attributes of a ``DequantizeLinear`` producing the ``[K, N]`` weight.

    ``x`` and ``zero_point`` are onnx_ir tensors (sub-byte types are stored packed); ``scale`` is numpy.
    """

    x: ir.TensorProtocol
    scale: np.ndarray
    zero_point: ir.TensorProtocol | None
    attributes: dict[str, int]
    #: The default-domain opset the model needs for ``x``'s type.
    min_opset: int
    nbytes: int


def _integer_tensor(values: np.ndarray, dtype: ir.DataType) -> ir.TensorProtocol:
    if dtype.bitwidth == 8:
        return ir.tensor(values)
    return ir.PackedTensor(pack_bits(values.reshape(-1), dtype.bitwidth), dtype, shape=values.shape)


def to_dequantize_linear(q: QuantizedWeight) -> DequantizeLinearWeights:
    """Build the ``DequantizeLinear`` inputs of a quantized ``[K, N]`` weight."""
    spec = q.spec
    width = storage_bits(spec.bits)
    dtype = _DQ_TYPES[width, spec.symmetric]
    x = _integer_tensor(q.codes, dtype)
    if q.scales.shape[0] == 1:
        attributes = {"axis": 1}
        scale = q.scales[0]
        zp = None if q.zero_points is None else q.zero_points[0]
    else:
        attributes = {"axis": 0, "block_size": q.group_len}
        scale = q.scales
        zp = q.zero_points
    zero_point = None if zp is None else _integer_tensor(zp, dtype)
    nbytes = -(-q.codes.size * width // 8) + scale.nbytes + (0 if zp is None else -(-zp.size * width // 8))
    return DequantizeLinearWeights(x, scale, zero_point, attributes, _DQ_MIN_OPSET[width], nbytes)
