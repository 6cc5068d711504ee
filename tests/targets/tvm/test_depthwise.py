"""kiln's CPU depthwise convolution schedule (depthwise.py): which functions it takes, and ONNX Runtime's numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from kiln.targets.tvm import depthwise, layout, relax_build
from tests.targets.tvm.test_layout import conv_model


def _depthwise_model(channels: int, size: int, kernel: int, stride: int, multiplier: int = 1) -> onnx.ModelProto:
    """Conv(group=channels, pad kernel // 2) + bias -> ReLU6 on a [1, channels, size, size] input."""
    rng = np.random.default_rng(kernel * 10 + stride)
    out = channels * multiplier
    weights = {
        "w": rng.standard_normal((out, 1, kernel, kernel)) * 0.3,
        "b": rng.standard_normal(out),
        "lo": np.array(0.0),
        "hi": np.array(6.0),
    }
    pad = kernel // 2
    nodes = [
        oh.make_node("Conv", ["x", "w", "b"], ["h"], group=channels, strides=[stride] * 2, pads=[pad] * 4),
        oh.make_node("Clip", ["h", "lo", "hi"], ["y"]),
    ]
    side = (size + 2 * pad - kernel) // stride + 1
    graph = oh.make_graph(
        nodes,
        "dw",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, size, size])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, out, side, side])],
        [onnx.numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _taken_and_run(model: onnx.ModelProto) -> tuple[dict[str, bool], np.ndarray, np.ndarray]:
    """For each conv function, whether the rule takes it; the compiled model's output and ONNX Runtime's."""
    import tvm

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = relax_build.legalize(layout.channels_last(relax_build.import_onnx(model, {"x": shape})), target)
    rule = depthwise.depthwise_rule()
    taken = {
        gv.name_hint: rule.apply(f, target, False) is not None
        for gv, f in mod.functions_items()
        if "conv2d" in gv.name_hint
    }
    built = relax_build.compile_module(relax_build.schedule(mod, target, None), target)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32) * 2
    got = tvm.relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    return taken, got, expected


def test_tile_shape_divides_the_row_and_the_channels():
    assert depthwise.tile_shape(112, 32) == (4, 16)  # a long row: 4 x 16 first
    assert depthwise.tile_shape(56, 144) == (4, 16)
    assert depthwise.tile_shape(28, 240) == (7, 8)
    assert depthwise.tile_shape(14, 480) == (7, 8)
    assert depthwise.tile_shape(14, 24) == (7, 8)
    assert depthwise.tile_shape(10, 64) == (2, 32)
    assert depthwise.tile_shape(13, 24) == (1, 8)
    assert depthwise.tile_shape(14, 12) is None


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride"),
    [(32, 16, 3, 1), (48, 28, 5, 1), (24, 14, 3, 2), (16, 13, 5, 2), (64, 7, 3, 1)],
)
def test_depthwise_convolutions_are_taken_and_match_onnxruntime(channels: int, size: int, kernel: int, stride: int):
    """Stride 1 and 2, 3x3 and 5x5 windows, zero padding at every edge, bias and ReLU6 fused; rows of 16, 28, 7
    (and 7 after stride 2: 7 x 8 tiles) and 13 pixels (prime: tiles of one pixel)."""
    taken, got, expected = _taken_and_run(_depthwise_model(channels, size, kernel, stride))
    assert list(taken.values()) == [True]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dense_convolutions_and_channel_multipliers_are_left_to_other_rules():
    """The rule takes only the depthwise conv of a MobileNet block (not the 3x3 stride-2 or the 1x1 ones), and no
    grouped conv whose output channel reads another input channel (multiplier 2)."""
    taken, got, expected = _taken_and_run(conv_model(16))
    assert sorted(taken.values()) == [False, False, True]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    taken, got, expected = _taken_and_run(_depthwise_model(16, 8, 3, 1, multiplier=2))
    assert list(taken.values()) == [False]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
