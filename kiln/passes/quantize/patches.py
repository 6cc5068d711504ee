"""What a layer's weight multiplies: the rows of its input, as first and second moments over calibration data.

A MatMul or Gemm weight ``W`` [K, N] multiplies rows ``x`` [K] of its input's last axis. A 2-D convolution's weight
``W`` [C_out, C_in / G, kh, kw] multiplies, in each of its G groups, the patches of the input it slides over
(im2col): ``p`` [C_in / G * kh * kw] at every output position, ordered as the weight's ``(c, i, j)``, padding
included (padded positions read 0). In both cases the layer is a matrix product ``y = p W_g`` per group, so the
same statistics give any weight change ``D`` its exact effect on the calibration outputs::

    mean error  E[p] D_g                       (what bias correction removes)
    mean square tr(D_g^T E[p^T p] D_g)         (what GPTQ minimizes; ``E[p^T p]`` is its Hessian)

:class:`InputMoments` accumulates ``E[p]`` [G, K] and ``E[p^T p]`` [G, K, K] batch by batch (one image at a time
for convolutions, so the im2col copy stays one image's), never storing activations.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import Reducer
from kiln.errors import CalibrationError


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """How a 2-D Conv slides over its NCHW input: kernel, strides, dilations, padding and groups."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    #: (top, left, bottom, right), ONNX's ``pads`` order; ignored when ``auto_pad`` is a SAME mode.
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    auto_pad: str = "NOTSET"
    groups: int = 1

    @classmethod
    def of(cls, node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry | str:
        """The geometry of Conv ``node``, or why its patches are not handled (only 2-D convolutions are)."""
        if len(weight_shape) != 4:
            return f"a {len(weight_shape) - 2}-D convolution (patch statistics cover 2-D ones)"
        attrs = node.attributes
        auto_pad = attrs.get_string("auto_pad", "NOTSET")
        return cls(
            kernel=(weight_shape[2], weight_shape[3]),
            strides=tuple(attrs.get_ints("strides", [1, 1])),  # type: ignore[arg-type]
            dilations=tuple(attrs.get_ints("dilations", [1, 1])),  # type: ignore[arg-type]
            pads=tuple(attrs.get_ints("pads", [0, 0, 0, 0])),  # type: ignore[arg-type]
            auto_pad=auto_pad,
            groups=attrs.get_int("group", 1),
        )

    def _padding(self, size: int, axis: int) -> tuple[int, int]:
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            span = (self.kernel[axis] - 1) * self.dilations[axis] + 1
            total = max((math.ceil(size / self.strides[axis]) - 1) * self.strides[axis] + span - size, 0)
            small = total // 2
            return (small, total - small) if self.auto_pad == "SAME_UPPER" else (total - small, small)
        if self.auto_pad == "VALID":
            return 0, 0
        return self.pads[axis], self.pads[axis + 2]

    def patches(self, image: np.ndarray) -> np.ndarray:
        """im2col of one image [C, H, W]: [G, positions, C / G * kh * kw], float32."""
        channels = image.shape[0]
        (top, bottom), (left, right) = self._padding(image.shape[1], 0), self._padding(image.shape[2], 1)
        padded = np.pad(image.astype(np.float32, copy=False), ((0, 0), (top, bottom), (left, right)))
        spans = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        out = [(padded.shape[1 + a] - spans[a]) // self.strides[a] + 1 for a in (0, 1)]
        if min(out) <= 0:
            raise CalibrationError(f"a convolution's input {list(image.shape)} is smaller than its kernel")
        offsets = [
            padded[
                :,
                i * self.dilations[0] : i * self.dilations[0] + (out[0] - 1) * self.strides[0] + 1 : self.strides[0],
                j * self.dilations[1] : j * self.dilations[1] + (out[1] - 1) * self.strides[1] + 1 : self.strides[1],
            ]
            for i in range(self.kernel[0])
            for j in range(self.kernel[1])
        ]
        stacked = np.stack(offsets, axis=1)  # [C, kh * kw, out_h, out_w]
        per_group = channels // self.groups
        grouped = stacked.reshape(self.groups, per_group * len(offsets), out[0] * out[1])
        return grouped.transpose(0, 2, 1)


class InputMoments(Reducer):
    """``E[p]`` and ``E[p^T p]`` of a layer's input rows: the last axis (``geometry=None``) or a Conv's patches."""

    def __init__(self, geometry: ConvGeometry | None = None) -> None:
        self.geometry = geometry
        self.sum: np.ndarray | None = None
        self.gram: np.ndarray | None = None
        self.count = 0

    def _add(self, rows: np.ndarray) -> None:
        """Fold rows [G, R, K] (float32) in; per-batch products in float32, running sums in float64."""
        gram = np.matmul(rows.transpose(0, 2, 1), rows).astype(np.float64)
        total = rows.sum(axis=1, dtype=np.float64)
        self.gram = gram if self.gram is None else self.gram + gram
        self.sum = total if self.sum is None else self.sum + total
        self.count += rows.shape[1]

    def update(self, array: np.ndarray) -> None:
        if self.geometry is None:
            self._add(array.reshape(1, -1, array.shape[-1]).astype(np.float32, copy=False))
            return
        if array.ndim != 4:
            raise CalibrationError(f"a 2-D convolution's input has rank {array.ndim}, not 4")
        for image in array:
            self._add(self.geometry.patches(image))

    def _checked(self, value: np.ndarray | None) -> np.ndarray:
        if value is None or self.count == 0:
            raise CalibrationError("no calibration rows reached this layer's input")
        return value / self.count

    @property
    def mean(self) -> np.ndarray:
        """``E[p]`` [G, K]."""
        return self._checked(self.sum)

    @property
    def hessian(self) -> np.ndarray:
        """``E[p^T p]`` [G, K, K]."""
        return self._checked(self.gram)
