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
