"""Packed layouts of MatMulNBits and DequantizeLinear weights, checked against ONNX Runtime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from kiln.passes.quantize import grid, pack
from kiln.passes.quantize.grid import GridSpec


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _matmulnbits_model(m: pack.MatMulNBitsWeights, rows: int) -> onnx.ModelProto:
    k, n = m.attributes["K"], m.attributes["N"]
    inits = [numpy_helper.from_array(m.b, "B"), numpy_helper.from_array(m.scales, "scales")]
    inputs = ["A", "B", "scales"]
    if m.zero_points is not None:
        inits.append(numpy_helper.from_array(m.zero_points, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **m.attributes)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def test_pack_bits_layout_by_hand() -> None:
    # 4 bits: element 2i in the low nibble, 2i+1 in the high nibble.
    assert pack.pack_bits(np.array([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    # 2 bits: four per byte, least significant first: 1 | 2<<2 | 3<<4 | 0<<6 = 0b00111001.
    assert pack.pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # A ragged row is padded with the fill value; signed values keep their two's complement low bits.
    assert pack.pack_bits(np.array([5]), 4, fill=8).tolist() == [0x85]
    assert pack.pack_bits(np.array([-1, -8], dtype=np.int8), 4).tolist() == [0x8F]
    assert pack.pack_bits(np.array([200, 7]), 8).tolist() == [200, 7]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [1, 5, 16, 33])
def test_pack_unpack_roundtrip(bits: int, length: int) -> None:
    values = np.random.default_rng(length).integers(0, 2**bits, size=(3, length))
    packed = pack.pack_bits(values, bits)
    assert packed.shape == (3, -(-length * bits // 8))
    np.testing.assert_array_equal(pack.unpack_bits(packed, bits, length), values)


def test_pack_refuses_other_widths() -> None:
    with pytest.raises(ValueError, match="only 2, 4 and 8-bit"):
        pack.pack_bits(np.zeros(8, np.uint8), 3)


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_layout_decodes_to_the_codes(symmetric: bool) -> None:
    k, n, block = 80, 6, 32  # 3 blocks, the last with 16 rows of padding
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    q = grid.quantize(w, GridSpec(4, block, symmetric))
    m = pack.to_matmulnbits(q)
    assert m.attributes == {"K": k, "N": n, "bits": 4, "block_size": block}
    assert m.b.shape == (n, 3, 16) and m.b.dtype == np.uint8
    np.testing.assert_array_equal(m.scales, q.scales.T)
    stored = pack.unpack_bits(m.b, 4, block).reshape(n, 3 * block)
    offset = 8 if symmetric else 0
    np.testing.assert_array_equal(stored[:, :k], q.codes.T.astype(int) + offset)
    if symmetric:
        assert m.zero_points is None
        assert (stored[:, k:] == 8).all()  # padding sits on the implied zero point
    else:
        assert m.zero_points.shape == (n, 2)  # ceil(3 blocks * 4 bits / 8)
        np.testing.assert_array_equal(pack.unpack_bits(m.zero_points, 4, 3), q.zero_points.T)
        assert (pack.unpack_bits(m.zero_points, 4, 4)[:, 3] == 8).all()  # unused slot: default zero point
        np.testing.assert_array_equal(stored[:, k:], np.repeat(q.zero_points[-1][:, None], 3 * block - k, axis=1))
    assert m.nbytes == m.b.nbytes + m.scales.nbytes + (0 if symmetric else m.zero_points.nbytes)


def test_per_channel_uses_one_power_of_two_block() -> None:
    q = grid.quantize(np.ones((100, 4), np.float32), GridSpec(4, 0, False))
    m = pack.to_matmulnbits(q)
    assert m.attributes["block_size"] == 128
    assert m.b.shape == (4, 1, 64)
    assert pack.matmulnbits_block_size(8, 0) == 16


def test_accuracy_level_attribute_only_when_set() -> None:
    q = grid.quantize(np.ones((32, 4), np.float32), GridSpec(4, 32, False))
    assert "accuracy_level" not in pack.to_matmulnbits(q).attributes
    assert pack.to_matmulnbits(q, accuracy_level=4).attributes["accuracy_level"] == 4
    with pytest.raises(ValueError, match=r"accuracy_level must be 0\.\.4"):
        pack.to_matmulnbits(q, accuracy_level=5)


@pytest.mark.parametrize(
    ("bits", "block", "message"),
    [
        (9, 32, "grids of 2 to 8 bits; got 9"),
        (4, 24, "power of two >= 16, got 24"),
        (4, 8, "power of two >= 16, got 8"),
        (2, 512, "at most 256"),
    ],
)
def test_check_matmulnbits_refuses(bits: int, block: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack.check_matmulnbits(bits, block)


def test_a_3_bit_grid_is_stored_in_4_bits() -> None:
    pack.check_matmulnbits(3, 512)  # the 2-bit block limit does not apply
    assert [pack.storage_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]
    assert [pack.dq_min_opset(b) for b in (2, 3, 8)] == [25, 21, 21]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("k", "block"), [(256, 32), (300, 16), (300, 128)])
def test_matches_onnxruntime_quantizer(bits: int, symmetric: bool, k: int, block: int) -> None:
    """ORT's own MatMulNBitsQuantizer (RTN, same conventions) is the oracle for codes, scales and zero points."""
    n = 24
    w = np.random.default_rng(bits * 1000 + k + block).standard_normal((k, n)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    w[:, 4] = np.abs(w[:, 4])  # an all-positive column
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric)
    quantizer.process()
    oracle = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    oracle_node = quantizer.model.model.graph.node[0]

    m = pack.to_matmulnbits(grid.quantize(w, GridSpec(bits, block, symmetric)))
    assert {a.name: a.i for a in oracle_node.attribute} == m.attributes
    np.testing.assert_array_equal(m.scales, oracle["W_scales"])
    ours = pack.unpack_bits(m.b, bits, block).reshape(n, -1)[:, :k]
    theirs = pack.unpack_bits(oracle[f"W_Q{bits}"], bits, block).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(ours, theirs)
    if k % block == 0:
        np.testing.assert_array_equal(m.b, oracle[f"W_Q{bits}"])  # byte for byte, no padding involved
    if symmetric:
        assert m.zero_points is None and "W_zero_points" not in oracle
    else:
        np.testing.assert_array_equal(m.zero_points, oracle["W_zero_points"])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("k", "group_size"), [(128, 32), (200, 64), (100, 0), (40, 16)])
