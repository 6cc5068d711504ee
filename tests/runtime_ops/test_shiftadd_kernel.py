"""The table-lookup kernel for ai.kiln.ShiftAddMatMul, directly and inside ONNX Runtime, against the reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import testing
from kiln.compiler import registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError
from kiln.passes import PassContext
from kiln.runtime_ops import shiftadd, shiftadd_kernel, shiftadd_ort

RNG = np.random.default_rng(0)


def _random(k: int, n: int, bits: int, group: int, mantissa_bits: int = 0) -> shiftadd.PackedWeight:
    signs = RNG.random((n, bits, k)) < 0.5
    spread = 2 << mantissa_bits
    exponents = RNG.integers(-spread, spread + 1, (n, bits, shiftadd.n_groups(k, group)))
    return shiftadd.pack(signs, exponents, group, mantissa_bits)


@pytest.mark.parametrize(
    ("k", "n", "bits", "group", "rows"),
    [(64, 16, 3, 32, 1), (37, 5, 3, 16, 3), (300, 33, 4, 64, 2), (129, 7, 1, 128, 1), (576, 40, 2, 128, 5)],
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mantissa_bits", [0, 3])
def test_kernel_matches_reference(
    k: int, n: int, bits: int, group: int, rows: int, threads: int, mantissa_bits: int
) -> None:
    """Bit for bit on integer activations (every sum exact), float32 rounding otherwise; ragged K and scales with
    mantissas included."""
    packed = _random(k, n, bits, group, mantissa_bits)
    integers = RNG.integers(-4, 5, (rows, k)).astype(np.float32)
    assert np.array_equal(shiftadd_kernel.matmul(integers, packed, threads), shiftadd.reference(integers, packed))
    a = RNG.standard_normal((2, rows, k)).astype(np.float32)
    expected = shiftadd.reference(a, packed)
    y = shiftadd_kernel.matmul(a, packed, threads)
    assert y.shape == (2, rows, n)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_kernel_rejects_what_it_cannot_run() -> None:
    packed = _random(40, 4, 2, 12)
    with pytest.raises(KilnError, match="group_size a multiple of 8, got 12"):
        shiftadd_kernel.matmul(np.zeros((1, 40), np.float32), packed)
    packed = _random(40, 4, 2, 16)
    with pytest.raises(KilnError, match=r"float32 A \[..., K=40\], got float64 \[1, 40\]"):
        shiftadd_kernel.matmul(np.zeros((1, 40)), packed)
    bad = shiftadd.PackedWeight(packed.planes, packed.exponents, 40, 4, 3, 16)
    with pytest.raises(shiftadd.PackedInputError, match="planes have shape"):
        shiftadd_kernel.matmul(np.zeros((1, 40), np.float32), bad)


@pytest.mark.parametrize("mantissa_bits", [0, 3])
def test_onnx_runtime_runs_the_kernel_on_a_compiled_model(mantissa_bits: int) -> None:
    """shiftadd.bcq's output, moved to the kernel, equals the function form run by plain ONNX Runtime."""
    pytest.importorskip("onnxruntime_extensions", reason="the PyOp path needs onnxruntime-extensions")
    model = testing.mlp([64, 96, 40])
    feeds = [{"x": RNG.standard_normal((16, 64)).astype(np.float32)}]
    options = {"min_elements": 0, "group_size": 32, "mantissa_bits": mantissa_bits}
    registry.create("shiftadd.bcq", options, PassContext(CalibrationData(feeds)))(model)
    node = next(n for n in model.graph if n.op_type == shiftadd.OP_TYPE)
    assert node.attributes["mantissa_bits"].as_int() == mantissa_bits
    function_form = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    assert shiftadd_ort.use_kernel(model) == 2
    assert not model.functions and shiftadd.DOMAIN not in model.opset_imports
    x = RNG.integers(-3, 4, (8, 64)).astype(np.float32)
    expected = function_form.run(None, {"x": x})[0]
    scale = np.abs(expected).max()
    # The second layer's input is a float hidden state: exact tables agree to float32 rounding, 8-bit ones to 1%.
    for activations, atol in (("float", 1e-5), ("int8", 1e-2)):
        options = shiftadd_ort.session_options(2, activations)
        proto = ir.to_proto(model).SerializeToString()
        kernel = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(kernel.run(None, {"x": x})[0], expected, rtol=0, atol=atol * scale)


