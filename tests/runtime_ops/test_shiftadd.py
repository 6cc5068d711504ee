"""ai.kiln.ShiftAddMatMul: the function form run by ONNX Runtime against the numpy reference, and input checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import testing
from kiln.errors import KilnError
from kiln.runtime_ops import shiftadd

RNG = np.random.default_rng(0)


def _random(k: int, n: int, bits: int, group: int, mantissa_bits: int = 0) -> shiftadd.PackedWeight:
    signs = RNG.random((n, bits, k)) < 0.5
    exponents = RNG.integers(-8 << mantissa_bits, 4 << mantissa_bits, (n, bits, shiftadd.n_groups(k, group)))
    return shiftadd.pack(signs, exponents, group, mantissa_bits)


def _model(packed: shiftadd.PackedWeight, batch: list[int | str], opset: int = 21, *, set_shape: bool = True) -> bytes:
    x = testing.value("x", [*batch, packed.k])
    planes = testing.initializer("planes", packed.planes)
    exponents = testing.initializer("exponents", packed.exponents)
    model = testing.model([x], [], [], [planes, exponents], opset=opset)
    node = shiftadd.add_node(model, x, planes, exponents, packed, "shiftadd")
    model.graph.append(node)
    y = node.outputs[0]
    y.name = "y"
    model.graph.outputs.append(y)
    if set_shape:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    else:
        y.shape = None
    return ir.to_proto(model).SerializeToString()


def _session(packed: shiftadd.PackedWeight, batch: list[int | str]) -> ort.InferenceSession:
    return ort.InferenceSession(_model(packed, batch), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("k", "n", "bits", "group", "mantissa_bits"),
    [
        (64, 16, 3, 32, 0),
        (37, 5, 3, 16, 0),
        (100, 7, 4, 32, 0),
        (130, 9, 1, 128, 0),
        (24, 3, 2, 7, 0),
        (16, 1, 2, 64, 0),
        (64, 16, 3, 32, 3),
        (37, 5, 2, 16, 1),
        (100, 7, 4, 32, 4),
    ],
)
def test_function_form_matches_reference(k: int, n: int, bits: int, group: int, mantissa_bits: int) -> None:
    """Random shapes, ragged K (not a multiple of 8 nor of the group) and scales with mantissas included."""
    packed = _random(k, n, bits, group, mantissa_bits)
    session = _session(packed, ["batch", "seq"])
    a = RNG.standard_normal((2, 3, k)).astype(np.float32)
    y = session.run(None, {"x": a})[0]
    expected = shiftadd.reference(a, packed)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # One-hot rows read W out exactly: the function form rebuilds the reference weight bit for bit.
    w = session.run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0]
    assert np.array_equal(w, shiftadd.dequantize(packed).astype(np.float32))


def test_reference_definition_by_hand() -> None:
    """W[k, n] = sum_i 2^e[n, i, k // g] * (+1 if bit set else -1), bits LSB first."""
    signs = np.array([[[1, 0, 1], [0, 0, 1]]], dtype=bool)  # N=1, bits=2, K=3
    exponents = np.array([[[1, -1], [0, 2]]], dtype=np.int8)  # group_size 2: rows {0, 1} and {2}
    packed = shiftadd.pack(signs, exponents, group_size=2)
    assert packed.planes.tolist() == [[[0b101], [0b100]]]
    w = shiftadd.dequantize(packed)[:, 0]
    assert w.tolist() == [2 - 1, -2 - 1, 0.5 + 4]
    a = np.array([[1.0, 10.0, 100.0]], dtype=np.float32)
    assert shiftadd.reference(a, packed).tolist() == [[1 - 30 + 450]]


def test_scale_codes_are_floats_with_mantissa_bits() -> None:
    """c = 2^t e + f stands for 2^e (1 + f / 2^t); t = 0 is a power of two."""
    codes = np.array([0, 1, 5, 7, 8, -1, -8, -128, 127], dtype=np.int8)
    assert shiftadd.scales(codes, 0).tolist() == [2.0**c for c in codes.tolist()]
    # t = 3: e = floor(c / 8), f = c mod 8
    assert shiftadd.scales(codes, 3).tolist() == [1.0, 1.125, 1.625, 1.875, 2.0, 0.9375, 0.5, 2.0**-16, 1.875 * 2**15]
    signs = np.array([[[1, 0]]], dtype=bool)  # N=1, bits=1, K=2
    packed = shiftadd.pack(signs, np.array([[[-3]]]), group_size=2, mantissa_bits=2)  # e = -1, f = 1: 0.625
    assert shiftadd.dequantize(packed)[:, 0].tolist() == [0.625, -0.625]
    assert packed.attributes["mantissa_bits"] == 2


def test_float16_activations() -> None:
    packed = _random(48, 6, 3, 16)
    x = testing.value("x", ["batch", 48], ir.DataType.FLOAT16)
    planes = testing.initializer("planes", packed.planes)
    exponents = testing.initializer("exponents", packed.exponents)
    model = testing.model([x], [], [], [planes, exponents])
    node = shiftadd.add_node(model, x, planes, exponents, packed, "shiftadd")
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    assert node.outputs[0].dtype == ir.DataType.FLOAT16
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    a = RNG.standard_normal((4, 48)).astype(np.float16)
    y = session.run(None, {"x": a})[0]
    assert y.dtype == np.float16
    expected = shiftadd.reference(a, packed).astype(np.float32)
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=0, atol=2e-3 * np.abs(expected).max())


