"""qdq: QDQ matmuls become integer matmuls (ONNX rewrite, int16 operands in Relax), with ONNX Runtime's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _x(rows: int = M) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((1, rows, K)) * 1.5).astype(np.float32)


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


def _compiled(model: onnx.ModelProto, path: Path, kind: str) -> tuple[dict, dict[str, str], Any, bool]:
    """``model`` through kiln's CPU lowering (integer QDQ, narrowing, channels-last, kiln's schedules): what
    ``prepare`` lowered, the scheduled scripts of the functions whose names hold ``kind``, the compiled ``main`` and
    whether the host has AVX2 (where the int16 pairs apply)."""
    import tvm
    from tvm.target import codegen

    from kiln.targets.tvm import layout

    onnx.save(model, path)
    prepared = lower.prepare(path, {}, {}, integer_qdq=True)
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = qdq.narrow(relax_build.import_onnx(prepared.proto, prepared.shapes, qdq.importer_converters()))
    mod = relax_build.schedule(relax_build.legalize(layout.channels_last(mod), target), target, None)
    scripts = {gv.name_hint: f.script() for gv, f in mod.functions_items() if kind in gv.name_hint}
    main = tvm.relax.VirtualMachine(relax_build.compile_module(mod, target), tvm.cpu())["main"]
    return prepared.lowered, scripts, main, bool(codegen.target_has_features("avx2", target))


def test_compiled_integer_matmuls_use_int16_pairs_and_match_onnxruntime(tmp_path: Path):
    import tvm

    original = qdq_model()
    lowered, matmuls, main, avx2 = _compiled(original, tmp_path / "qdq.onnx", "matmul")
    assert lowered["QDQ MatMul"] == 2
    assert len(matmuls) == 2 and all('"int16"' in s for s in matmuls.values())
    if avx2:
        assert all("llvm.x86.avx2.pmadd.wd" in s for s in matmuls.values())
    x = _x()
    got = main(tvm.runtime.tensor(x)).numpy()
    expected = _ort(original, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_float_models_are_left_alone():
    from tests.targets.tvm.test_gemm import _model

    w = np.ones((8, 16), np.float32)
    model = ir.from_proto(_model({"x": [4, 8]}, [oh.make_node("MatMul", ["x", "w"], ["y"])], [4, 16], {"w": w}))
    assert qdq.integer_matmuls(model) == 0
    assert [n.op_type for n in model.graph] == ["MatMul"]


def dynamic_model(rows: int = M) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
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
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, rows, K])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, rows, N])],
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


@pytest.mark.parametrize("rows", [M, 1])
def test_compiled_dynamic_quantize_matmul_runs_on_int16_pairs(tmp_path: Path, rows: int):
    """Many rows, and one (batch-1 decode, a classifier), which the gemm rule schedules as a matrix-vector
    product."""
    import tvm

    model, constants = dynamic_model(rows)
    lowered, matmuls, main, avx2 = _compiled(model, tmp_path / "dynamic.onnx", "matmul")
    assert lowered["DynamicQuantizeMatMul"] == 1
    assert len(matmuls) == 1 and '"int16"' in next(iter(matmuls.values()))  # the run-time zero point is 8-bit too
    if avx2:
        assert "llvm.x86.avx2.pmadd.wd" in next(iter(matmuls.values()))
    x = _x(rows)
    expected = _dynamic_reference(x, constants)
    got = main(tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def conv_model(
    channels: int = 16, kernel: int = 1, stride: int = 1, group: int = 1, asymmetric: bool = False
) -> onnx.ModelProto:
    """A QDQ chain on a [1, channels, 14, 14] image: ``Relu(Conv(DQ(Q(x)), DQ(w1), b))`` (the given kernel, stride
    and group; int8 per-output-channel weight, symmetric unless ``asymmetric``), then Q/DQ and a 1x1 ``Conv`` to 24
    channels with a uint8 per-tensor weight and zero point, no bias."""
    rng = np.random.default_rng(3)
    mid = 32
    inits = {
        "sx": np.array(0.03, np.float32),
        "zx": np.array(120, np.uint8),
        "w1": rng.integers(-120, 120, (mid, channels // group, kernel, kernel)).astype(np.int8),
        "s1": (rng.random(mid) * 0.01 + 0.002).astype(np.float32),
        "z1": rng.integers(-7, 8, mid).astype(np.int8) if asymmetric else np.zeros(mid, np.int8),
        "b1": rng.standard_normal(mid).astype(np.float32),
        "sh": np.array(0.05, np.float32),
        "zh": np.array(0, np.uint8),
        "w2": rng.integers(0, 256, (24, mid, 1, 1)).astype(np.uint8),
        "s2": np.array(0.004, np.float32),
        "z2": np.array(131, np.uint8),
    }
    pad = kernel // 2
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        oh.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        oh.make_node("DequantizeLinear", ["w1", "s1", "z1"], ["w1d"], axis=0),
        oh.make_node(
            "Conv",
            ["xd", "w1d", "b1"],
            ["c1"],
            kernel_shape=[kernel] * 2,
            strides=[stride] * 2,
            pads=[pad] * 4,
            group=group,
        ),
        oh.make_node("Relu", ["c1"], ["h"]),
        oh.make_node("QuantizeLinear", ["h", "sh", "zh"], ["hq"]),
        oh.make_node("DequantizeLinear", ["hq", "sh", "zh"], ["hd"]),
        oh.make_node("DequantizeLinear", ["w2", "s2", "z2"], ["w2d"]),
        oh.make_node("Conv", ["hd", "w2d"], ["y"], kernel_shape=[1, 1]),
    ]
    side = 14 // stride
    graph = oh.make_graph(
        nodes,
        "qdq_conv",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, 14, 14])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 24, side, side])],
        [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def _image(channels: int = 16) -> np.ndarray:
    return (np.random.default_rng(4).standard_normal((1, channels, 14, 14)) * 2).astype(np.float32)


def _as_written(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """ONNX Runtime running the ops as written: optimized, it fuses the first convolution into a QLinearConv whose
    AVX2 u8 x s8 kernel saturates pairs of products at int16 (full-range int8 weights, activations near 255), and
    differs from the ONNX semantics by up to 4.1 on this chain."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)[0]


