"""kiln's CPU elementwise schedule (elementwise.py): which functions it takes, and numbers equal to numpy's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

from kiln.targets.tvm import elementwise, relax_build


def _run(nodes: list, x: np.ndarray, out_shape: list[int]) -> tuple[dict[str, bool], np.ndarray]:
    """For each function of the compiled model, whether the rule takes it; and the model's output."""
    import tvm

    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
        [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = relax_build.legalize(relax_build.import_onnx(model, {"x": list(x.shape)}), target)
    rule = elementwise.elementwise_rule()
    taken = {
        gv.name_hint: rule.apply(f, target, False) is not None
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    }
    built = relax_build.compile_module(relax_build.schedule(mod, target, None), target)
    return taken, tvm.relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_a_transpose_with_a_multiply_is_taken_and_exact():
    """Attention's head split: [1, 128, 12, 32] -> [1, 12, 128, 32] times a constant, one fused function."""
    x = np.random.default_rng(0).standard_normal((1, 128, 12, 32)).astype(np.float32)
    nodes = [oh.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]), oh.make_node("Mul", ["t", "half"], ["y"])]
    taken, got = _run(nodes, x, [1, 12, 128, 32])
    assert list(taken.values()) == [True]
    np.testing.assert_array_equal(got, x.transpose(0, 2, 1, 3) * np.float32(0.5))


def test_an_odd_last_axis_is_taken_without_vectors():
    """NCHW -> NHWC of an image: 3 channels last, no whole vector of 8."""
    x = np.random.default_rng(1).standard_normal((1, 3, 40, 40)).astype(np.float32)
    taken, got = _run([oh.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], x, [1, 40, 40, 3])
    assert list(taken.values()) == [True]
    np.testing.assert_array_equal(got, x.transpose(0, 2, 3, 1))


def test_small_functions_and_reductions_are_left_alone():
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)  # 256 outputs < MIN_ELEMENTS
    taken, got = _run([oh.make_node("Mul", ["x", "half"], ["y"])], x, [4, 64])
    assert list(taken.values()) == [False]
    np.testing.assert_array_equal(got, x * np.float32(0.5))
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    taken, got = _run([oh.make_node("ReduceMax", ["x"], ["y"], axes=[1], keepdims=0)], x, [64])
    assert not any(taken.values())
    np.testing.assert_array_equal(got, x.max(axis=1))
