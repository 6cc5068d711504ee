"""Patch statistics of convolution inputs, checked against ONNX Runtime's own Conv."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import testing
from kiln.errors import CalibrationError
from kiln.passes.quantize.patches import ConvGeometry, InputMoments

RNG = np.random.default_rng(0)


def _conv(x: np.ndarray, w: np.ndarray, attributes: dict[str, object]) -> np.ndarray:
    """ONNX Runtime's Conv of ``x`` with weight ``w``, no bias."""
    xv = testing.value("x", list(x.shape))
    node = ir.node("Conv", [xv, testing.initializer("w", w)], attributes=attributes, name="conv")
    node.outputs[0].name, node.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    model = testing.model([xv], [node.outputs[0]], [node], [node.inputs[1]])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "attributes"),
    [
        (6, 4, (3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),  # asymmetric padding, strides
        (6, 6, (3, 3), {"pads": [1, 1, 1, 1], "group": 6}),  # depthwise
        (4, 6, (2, 3), {"dilations": [2, 1], "group": 2}),  # grouped, dilated, no padding
        (3, 5, (3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        (3, 5, (4, 4), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
        (5, 4, (1, 1), {}),
    ],
)
def test_moments_give_the_conv_output_mean_and_mean_square(
    channels: int, out: int, kernel: tuple[int, int], attributes: dict[str, object]
) -> None:
    groups = int(attributes.get("group", 1))
    shape = (out, channels // groups, *kernel)
    node = ir.node("Conv", [], attributes=attributes)
    geometry = ConvGeometry.of(node, shape)
    assert isinstance(geometry, ConvGeometry)
    moments = InputMoments(geometry)
    batches = [RNG.standard_normal((2, channels, 7, 9)).astype(np.float32) + 0.5 for _ in range(3)]
    for x in batches:
        moments.update(x)
    # For any weight change D, E[p] D is the mean of Conv(x, D) per output channel and tr(D^T H D) its mean square.
    d = RNG.standard_normal(shape).astype(np.float32)
    outputs = np.concatenate([_conv(x, d, attributes) for x in batches])
    grouped = d.reshape(groups, out // groups, -1).transpose(0, 2, 1).astype(np.float64)
    mean = np.einsum("gk,gkn->gn", moments.mean, grouped).reshape(-1)
    np.testing.assert_allclose(mean, outputs.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    square = np.einsum("gkn,gkn->", grouped, moments.hessian @ grouped)
    np.testing.assert_allclose(square, np.square(outputs.astype(np.float64)).sum(axis=(1,)).mean(), rtol=1e-4)
    assert moments.count == outputs.shape[0] * outputs.shape[2] * outputs.shape[3]


def test_rows_of_the_last_axis_and_errors() -> None:
    moments = InputMoments()
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    moments.update(x)
    rows = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(moments.hessian[0], rows.T @ rows / 10, rtol=1e-6)
    np.testing.assert_allclose(moments.mean[0], rows.mean(axis=0), rtol=1e-6)
    with pytest.raises(CalibrationError, match="no calibration rows"):
        _ = InputMoments().mean
    assert ConvGeometry.of(ir.node("Conv", []), (4, 2, 3)) == "a 1-D convolution (patch statistics cover 2-D ones)"
    with pytest.raises(CalibrationError, match="a 2-D convolution's input has rank 3, not 4"):
        InputMoments(ConvGeometry(kernel=(1, 1))).update(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(CalibrationError, match="smaller than its kernel"):
        InputMoments(ConvGeometry(kernel=(5, 5))).update(np.zeros((1, 2, 3, 3), np.float32))
