"""relax_build's default CPU schedules: dlight's Reduction rule only where every block shares the rows."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from kiln.targets.tvm import relax_build


def _norm_model(rows: int) -> onnx.ModelProto:
    """y = x / sqrt(mean(x^2, last axis) + eps) * w for x [rows, 576] (RMSNorm)."""
    w = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 576, dtype=np.float32), "w")
    eps = onnx.numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    nodes = [
        oh.make_node("Mul", ["x", "x"], ["sq"]),
        oh.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        oh.make_node("Add", ["ms", "eps"], ["mse"]),
        oh.make_node("Sqrt", ["mse"], ["rms"]),
        oh.make_node("Div", ["x", "rms"], ["xn"]),
        oh.make_node("Mul", ["xn", "w"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "norm",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [rows, 576])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [rows, 576])],
        [w, eps],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize(("rows", "scheduled"), [(1, False), (8, True)])
def test_reduction_rule_only_where_rows_are_shared(rows: int, scheduled: bool):
    """One row: dlight would recompute the mean for each of the 576 outputs, so the function stays plain loops;
    eight rows: the rule parallelizes them. The numbers are the norm's either way."""
    import tvm

    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = relax_build.legalize(relax_build.import_onnx(_norm_model(rows), {"x": [rows, 576]}), target)
    mod = relax_build.schedule(mod, target, None)
    mean = [f for gv, f in mod.functions_items() if "mean" in gv.name_hint]
    assert len(mean) == 1
    assert bool(mean[0].attrs.get("tirx.is_scheduled", False)) is scheduled
    vm = tvm.relax.VirtualMachine(relax_build.compile_module(mod, target), tvm.cpu())
    x = np.random.default_rng(0).standard_normal((rows, 576)).astype(np.float32)
    expected = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 576, dtype=np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_round_and_quantize_round_halves_to_even_like_onnxruntime():
    """ONNX's Round and QuantizeLinear round 2.5 to 2: the QDQ lowering (kiln.targets.tvm.qdq, layout) relies on
    TVM's round meaning the same."""
    import onnxruntime as ort
    import tvm

    inits = [
        onnx.numpy_helper.from_array(np.array(0.5, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(3, np.uint8), "z"),
    ]
    graph = oh.make_graph(
        [oh.make_node("Round", ["x"], ["r"]), oh.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])],
        "round",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8])],
        [
            oh.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [8]),
            oh.make_tensor_value_info("q", onnx.TensorProto.UINT8, [8]),
        ],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.75, 1.25, 200.0], np.float32)
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = relax_build.legalize(relax_build.import_onnx(model, {"x": [8]}), target)
    built = relax_build.compile_module(relax_build.schedule(mod, target, None), target)
    vm = tvm.relax.VirtualMachine(built, tvm.cpu())
    got = [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[0][2] == 2.0 and got[1][6] == 5  # Round(2.5) = 2; 1.25 / 0.5 = 2.5 -> 2, + 3
