"""qdq: QDQ matmuls become integer matmuls (ONNX rewrite, int16 operands in Relax), with ONNX Runtime's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln.targets.tvm import lower, qdq, relax_build

M, K, N = 10, 48, 24


def qdq_model(block_weight: bool = False, weight_input: bool = False) -> onnx.ModelProto:
    """``y = MatMul(DQ(Q(x)), DQ(w1)) + b + MatMul(DQ(Q(x)), DQ(w2))``: one dequantized activation, two uint8
    weights with per-column scales and zero points (w1 blocked along K, or a graph input, when asked)."""
    rng = np.random.default_rng(0)
    inits = {
        "sx": np.array(0.02, np.float32),
        "zx": np.array(131, np.uint8),
        "b": rng.standard_normal(N).astype(np.float32),
        "w2": rng.integers(0, 256, (K, N)).astype(np.uint8),
        "s2": (rng.random(N) * 0.01 + 0.001).astype(np.float32),
        "z2": rng.integers(100, 156, N).astype(np.uint8),
    }
    dq1 = oh.make_node("DequantizeLinear", ["w1", "s1", "z1"], ["w1d"], axis=1)
    if block_weight:
        inits["s1"] = (rng.random((K // 16, N)) * 0.01 + 0.001).astype(np.float32)
        inits["z1"] = np.full((K // 16, N), 128, np.uint8)
        dq1 = oh.make_node("DequantizeLinear", ["w1", "s1", "z1"], ["w1d"], axis=0, block_size=16)
    else:
        inits["s1"] = (rng.random(N) * 0.01 + 0.001).astype(np.float32)
        inits["z1"] = rng.integers(100, 156, N).astype(np.uint8)
    inputs = [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, M, K])]
    w1 = rng.integers(0, 256, (K, N)).astype(np.uint8)
    if weight_input:
        inputs.append(oh.make_tensor_value_info("w1", onnx.TensorProto.UINT8, [K, N]))
    else:
        inits["w1"] = w1
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        oh.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        dq1,
        oh.make_node("DequantizeLinear", ["w2", "s2", "z2"], ["w2d"], axis=1),
        oh.make_node("MatMul", ["xd", "w1d"], ["h1"]),
        oh.make_node("Add", ["h1", "b"], ["h1b"]),
        oh.make_node("MatMul", ["xd", "w2d"], ["h2"]),
        oh.make_node("Add", ["h1b", "h2"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "qdq",
        inputs,
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, M, N])],
        [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def _x() -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((1, M, K)) * 1.5).astype(np.float32)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_both_matmuls_of_a_shared_activation_become_matmul_integer_with_the_same_numbers():
    original = qdq_model()
    model = ir.from_proto(original)
    assert qdq.integer_matmuls(model) == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    assert ops.count("DequantizeLinear") == 0  # the matched DequantizeLinear nodes went with their last use
    x = {"x": _x()}
    expected = _ort(original, x)
    got = _ort(ir.to_proto(model), x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["block_weight", "weight_input"])
def test_blocked_or_non_constant_weights_stay_dequantized(kind: str):
    model = ir.from_proto(qdq_model(**{kind: True}))
    assert qdq.integer_matmuls(model) == 1  # only the second, per-column constant weight
    assert [n.op_type for n in model.graph].count("MatMul") == 1


def test_compiled_integer_matmuls_use_int16_pairs_and_match_onnxruntime(tmp_path: Path):
    import tvm
    from tvm.target import codegen

    original = qdq_model()
    path = tmp_path / "qdq.onnx"
    onnx.save(original, path)
    prepared = lower.prepare(path, {}, {}, integer_qdq=True)
    assert prepared.lowered["QDQ MatMul"] == 2
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = qdq.narrow(relax_build.import_onnx(prepared.proto, prepared.shapes))
    mod = relax_build.schedule(relax_build.legalize(mod, target), target, None)
    matmuls = {gv.name_hint: f.script() for gv, f in mod.functions_items() if "matmul" in gv.name_hint}
    assert len(matmuls) == 2 and all('"int16"' in s for s in matmuls.values())
    if codegen.target_has_features("avx2", target):
        assert all("llvm.x86.avx2.pmadd.wd" in s for s in matmuls.values())
    vm = tvm.relax.VirtualMachine(relax_build.compile_module(mod, target), tvm.cpu())
    x = _x()
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    expected = _ort(original, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_float_models_are_left_alone():
    from tests.targets.tvm.test_gemm import _model

    w = np.ones((8, 16), np.float32)
    model = ir.from_proto(_model({"x": [4, 8]}, [oh.make_node("MatMul", ["x", "w"], ["y"])], [4, 16], {"w": w}))
    assert qdq.integer_matmuls(model) == 0
    assert [n.op_type for n in model.graph] == ["MatMul"]


def dynamic_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``y = com.microsoft.DynamicQuantizeMatMul(x, wq, s, z, b)`` (kiln's int8-dynamic form) and its constants."""
    rng = np.random.default_rng(2)
    inits = {
        "wq": rng.integers(0, 256, (K, N)).astype(np.uint8),
        "s": (rng.random(N) * 0.01 + 0.001).astype(np.float32),
        "z": np.full(N, 128, np.uint8),
        "b": rng.standard_normal(N).astype(np.float32),
    }
    node = oh.make_node("DynamicQuantizeMatMul", ["x", "wq", "s", "z", "b"], ["y"], domain="com.microsoft")
    graph = oh.make_graph(
        [node],
        "dynamic",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, M, K])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, M, N])],
        [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    opsets = [oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)]
    return oh.make_model(graph, opset_imports=opsets), inits


def _dynamic_reference(x: np.ndarray, c: dict[str, np.ndarray]) -> np.ndarray:
    """ONNX's DynamicQuantizeLinear of x, then the integer product, rescaled, plus the bias."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((high - low) / 255)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255)
    product = (xq - zero).astype(np.int64) @ (c["wq"].astype(np.int64) - c["z"].astype(np.int64))
    return (product * (scale * c["s"]) + c["b"]).astype(np.float32)


def test_dynamic_quantize_matmul_becomes_standard_integer_ops():
    model, constants = dynamic_model()
    rewritten = ir.from_proto(model)
    assert qdq.dynamic_matmuls(rewritten) == 1
    ops = [n.op_type for n in rewritten.graph]
    assert "DynamicQuantizeMatMul" not in ops and {"DynamicQuantizeLinear", "MatMulInteger"} <= set(ops)
    x = _x()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ops as written
    got = ort.InferenceSession(ir.to_proto(rewritten).SerializeToString(), options).run(None, {"x": x})[0]
    expected = _dynamic_reference(x, constants)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_compiled_dynamic_quantize_matmul_runs_on_int16_pairs(tmp_path: Path):
    import tvm

    model, constants = dynamic_model()
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    prepared = lower.prepare(path, {}, {})
    assert prepared.lowered["DynamicQuantizeMatMul"] == 1
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = qdq.narrow(relax_build.import_onnx(prepared.proto, prepared.shapes))
    mod = relax_build.schedule(relax_build.legalize(mod, target), target, None)
    matmuls = [f.script() for gv, f in mod.functions_items() if "matmul" in gv.name_hint]
    assert len(matmuls) == 1 and '"int16"' in matmuls[0]  # the run-time zero point is 8-bit too
    vm = tvm.relax.VirtualMachine(relax_build.compile_module(mod, target), tvm.cpu())
    x = _x()
    expected = _dynamic_reference(x, constants)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
