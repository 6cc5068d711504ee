"""ort-cuda: a clear refusal without CUDA, CUDA provider settings, fp16 conversion with fp32 islands, and on a
machine with onnxruntime-gpu and a GPU, artifacts that verify and run on the CUDA provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import kiln
from kiln import testing
from kiln.errors import KilnError
from kiln.targets.ort import SessionSettings
from kiln.targets.ort.fp16 import convert_to_fp16
from kiln.targets.ort.runner import OrtRunner
from tests.targets.conftest import rtn_recipe

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
without_cuda = pytest.mark.skipif(CUDA, reason="covers machines without CUDA")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu and a CUDA device")


@without_cuda
def test_compile_refuses_before_any_work(mlp_path: Path, tmp_path: Path):
    with pytest.raises(KilnError) as info:
        kiln.compile_model(mlp_path, tmp_path / "out", rtn_recipe("ort-cuda"))
    assert str(info.value) == (
        "ort-cuda needs onnxruntime-gpu and a CUDA device; this machine's onnxruntime "
        f"{ort.__version__} has providers {ort.get_available_providers()}"
    )
    assert not list(tmp_path.glob("*out*"))


@without_cuda
def test_build_writes_cuda_settings_that_fail_clearly_here(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model_file = kiln.save(kiln.load(mlp_path), out_dir / "model.onnx")
    target = kiln.targets.get("ort-cuda", {"fp16": True, "device_id": 1})
    details = target.build(model_file, out_dir)
    kiln.targets.write_marker(out_dir, target.name)
    settings = SessionSettings.read(out_dir)
    assert settings.model == "model.fp16.onnx"
    assert [p.name for p in settings.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.providers[0].options == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0"}
    assert details["fp16"]["fp16_nodes"] > 0
    with pytest.raises(KilnError, match="need execution provider CUDAExecutionProvider"):
        kiln.targets.load(out_dir)


def _transformer_block() -> ir.Model:
    """x -> MatMul -> LayerNormalization -> Softmax -> Add(eps 1e-12) -> Mul(., MatMul) -> Gelu-ish Erf -> y."""
    rng = np.random.default_rng(0)
    x = testing.value("x", ["b", 16])
    w = testing.initializer("w", (rng.standard_normal((16, 16)) / 4).astype(np.float32))
    scale = testing.initializer("scale", np.ones(16, np.float32))
    bias = testing.initializer("bias", np.zeros(16, np.float32))
    eps = testing.initializer("eps", np.array(1e-12, np.float32))
    mm = ir.node("MatMul", [x, w], name="mm")
    ln = ir.node("LayerNormalization", [mm.outputs[0], scale, bias], attributes={"axis": -1}, name="ln")
    sm = ir.node("Softmax", [ln.outputs[0]], name="softmax")
    add = ir.node("Add", [sm.outputs[0], eps], name="add_eps")
    mul = ir.node("Mul", [add.outputs[0], mm.outputs[0]], name="mul")
    erf = ir.node("Erf", [mul.outputs[0]], name="erf")
    nodes = [mm, ln, sm, add, mul, erf]
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"t{i}"
    y = erf.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(["b", 16])
    return testing.model([x], [y], nodes, [w, scale, bias, eps])


def test_fp16_keeps_sensitive_ops_in_fp32_and_stays_within_tolerance(tmp_path: Path):
    reference = kiln.save(_transformer_block(), tmp_path / "ref" / "model.onnx")
    model = _transformer_block()
    details = convert_to_fp16(model)
    half = kiln.save(model, tmp_path / "half" / "model.onnx")
    assert details["fp32_nodes"] == {
        "LayerNormalization is kept in float32": 1,
        "Softmax is kept in float32": 1,
        "constant 'eps' does not fit float16": 1,
    }
    assert details["fp16_nodes"] == 3  # MatMul, Mul, Erf

    proto = onnx.load(str(half))
    onnx.checker.check_model(proto, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.value_info, *proto.graph.output)}
    by_name = {n.name: n for n in proto.graph.node}
    assert types[by_name["ln"].input[0]] == onnx.TensorProto.FLOAT
    assert types[by_name["softmax"].output[0]] == onnx.TensorProto.FLOAT
    assert types[by_name["mm"].output[0]] == onnx.TensorProto.FLOAT16
    assert {i.name: i.data_type for i in proto.graph.initializer}["w"] == onnx.TensorProto.FLOAT16
    assert [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output] == [("y", onnx.TensorProto.FLOAT)]

    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    want = ort.InferenceSession(str(reference)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(half)).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-2)


def test_fp16_of_a_quantized_model(mlp_path: Path, tmp_path: Path):
    model = kiln.load(mlp_path)
    kiln.Pipeline(
        [kiln.passes.create("quantize.rtn", {"format": "dq", "bits": 4, "group_size": 16, "min_elements": 0})]
    )(model)
    reference = kiln.save(model, tmp_path / "ref" / "model.onnx")
    convert_to_fp16(model)
    half = kiln.save(model, tmp_path / "half" / "model.onnx")
    scales = [i for i in onnx.load(str(half)).graph.initializer if i.name.endswith("_scale")]
    assert scales and all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales)
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    want = ort.InferenceSession(str(reference)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(half)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=5e-3 * np.abs(want).max())


@needs_cuda
@pytest.mark.parametrize("fp16", [False, True])
def test_compile_verifies_and_runs_on_the_cuda_provider(mlp_path: Path, tmp_path: Path, fp16: bool):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-cuda"), target_options={"fp16": fp16})
    assert result.verification.passed
    runner = kiln.targets.load(out_dir)
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    # without graph optimizations: on the CPU, ORT would fuse DequantizeLinear + MatMul into int8-activation MatMulNBits
    exact = SessionSettings(graph_optimization_level="ORT_DISABLE_ALL")
    want = OrtRunner.from_path(out_dir / "model.onnx", settings=exact)({"x": x})["y"]
    got = runner({"x": x})["y"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=(5e-3 if fp16 else 1e-4) * np.abs(want).max())