def test_a_node_written_before_mantissa_bits_runs_on_the_kernel() -> None:
    """Such a node's scales are powers of two; moving it to the kernel's domain gives it mantissa_bits = 0."""
    pytest.importorskip("onnxruntime_extensions", reason="the PyOp path needs onnxruntime-extensions")
    model = testing.mlp([64, 40])
    feeds = [{"x": RNG.standard_normal((16, 64)).astype(np.float32)}]
    registry.create("shiftadd.bcq", {"min_elements": 0, "group_size": 32}, PassContext(CalibrationData(feeds)))(model)
    expected_session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (node,) = [n for n in model.graph if n.op_type == shiftadd.OP_TYPE]
    del node.attributes["mantissa_bits"]
    assert shiftadd_ort.use_kernel(model) == 1 and node.attributes["mantissa_bits"].as_int() == 0
    options = shiftadd_ort.session_options(1, "float")
    kernel = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = RNG.integers(-3, 4, (4, 64)).astype(np.float32)
    expected = expected_session.run(None, {"x": x})[0]
    np.testing.assert_allclose(kernel.run(None, {"x": x})[0], expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("k", "n", "bits", "group", "rows"),
    [(64, 16, 3, 32, 1), (37, 5, 3, 16, 3), (300, 33, 4, 64, 2), (129, 7, 1, 128, 1), (1000, 70, 2, 256, 2)],
)
@pytest.mark.parametrize("mantissa_bits", [0, 2, 4])
def test_int8_activation_kernel(k: int, n: int, bits: int, group: int, rows: int, mantissa_bits: int) -> None:
    """Bit for bit on integer activations up to 255 (ragged K and N, groups over 128, scales with mantissas
    included); within its 8-bit activation rounding on float activations."""
    if not shiftadd_kernel.has_int8_kernel():
        pytest.skip("this CPU has no AVX2")
    packed = _random(k, n, bits, group, mantissa_bits)
    integers = RNG.integers(-255, 256, (rows, k)).astype(np.float32)
    got = shiftadd_kernel.matmul(integers, packed, 2, "int8")
    assert np.array_equal(got, shiftadd.reference(integers, packed))
    a = RNG.standard_normal((rows, k)).astype(np.float32)
    error = np.abs(shiftadd_kernel.matmul(a, packed, 2, "int8") - shiftadd.reference(a, packed))
    # Rounded, but only as much as 8-bit activations are: each group's step puts its largest |x| in [128, 256), so
    # every activation moves by at most half a step, and each output by at most sum_k |W[k, n]| half-step_k.
    peaks = np.abs(np.pad(a, ((0, 0), (0, -k % group)))).reshape(rows, -1, group).max(axis=-1)
    steps = np.repeat(np.exp2(np.floor(np.log2(peaks)) - 7), group, axis=-1)[:, :k]
    bound = (steps / 2) @ np.abs(shiftadd.dequantize(packed))
    assert error.max() > 0 and np.all(error <= bound * (1 + 1e-5) + 1e-6 * np.abs(bound).max())


def test_int8_kernel_notices_a_weight_changed_in_place() -> None:
    """The column-blocked copy is keyed by buffer address; new bytes in the same buffer are a new weight."""
    if not shiftadd_kernel.has_int8_kernel():
        pytest.skip("this CPU has no AVX2")
    packed = _random(256, 64, 2, 64)
    x = RNG.integers(-8, 9, (1, 256)).astype(np.float32)
    first = shiftadd_kernel.matmul(x, packed, 1, "int8")
    packed.planes[:] = ~packed.planes  # every sign flips: W becomes -W
    assert np.array_equal(shiftadd_kernel.matmul(x, packed, 1, "int8"), -first)
    with pytest.raises(KilnError, match="activations must be 'float' or 'int8', got 'int4'"):
        shiftadd_kernel.matmul(x, packed, 1, "int4")
