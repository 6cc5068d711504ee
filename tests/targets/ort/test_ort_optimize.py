"""ort-cpu's offline optimization: the saved graph is what runs, and the report names fusions and unfused nodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import kiln
from kiln.errors import KilnError
from kiln.targets.ort import SessionSettings, content, session
from kiln.targets.ort.optimize import fusion_report, save_optimized
from tests.targets.conftest import rtn_recipe


def test_rtn_dq_model_report(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-cpu"), target_options={"optimize": "extended"})
    assert result.verification.passed
    report = result.report["target"]["optimization"]
    assert report["level"] == "extended"
    assert {"MatMulAddFusion", "QDQSelectorActionTransformer"} <= set(report["transformers"])
    assert report["ops_before"]["DequantizeLinear"] == 2
    # The last layer (no Relu after it) became MatMulNBits; the first stayed DequantizeLinear + FusedGemm(Relu).
    assert report["ops_added"]["com.microsoft.MatMulNBits"] == 1
    (unfused,) = report["unfused"]
    assert unfused["nodes"] == ["matmul0_dq"]
    assert "single Relu/Clip" in unfused["reason"]

    settings = SessionSettings.read(out_dir)
    assert settings.model == "model.optimized.onnx"
    assert settings.graph_optimization_level == "ORT_ENABLE_ALL"
    assert settings.session_config == {"session.qdq_matmulnbits_accuracy_level": "4"}
    assert "DequantizeLinear" in settings.notes["session.qdq_matmulnbits_accuracy_level"]
    saved = onnx.load(str(out_dir / "model.optimized.onnx"), load_external_data=False)
    assert not [n for n in saved.graph.node if n.domain == "com.microsoft.nchwc"]
    assert [i.name for i in session(out_dir).get_inputs()] == ["x"]
    assert json.loads((out_dir / "report.json").read_text())["target"]["optimization"]["unfused"]


def test_unoptimized_cpu_target_keeps_model_onnx(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-cpu", bits=8))
    assert "optimization" not in result.report["target"]
    assert SessionSettings.read(out_dir).model == "model.onnx"
    assert not (out_dir / "model.optimized.onnx").exists()


def test_accuracy_level_option_reaches_the_fused_nodes(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    options = {"optimize": "extended", "dq_accuracy_level": 0}
    kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-cpu"), target_options=options)
    saved = onnx.load(str(out_dir / "model.optimized.onnx"), load_external_data=False)
    (nbits,) = [n for n in saved.graph.node if n.op_type == "MatMulNBits"]
    assert oh.get_node_attr_value(nbits, "accuracy_level") == 0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"optimize": "fast"}, "option 'optimize' must be one of"),
        ({"dq_accuracy_level": 7}, "dq_accuracy_level must be 0..4"),
        ({"threads": "2"}, "option 'threads' must be int"),
        ({"inline": True}, "has no option 'inline'"),
    ],
)
def test_bad_target_options(mlp_path: Path, tmp_path: Path, options, fragment):
    with pytest.raises(KilnError, match=fragment):
        kiln.compile_model(mlp_path, tmp_path / "out", "cleanup", target_options=options)
    assert not (tmp_path / "out").exists()


def _qdq_model(path: Path) -> Path:
    """x -> Q/DQ -> MatMul(DQ(int8 w)) -> Q/DQ -> Sigmoid -> y: the MatMul group fuses, the Sigmoid's cannot."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-127, 127, (32, 16)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz"),
    ]
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        oh.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw"),
        oh.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
        oh.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"], name="qm"),
        oh.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["md"], name="dqm"),
        oh.make_node("Sigmoid", ["md"], ["y"], name="sigmoid"),
    ]
    graph = oh.make_graph(
        nodes,
        "qdq",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, path)
    return path


def test_qdq_report(tmp_path: Path):
    source = _qdq_model(tmp_path / "qdq.onnx")
    dest = tmp_path / "opt.onnx"
    transformers = save_optimized(source, dest, "extended", SessionSettings())
    report = fusion_report(onnx.load(source), onnx.load(dest), "extended", transformers)
    assert report["ops_added"] == {"QLinearMatMul": 1}
    (unfused,) = report["unfused"]
    assert unfused["nodes"] == ["dqm"]
    assert "Sigmoid's output is not quantized again" in unfused["reason"]

    basic = fusion_report(onnx.load(source), onnx.load(source), "basic", [])
    assert basic["unfused"] == [
        {"reason": "QDQ -> QLinear* fusions run at level 'extended' and above", "nodes": ["dqx", "dqw", "dqm"]}
    ]


def test_gpu_builds_list_cpu_kernels_in_a_child_process(monkeypatch: pytest.MonkeyPatch):
    """onnxruntime-gpu can crash listing kernels, so it is asked in a child; the child's answer is the same list."""
    in_process = content.cpu_kernels.__wrapped__()
    assert ("com.microsoft", "MatMulNBits") in in_process and ("", "QLinearMatMul") in in_process
    gpu_build = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(content.ort, "get_available_providers", lambda: gpu_build)
    assert content.cpu_kernels.__wrapped__() == in_process
