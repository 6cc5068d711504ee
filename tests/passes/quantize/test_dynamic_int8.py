"""quantize.dynamic-int8 on tiny graphs: both formats against a numpy reference, ONNX Runtime fusion, what is kept."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import testing
from kiln.passes.quantize.dynamic_int8 import DynamicInt8, DynamicInt8Options

RNG = np.random.default_rng(0)
FLOAT = ir.DataType.FLOAT


def _typed(value: ir.Value, name: str, shape: list[int | str]) -> ir.Value:
    value.name, value.type, value.shape = name, ir.TensorType(FLOAT), ir.Shape(shape)
    return value


def _reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Dynamic uint8 activations (ONNX DynamicQuantizeLinear) times per-column symmetric int8 weights."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255)
    z = np.clip(np.rint(-lo / s), 0, 255)
    xq = np.clip(np.rint(x / s) + z, 0, 255)
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    y = ((xq - z) @ np.rint(w / w_scale)) * (s * w_scale)
    return y if bias is None else y + bias


def _run(model: ir.Model, feed: dict[str, np.ndarray], level: str = "ORT_ENABLE_ALL") -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _quantize(model: ir.Model, **options: object) -> DynamicInt8:
    pass_ = DynamicInt8(DynamicInt8Options(**options))
    pass_(model)
    return pass_


def _linear_with_bias(k: int = 32, n: int = 12) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    w, b = RNG.standard_normal((k, n)).astype(np.float32), RNG.standard_normal(n).astype(np.float32)
    x = testing.value("x", ["b", 5, k])
    mm = ir.node("MatMul", [x, testing.initializer("W", w)], name="mm")
    _typed(mm.outputs[0], "h", ["b", 5, n])
    add = ir.node("Add", [mm.outputs[0], testing.initializer("B", b)], name="add")
    y = _typed(add.outputs[0], "y", ["b", 5, n])
    return testing.model([x], [y], [mm, add], [mm.inputs[1], add.inputs[1]]), w, b


@pytest.mark.parametrize(
    ("fmt", "ops"),
    [
        ("contrib", ["DynamicQuantizeMatMul"]),
        ("onnx", ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add"]),
    ],
)
def test_matmul_with_bias_matches_the_reference(fmt: str, ops: list[str]) -> None:
    model, w, b = _linear_with_bias()
    dq = _quantize(model, format=fmt)
    assert [n.op_type for n in model.graph] == ops
    assert model.graph.outputs[0].name == "y"
    assert "W" not in model.graph.initializers
    x = (3 * RNG.standard_normal((2, 5, 32))).astype(np.float32)
    expected = _reference(x, w, b)
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        y = _run(model, {"x": x}, level)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # ONNX Runtime runs both formats as DynamicQuantizeMatMul (the "onnx" one through its fusion).
    assert dq.details["ort_fusion"] == {"integer_ops": {"DynamicQuantizeMatMul": 1}, "fused": 1, "unfused": []}
    layer = dq.details["layers"]["mm"]
    restored = np.rint(w / (np.abs(w).max(0) / 127)) * (np.abs(w).max(0) / 127)
    assert layer["weight_rel_error"] == pytest.approx(np.linalg.norm(w - restored) / np.linalg.norm(w), rel=1e-4)


@pytest.mark.parametrize("fmt", ["contrib", "onnx"])
def test_gemm_transposed_with_bias(fmt: str) -> None:
    k, n = 24, 7
    w, b = RNG.standard_normal((n, k)).astype(np.float32), RNG.standard_normal(n).astype(np.float32)
    x = testing.value("x", ["m", k])
    gemm = ir.node(
        "Gemm", [x, testing.initializer("W", w), testing.initializer("C", b)], attributes={"transB": 1}, name="fc"
    )
    model = testing.model([x], [_typed(gemm.outputs[0], "y", ["m", n])], [gemm], list(gemm.inputs[1:]))
    dq = _quantize(model, format=fmt)
    x_feed = RNG.standard_normal((6, k)).astype(np.float32)
    expected = _reference(x_feed, w.T, b)
    np.testing.assert_allclose(_run(model, {"x": x_feed}), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert dq.details["layers"]["fc"]["fused"] is True


def test_shared_activation_is_quantized_once_in_onnx_format() -> None:
    k = 16
    x = testing.value("x", ["b", 3, k])
    nodes = [
        ir.node("MatMul", [x, testing.initializer(f"W{i}", RNG.standard_normal((k, k)).astype(np.float32))])
        for i in range(3)
    ]
    outputs = [_typed(node.outputs[0], f"y{i}", ["b", 3, k]) for i, node in enumerate(nodes)]
    model = testing.model([x], outputs, nodes, [node.inputs[1] for node in nodes])
    dq = _quantize(model, format="onnx")
    ops = [n.op_type for n in model.graph]
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulInteger") == 3
    assert set(dq.details["layers"]) == {"node_MatMul_0", "node_MatMul_1", "node_MatMul_2"}
    # ONNX Runtime keeps the shared DynamicQuantizeLinear and runs each product as MatMulIntegerToFloat.
    assert dq.details["ort_fusion"] == {"integer_ops": {"MatMulIntegerToFloat": 3}, "fused": 3, "unfused": []}


def test_int8_weight_storage() -> None:
    model, w, _ = _linear_with_bias()
    _quantize(model, weight_type="int8", check_fusion=False)
    codes = model.graph.initializers["W_quantized"].const_value.numpy()
    assert codes.dtype == np.int8 and (model.graph.initializers["W_zero_point"].const_value.numpy() == 0).all()
    np.testing.assert_array_equal(codes, np.rint(w / (np.abs(w).max(0) / 127)))


def test_what_stays_float() -> None:
    k, vocab = 16, 40
    table = RNG.standard_normal((vocab, k)).astype(np.float32)
    ids = testing.value("ids", ["b", 4], ir.DataType.INT64)
    embedding = testing.initializer("E", table)
    gather = ir.node("Gather", [embedding, ids], name="embed")
    _typed(gather.outputs[0], "h", ["b", 4, k])
    transposed = testing.initializer("E_T", table.T.copy())
    head = ir.node("MatMul", [gather.outputs[0], transposed], name="head")
    rows = testing.value("rows", ["m", k])
    scaled = ir.node("Gemm", [rows, testing.initializer("G", table[:k])], attributes={"alpha": 2.0}, name="scaled")
    excluded = ir.node("MatMul", [head.outputs[0], testing.initializer("W", table)], name="excluded")
    _typed(head.outputs[0], "logits", ["b", 4, vocab])
    outputs = [head.outputs[0], _typed(scaled.outputs[0], "s", ["m", k]), _typed(excluded.outputs[0], "z", ["b", 4, k])]
    inits = [embedding, transposed, scaled.inputs[1], excluded.inputs[1]]
    model = testing.model([ids, rows], outputs, [gather, head, scaled, excluded], inits)
    dq = _quantize(model, exclude=["excluded"])
    assert list(dq.details["layers"]) == ["head"]
    assert dq.details["skipped"] == {
        "scaled": "Gemm with alpha or beta other than 1 is not handled",
        "excluded": "excluded by option 'exclude'",
    }
    assert "E" in model.graph.initializers and "E_T" not in model.graph.initializers  # the Gather keeps its table
    feed = {"ids": RNG.integers(0, vocab, (2, 4)), "rows": np.ones((1, k), np.float32)}
    logits = _run(model, feed)
    expected = table[feed["ids"]] @ table.T
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 0.02
    assert not DynamicInt8.needs_calibration