def test_1x1_qdq_convs_become_conv_integer_with_the_same_numbers():
    original = conv_model()
    model = ir.from_proto(original)
    assert qdq.integer_convs(model) == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("ConvInteger") == 2 and "Conv" not in ops and "DequantizeLinear" not in ops
    x = {"x": _image()}
    expected = _as_written(original, x)
    got = _as_written(ir.to_proto(model), x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"kernel": 3}, "1x1"),
        ({"stride": 2}, "strided"),
        ({"group": 2}, "grouped"),
        ({"channels": 15, "group": 1}, "odd input channel count"),
    ],
)
def test_other_convolutions_keep_the_float_path(options: dict, why: str):
    """Only the second (1x1, 32 channels) convolution of the chain is rewritten."""
    model = ir.from_proto(conv_model(**options))
    assert qdq.integer_convs(model) == 1
    assert [n.op_type for n in model.graph].count("Conv") == 1
    first = next(n for n in model.graph if n.op_type == "Conv")
    check = qdq.QdqConvToInteger().check
    x, w = first.inputs[0], first.inputs[1]
    result = check(None, x.producer().inputs[0], w.producer().inputs[0], x, w, first.outputs[0])
    assert not result and why in result.reason


@pytest.mark.parametrize("asymmetric", [False, True])
def test_compiled_integer_convs_use_int16_pairs_and_match_onnxruntime(tmp_path: Path, asymmetric: bool):
    """Both convolutions, with per-output-channel weight zero points too (which ONNX Runtime's ConvInteger rejects,
    so the reference is the QDQ model)."""
    import tvm

    original = conv_model(asymmetric=asymmetric)
    lowered, convs, main, avx2 = _compiled(original, tmp_path / "conv.onnx", "conv2d")
    assert lowered["QDQ Conv"] == 2
    assert len(convs) == 2 and all('"int16"' in s for s in convs.values())
    if avx2:
        assert all("llvm.x86.avx2.pmadd.wd" in s for s in convs.values())
        # 16 -> 32 channels: the map's 14 x 14 pixels as one row loop of 196 in 4 x 16 tiles, rather than rows of 14
        # in 2 x 16 tiles; 32 -> 24 channels: rows of 14 in 7 x 8 tiles
        tiled = sorted("T.axis.spatial(T.int64(196)" in s for s in convs.values())
        assert tiled == [False, True]
        # the first weight's centered codes fit in int8 and stay 8-bit (widened in registers); the second's, uint8
        # codes minus 131, need int16
        assert sorted('"int8"' in s for s in convs.values()) == [False, True]
    x = _image()
    got = main(tvm.runtime.tensor(x)).numpy()
    expected = _as_written(original, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_importer_takes_conv_integer_from_users_models():
    """A ``ConvInteger`` a user's model holds (ONNX Runtime's ``quantize_dynamic`` writes them) is no longer an
    unsupported op, and imports as an int32 convolution."""
    import tvm

    model = ir.from_proto(conv_model())
    qdq.integer_convs(model)
    assert "ConvInteger" not in lower.unsupported_nodes(model)
    mod = relax_build.import_onnx(ir.to_proto(model), {"x": [1, 16, 14, 14]}, qdq.importer_converters())
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    found: list = []
    tvm.relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, tvm.relax.Call) and e.op == conv2d else None
    )
    assert [str(c.ty.dtype) for c in found] == ["int32", "int32"]
