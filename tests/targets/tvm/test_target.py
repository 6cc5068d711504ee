"""tvm-llvm: tiny models compiled by TVM match ONNX Runtime, quantized weights are lowered, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from kiln import targets, testing
from kiln.compiler.recipes import parse
from kiln.errors import KilnError
from kiln.targets.ort import SessionSettings
from kiln.targets.ort.runner import OrtRunner
from kiln.targets.tvm import lower
from tests.targets.conftest import rtn_recipe

DIMS = {"dims": {"batch": 2}}
BATCH1 = {"dims": {"batch": 1}}


def _recipe() -> kiln.Recipe:
    text = 'target = "tvm-llvm"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 0.99999\n'
    return parse(text, name="tvm-fp32")


def _compare_with_ort(out_dir: Path, batch: int = 4) -> float:
    """Max |TVM - ORT| on the output directory's own model.onnx, for a random batch of ``batch`` rows."""
    x = np.random.default_rng(1).standard_normal((batch, 64)).astype(np.float32)
    # without graph optimizations: ORT would fuse DequantizeLinear + MatMul into int8-activation MatMulNBits
    exact = SessionSettings(graph_optimization_level="ORT_DISABLE_ALL")
    expected = OrtRunner.from_path(out_dir / "model.onnx", settings=exact)({"x": x})["y"]
    got = targets.load(out_dir)({"x": x})["y"]
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


def test_fp32_mlp_compiles_verifies_and_loads(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, _recipe(), input_shapes={"x": [4, 64]}, target_options=DIMS)
    assert result.verification.passed
    assert {"model.so", "tvm.json", "model.onnx", "report.json", "target.json"} <= {p.name for p in out_dir.iterdir()}
    metadata = json.loads((out_dir / "tvm.json").read_text())
    assert metadata["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 64]}]
    assert metadata["outputs"] == ["y"] and metadata["batch_split"] is True
    assert '"mtriple":"x86_64-linux-gnu"' in metadata["target"] and '"mcpu"' in metadata["target"]
    assert _compare_with_ort(out_dir) < 1e-4  # batch 4 runs as two compiled batches of 2
    runner = targets.load(out_dir)
    assert [(s.name, s.shape) for s in runner.input_specs] == [("x", (2, 64))]
    with pytest.raises(KilnError, match=r"input 'x' has shape \[3, 64\]; this TVM library was compiled for \[2, 64\]"):
        runner({"x": np.zeros((3, 64), np.float32)})


@pytest.mark.parametrize(("fmt", "bits"), [("matmulnbits", 4), ("dq", 4), ("dq", 8)])
def test_quantized_weights_are_lowered_exactly(mlp_path: Path, tmp_path: Path, fmt: str, bits: int):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, rtn_recipe("tvm-llvm", bits=bits, fmt=fmt), target_options=BATCH1)
    assert result.verification.passed
    lowered = result.report["target"]["lowered"]
    assert lowered == ({"MatMulNBits": 2} if fmt == "matmulnbits" else {"DequantizeLinear": 2})
    # the same dequantized weights as ONNX Runtime: only float rounding differs
    assert _compare_with_ort(out_dir) < 1e-4


def test_symmetric_per_channel_matmulnbits(mlp_path: Path, tmp_path: Path):
    recipe = parse(
        """
target = "tvm-llvm"
[[passes]]
name = "quantize.rtn"
options = { format = "matmulnbits", bits = 8, group_size = 0, symmetric = true, min_elements = 0 }
""",
        name="w8-sym",
    )
    out_dir = tmp_path / "out"
    kiln.compile_model(mlp_path, out_dir, recipe, target_options=BATCH1)
    assert _compare_with_ort(out_dir) < 1e-4


def test_unresolved_dimension_is_named_before_any_work(mlp_path: Path, tmp_path: Path):
    with pytest.raises(KilnError, match=r"TVM compiles static shapes; give a value for dimension batch \(input 'x'\)"):
        kiln.compile_model(mlp_path, tmp_path / "out", _recipe())
    assert not (tmp_path / "out").exists()


