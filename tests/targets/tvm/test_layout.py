"""layout.channels_last: NHWC convolutions with HWIO weights, ReLU6 as Relax ops, numbers unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort

from kiln.targets.tvm import layout, relax_build


def conv_model(channels: int = 16, size: int = 7) -> onnx.ModelProto:
    """A MobileNet block: 3x3 conv (stride 2, pad 1) -> ReLU6 -> depthwise 3x3 -> ReLU6 -> 1x1 conv, + a residual
    1x1 branch; ``channels`` output channels; input [1, 3, 2 * size, 2 * size]."""
    rng = np.random.default_rng(0)
    c = channels
    weights = {
        "w0": rng.standard_normal((c, 3, 3, 3)) * 0.3,
        "b0": rng.standard_normal(c),
        "w1": rng.standard_normal((c, 1, 3, 3)) * 0.3,
        "w2": rng.standard_normal((c, c, 1, 1)) * 0.3,
        "b2": rng.standard_normal(c),
        "lo": np.array(0.0),
        "hi": np.array(6.0),
    }
    nodes = [
        oh.make_node("Conv", ["x", "w0", "b0"], ["h0"], strides=[2, 2], pads=[1, 1, 1, 1]),
        oh.make_node("Clip", ["h0", "lo", "hi"], ["r0"]),
        oh.make_node("Conv", ["r0", "w1"], ["h1"], group=c, pads=[1, 1, 1, 1]),
        oh.make_node("Clip", ["h1", "lo", "hi"], ["r1"]),
        oh.make_node("Conv", ["r1", "w2", "b2"], ["h2"]),
        oh.make_node("Add", ["h2", "r0"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "block",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2 * size, 2 * size])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, size, size])],
        [onnx.numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _ops(mod) -> list[str]:
    """Names of the Relax ops and called PrimFuncs in ``main``."""
    from tvm import relax

    found: list[str] = []

    def visit(e) -> None:
        if isinstance(e, relax.Call):
            name = getattr(e.op, "name", None) or getattr(e.op, "name_hint", "")
            callee = e.args[0].name_hint if name == "relax.call_tir" else ""
            found.append(name + (":" + callee if callee else ""))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _assert_runs_like_onnxruntime(mod, model: onnx.ModelProto) -> None:
    """``mod`` compiled for this CPU gives ONNX Runtime's output of ``model`` on a random image."""
    import tvm

    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    built = relax_build.compile_module(relax_build.schedule(relax_build.legalize(mod, target), target, None), target)
    x = np.random.default_rng(1).standard_normal((1, 3, 14, 14)).astype(np.float32)
    got = tvm.relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_convolutions_become_channels_last_with_the_same_numbers():
    model = conv_model()
    mod = layout.channels_last(relax_build.import_onnx(model, {"x": [1, 3, 14, 14]}))
    ops = _ops(mod)
    convs = [b.value for b in mod["main"].body.blocks[0].bindings if "conv2d" in str(getattr(b.value, "op", ""))]
    assert len(convs) == 3 and all(c.attrs.data_layout == "NHWC" and c.attrs.kernel_layout == "HWIO" for c in convs)
    assert ops.count("relax.maximum") == 2 and ops.count("relax.minimum") == 2
    assert not any(op.startswith("relax.call_tir:m") for op in ops)  # no opaque maximum/minimum left
    assert ops.count("relax.permute_dims") == 2  # the image in, the result out: nothing between the convolutions
    _assert_runs_like_onnxruntime(mod, model)


def test_a_model_without_convolutions_is_returned_as_is():
    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"])],
        "relu",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    mod = relax_build.import_onnx(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), {"x": [2, 3]})
    assert layout.channels_last(mod).same_as(mod)


def test_per_tensor_quantize_dequantize_follow_the_layout():
    """A QDQ pair on the block's activations (as static int8 leaves them) stays between NHWC convolutions, and its
    dequantize reads the clamped float codes (no cast to 8 bits and back)."""
    model = conv_model()
    graph = model.graph
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(6.0 / 255, np.float32), "s"),
            onnx.numpy_helper.from_array(np.array(0, np.uint8), "z"),
        ]
    )
    clip = next(n for n in graph.node if n.output[0] == "r0")
    clip.output[0] = "r0f"
    at = list(graph.node).index(clip) + 1
    graph.node.insert(at, oh.make_node("QuantizeLinear", ["r0f", "s", "z"], ["r0q"]))
    graph.node.insert(at + 1, oh.make_node("DequantizeLinear", ["r0q", "s", "z"], ["r0"]))
    mod = layout.channels_last(relax_build.import_onnx(model, {"x": [1, 3, 14, 14]}))
    ops = _ops(mod)
    assert "relax.quantize" not in ops and "relax.dequantize" not in ops
    assert ops.count("relax.permute_dims") == 2 and ops.count("relax.round") == 1
    assert "relax.astype" not in ops
    _assert_runs_like_onnxruntime(mod, model)