def test_shape_inference_through_the_function() -> None:
    packed = _random(40, 12, 2, 16)
    proto = onnx.load_from_string(_model(packed, ["b", 5], set_shape=False))
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["b", 5, 12]
    assert shiftadd.output_shape(ir.Shape(["b", 5, 40]), 12) == ir.Shape(["b", 5, 12])
    assert shiftadd.output_shape(None, 12) is None


def test_old_opset_is_refused() -> None:
    packed = _random(32, 4, 2, 16)
    with pytest.raises(KilnError, match=r"needs the default opset >= 18, got 17"):
        _model(packed, ["b"], opset=17)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bits": 5}, r"bits=5, must be 1\.\.4"),
        ({"bits": 2}, r"planes have shape \[4, 3, 5\], expected \[N, bits, ceil\(K/8\)\] = \[4, 2, 5\]"),
        ({"k": 48}, r"planes have shape \[4, 3, 5\], expected .* = \[4, 3, 6\]"),
        ({"group_size": 8}, r"exponents have shape \[4, 3, 3\], expected .* = \[4, 3, 5\]"),
        ({"planes": np.zeros((4, 3, 5), np.int8)}, r"planes must be uint8, got int8"),
        ({"exponents": np.zeros((4, 3, 3), np.int16)}, r"exponents must be int8, got int16"),
        ({"exponents": np.full((4, 3, 3), -127, np.int8)}, r"exponents span \[-127, -127\], outside \[-126, 127\]"),
        ({"planes": np.full((4, 3, 5), 255, np.uint8)}, r"padding bits past K=36"),
        ({"group_size": 0}, r"group_size=0 must be positive"),
        ({"mantissa_bits": 5}, r"mantissa_bits=5, must be 0\.\.4"),
    ],
)
def test_bad_packed_inputs_are_rejected(change: dict, message: str) -> None:
    packed = _random(36, 4, 3, 16)
    bad = dataclasses.replace(packed, **change)
    with pytest.raises(shiftadd.PackedInputError, match=message):
        shiftadd.dequantize(bad)


def test_reference_rejects_wrong_activation_width() -> None:
    packed = _random(32, 4, 2, 16)
    with pytest.raises(shiftadd.PackedInputError, match=r"A has shape \[2, 31\], its last axis must be K=32"):
        shiftadd.reference(np.zeros((2, 31), np.float32), packed)