def test_unsupported_ops_are_listed_with_their_nodes(tmp_path: Path):
    x = testing.value("x", [2, 8])
    nodes = [
        ir.node("Relu", [x], name="relu"),
        ir.node("Custom", [x], domain="my.domain", name="custom0"),
    ]
    nodes.append(ir.node("Custom", [nodes[0].outputs[0]], domain="my.domain", name="custom1"))
    nodes[0].outputs[0].name, nodes[1].outputs[0].name, nodes[2].outputs[0].name = "r", "c0", "c1"
    add = ir.node("Add", [nodes[1].outputs[0], nodes[2].outputs[0]], name="add")
    out = add.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 8])
    model = testing.model([x], [out], [*nodes, add], [], opset=21, name="custom")
    model.opset_imports["my.domain"] = 1

    path = kiln.save(model, tmp_path / "m.onnx")
    expected = r"TVM cannot lower these ops: my\.domain\.Custom \(2 nodes: 'custom0', 'custom1'\)"
    with pytest.raises(KilnError, match=expected):
        lower.prepare(path, {}, {})


def test_bad_options_are_refused():
    with pytest.raises(KilnError, match="dims must map dimension names to positive integers"):
        targets.get("tvm-llvm", {"dims": {"batch": 0}})
    with pytest.raises(KilnError, match="expected HOST:PORT"):
        targets.get("tvm-llvm", {"rpc_tracker": "nohost", "rpc_key": "k"})


def test_oversized_model_is_refused_with_the_limit(tmp_path: Path):
    path = testing.write_matmul_chain(tmp_path / "in", layers=2, dim=512)
    with pytest.raises(KilnError, match=r"2 MB of weights once lowered for TVM .* over max_weight_mb \(1\)"):
        kiln.compile_model(path, tmp_path / "out", _recipe(), target_options={"max_weight_mb": 1, **BATCH1})


def _save_onnx(tmp_path: Path, nodes, inputs, outputs, name: str) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs)
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_scalar_inputs_run(tmp_path: Path):
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    path = _save_onnx(
        tmp_path,
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        [helper.make_tensor_value_info(n, f32, s) for n, s in (("x", [2, 3]), ("lo", []), ("hi", []))],
        [helper.make_tensor_value_info("y", f32, [2, 3])],
        "clip",
    )
    target = targets.get("tvm-llvm")
    target.build(path, tmp_path)
    x = np.array([[-2, -0.5, 0], [0.5, 1, 3]], np.float32)
    y = target.load(tmp_path)({"x": x, "lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)})["y"]
    np.testing.assert_array_equal(y, np.clip(x, -1, 1))


def test_forms_the_importer_converts_wrongly_are_refused(tmp_path: Path):
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    path = _save_onnx(
        tmp_path,
        [helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"], axis=-1, name="ln")],
        [helper.make_tensor_value_info("x", f32, [2, 4]), helper.make_tensor_value_info("w", f32, [4])],
        [helper.make_tensor_value_info("y", f32, [2, 4]), helper.make_tensor_value_info("mean", f32, [2, 1])],
        "ln",
    )
    with pytest.raises(KilnError, match=r"LayerNormalization \(Mean/InvStdDev outputs used .*\) \(1 nodes: 'ln'\)"):
        lower.prepare(path, {}, {})


def test_non_tensor_inputs_are_refused(tmp_path: Path):
    from onnx import TensorProto, helper

    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [2])
    path = _save_onnx(
        tmp_path,
        [helper.make_node("SequenceAt", ["xs", "i"], ["y"])],
        [seq, helper.make_tensor_value_info("i", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        "seq",
    )
    with pytest.raises(KilnError, match=r"'xs' has type .*; the TVM targets take and return tensors only"):
        lower.prepare(path, {}, {})


def test_tvm_failures_are_one_kiln_error_line(tmp_path: Path):
    from onnx import TensorProto, helper

    # TVM 0.27's importer asserts on ConstantOfShape with a shape given at run time.
    path = _save_onnx(
        tmp_path,
        [helper.make_node("ConstantOfShape", ["shape"], ["y"])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        "cos",
    )
    with pytest.raises(KilnError, match=r"cos\.onnx: TVM failed to import the model: AssertionError$"):
        targets.get("tvm-llvm").build(path, tmp_path)