def test_onnxruntime_kernel_computes_a_times_dequantized(bits: int, symmetric: bool, k: int, group_size: int) -> None:
    n, rows = 12, 3
    rng = np.random.default_rng(k + bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = grid.quantize(w, GridSpec(bits, group_size, symmetric))
    a = rng.standard_normal((rows, k)).astype(np.float32)
    (y,) = _session(_matmulnbits_model(pack.to_matmulnbits(q), rows)).run(None, {"A": a})
    expected = a.astype(np.float64) @ grid.dequantize(q)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("bits", "symmetric", "dtype", "opset"),
    [
        (4, False, ir.DataType.UINT4, 21),
        (4, True, ir.DataType.INT4, 21),
        (8, False, ir.DataType.UINT8, 21),
        (8, True, ir.DataType.INT8, 21),
        (2, False, ir.DataType.UINT2, 25),
        (2, True, ir.DataType.INT2, 25),
        (3, False, ir.DataType.UINT4, 21),  # stored in the next width ONNX has
        (3, True, ir.DataType.INT4, 21),
        (6, True, ir.DataType.INT8, 21),
    ],
)
@pytest.mark.parametrize(("k", "group_size"), [(70, 16), (64, 0)])
def test_dequantize_linear_weights(
    bits: int, symmetric: bool, dtype: ir.DataType, opset: int, k: int, group_size: int
) -> None:
    n = 5
    w = np.random.default_rng(bits).standard_normal((k, n)).astype(np.float32)
    q = grid.quantize(w, GridSpec(bits, group_size, symmetric))
    dq = pack.to_dequantize_linear(q)
    assert dq.x.dtype == dtype and tuple(dq.x.shape) == (k, n)
    assert dq.min_opset == opset
    np.testing.assert_array_equal(dq.x.numpy().astype(np.int16), q.codes)
    if group_size:
        assert dq.attributes == {"axis": 0, "block_size": group_size}
        assert dq.scale.shape == (-(-k // group_size), n)
    else:
        assert dq.attributes == {"axis": 1}  # one group: per-axis form
        assert dq.scale.shape == (n,)
    assert (dq.zero_point is None) == symmetric
    if not symmetric:
        assert dq.zero_point.dtype == dtype
        np.testing.assert_array_equal(dq.zero_point.numpy().astype(np.int16), q.zero_points.reshape(dq.scale.shape))
    width = dtype.bitwidth
    assert dq.nbytes == -(-k * n * width // 8) + dq.scale.nbytes + (0 if symmetric else -(-dq.scale.size * width // 8))

    # ONNX Runtime's DequantizeLinear reproduces grid.dequantize exactly.
    inits = [ir.serde.serialize_tensor(dq.x), numpy_helper.from_array(dq.scale, "scale")]
    inits[0].name = "x"
    inputs = ["x", "scale"]
    if dq.zero_point is not None:
        zp = ir.serde.serialize_tensor(dq.zero_point)
        zp.name = "zp"
        inits.append(zp)
        inputs.append("zp")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", inputs, ["y"], **dq.attributes)],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (y,) = _session(model).run(None, {})
    np.testing.assert_array_equal(y, grid.dequantize(q))
