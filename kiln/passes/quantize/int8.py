"""8-bit grids for weight-and-activation (W8A8) quantization: what static, dynamic and SmoothQuant passes share.

Activations, per tensor, from a range ``[lo, hi]`` (widened to include 0, so 0 is exact: padding and ReLU
zeros stay zeros)::

    uint8, asymmetric:  s = (hi - lo) / 255,        z = clip(round(-lo / s), 0, 255)
    int8, symmetric:    s = max(|lo|, |hi|) / 127,  z = 0
    q = clip(round(x / s) + z, qmin, qmax),  x' = (q - z) * s

Weights, per output channel ``c``, symmetric on the int8 grid ``[-127, 127]``::

    s_c = max |W_c| / 127,   q = round(W / s_c)

stored as int8 (zero point 0), or as uint8 ``q + 128`` with zero point 128 (``weight_type="uint8"``). Both encode
the same values. uint8 is the default because ONNX Runtime's x86 kernels multiply uint8 activations by int8
weights with ``vpmaddubsw``, which saturates a pair of products at 32767 on CPUs without VNNI (AVX2, AVX-512F):
measured on such a CPU, int8 weights gave up to 20% output error in MatMulIntegerToFloat, QLinearConv and
DynamicQuantizeMatMul, while uint8 weights (a kernel that widens to int16 first) match the float reference to
1e-7 and ran faster. On VNNI CPUs int8 weights are exact too.

A bias next to a quantized weight (Conv, Gemm) is stored as int32 with scale ``s_x * s_c``, as QLinearConv and
QGemm require. A channel whose weights are (nearly) all 0 but whose bias is not (a dead channel after BatchNorm
folding) would need codes beyond int32, so its weight scale is raised to ``|b_c| / (s_x * (2^31 - 1))``: its
tiny weights lose nothing that matters and its bias stays exact. A channel whose weights are all 0 and that has
no bias gets scale 1 (its codes are 0 whatever the scale).

Error model (cheap, from streamed statistics). For ``Y = X W`` with ``W`` [K, N], per-channel mean squares
``m_j = E[x_j^2]``, dequantized weight ``W'`` and activation step ``s_x``, treating input channels as uncorrelated
and activation rounding as uniform noise of variance ``s_x^2 / 12``::

    E||X W - X' W'||^2 ~ sum_j m_j ||W_j - W'_j||^2 + s_x^2 / 12 * ||W'||_F^2,    signal ~ sum_j m_j ||W_j||^2

(per row of X). Rows with large activations weigh the most: on a language model that is where it should be, as
the first token's massive activations (50x the others) steer every later token's attention. Weighting every
row by ``1 / ||x||^2`` instead (every token alike) did no better on SmolLM2: perplexity +6.1% against +5.5% after
SmoothQuant's alpha search, which minimises this estimate; static-int8 reports ``sqrt(error / signal)`` per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx.helper
import onnx_ir as ir
from onnxscript import version_converter

from kiln.errors import KilnError
from kiln.passes.quantize import gptq

WeightType = Literal["uint8", "int8"]
ActivationType = Literal["uint8", "int8"]

#: Largest weight code: the symmetric grid [-127, 127] leaves -128 unused, so q and -q are both representable.
WEIGHT_QMAX = 127
#: QuantizeLinear with per-axis scales and int32 DequantizeLinear need default-domain opset 13.
MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class ActivationGrid:
    """Per-tensor activation quantization parameters."""

    scale: float
    zero_point: int
    dtype: type[np.integer]

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def scale_array(self) -> np.ndarray:
        return np.array(self.scale, dtype=np.float32)

    def zero_point_array(self) -> np.ndarray:
        return np.array(self.zero_point, dtype=self.dtype)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """QuantizeLinear then DequantizeLinear, as ONNX defines them (round half to even)."""
        scale = np.float32(self.scale)
        q = np.clip(np.rint(x / scale) + self.zero_point, self.qmin, self.qmax)
        return ((q - self.zero_point) * scale).astype(np.float32)


def activation_grid(low: float, high: float, activation_type: ActivationType) -> ActivationGrid:
    """The grid of a tensor whose calibrated range is ``[low, high]`` (see the module docstring)."""
    lo, hi = min(float(low), 0.0), max(float(high), 0.0)
    if activation_type == "int8":
        scale = float(np.float32(max(-lo, hi) / 127.0))
        return ActivationGrid(scale if scale > 0 else 1.0, 0, np.int8)
    scale = float(np.float32((hi - lo) / 255.0))
    if not scale > 0:
        return ActivationGrid(1.0, 0, np.uint8)
    zero_point = int(np.clip(np.rint(-lo / scale), 0, 255))
    return ActivationGrid(scale, zero_point, np.uint8)


@dataclasses.dataclass
class QuantizedWeight:
    """A weight on the per-channel int8 grid: ``codes`` (int8, or uint8 offset by 128), ``scales`` [C] float32,
    ``zero_points`` [C] of the codes' dtype, along ``axis``."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    axis: int

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        centered = self.codes.astype(np.float32) - self.zero_points.astype(np.float32).reshape(shape)
        return centered * self.scales.reshape(shape)


def channel_scales(w: np.ndarray, axis: int, min_scales: np.ndarray | None = None) -> np.ndarray:
    """Per-channel scales ``max |W_c| / 127`` along ``axis``, at least ``min_scales``; 1 for an all-zero channel."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
    scales = (absmax / np.float32(WEIGHT_QMAX)).astype(np.float32)
    if min_scales is not None:
        scales = np.maximum(scales, min_scales.astype(np.float32))
    scales[scales == 0] = 1.0
    return scales


def encode_weight(codes: np.ndarray, scales: np.ndarray, axis: int, weight_type: WeightType) -> QuantizedWeight:
    """Centered codes in ``[-127, 127]`` stored as ``weight_type`` (see the module docstring)."""
    if weight_type == "uint8":
        return QuantizedWeight((codes + 128).astype(np.uint8), scales, np.full(scales.shape, 128, np.uint8), axis)
    return QuantizedWeight(codes.astype(np.int8), scales, np.zeros(scales.shape, np.int8), axis)


def quantize_weight(
    w: np.ndarray, axis: int, weight_type: WeightType, min_scales: np.ndarray | None = None
) -> QuantizedWeight:
    """Symmetric per-channel quantization of ``w`` along ``axis`` (the output channels), scales >= ``min_scales``."""
    w = np.asarray(w, dtype=np.float32)
    scales = channel_scales(w, axis, min_scales)
    return encode_weight(nearest_codes(w, scales, axis), scales, axis, weight_type)


def nearest_codes(w: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """Centered codes of ``w`` rounded to the nearest point of the per-channel grids ``scales`` along ``axis``."""
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.rint(w / scales.reshape(shape)), -WEIGHT_QMAX, WEIGHT_QMAX)


def gptq_codes(
    w: np.ndarray, hessian: np.ndarray, scales: np.ndarray, damp: float = 0.01, block: int = 128
) -> np.ndarray:
    """GPTQ rounding of ``w`` [G, K, N] onto fixed per-column grids ``scales`` [G, N]: centered codes [G, K, N].

    Each of the G problems (a convolution's groups) has its input's Hessian ``hessian`` [G, K, K]. Rows are rounded
    in order and the rows after each absorb its error (:mod:`kiln.passes.quantize.gptq`), so the output error
    ``tr(D^T H D)``, not the weight error, is what rounding keeps small. The scales stay those of round-to-nearest:
    only which grid point each weight takes changes.
    """
    groups, k, n = w.shape
    inverse_factors = np.empty((groups, k, k), dtype=np.float32)
    for g in range(groups):
        h = np.array(hessian[g], dtype=np.float64)
        diagonal, lam = gptq.damping(h, damp)
        h[np.diag_indices(k)] = diagonal + lam
        inverse_factors[g] = gptq.upper_inverse_cholesky(h)
    work = np.array(w, dtype=np.float32)
    step = scales.astype(np.float32)
    codes = np.empty_like(work)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        errors = np.empty((groups, b1 - b0, n), dtype=np.float32)
        for r in range(b0, b1):
            q = np.clip(np.rint(work[:, r] / step), -WEIGHT_QMAX, WEIGHT_QMAX)
            codes[:, r] = q
            error = (work[:, r] - q * step) / inverse_factors[:, r, r, None]
            work[:, r + 1 : b1] -= inverse_factors[:, r, r + 1 : b1, None] * error[:, None, :]
            errors[:, r - b0] = error
        work[:, b1:] -= np.matmul(inverse_factors[:, b0:b1, b1:].transpose(0, 2, 1), errors)
    return codes


def bias_scale_floor(bias: np.ndarray, input_scale: float) -> np.ndarray:
    """The smallest weight scales [C] for which ``bias`` fits int32 codes of scale ``input_scale * s_c``."""
    limit = float(np.iinfo(np.int32).max) * (1.0 - 1e-6)  # a margin for float32 rounding of the scale
    return (np.abs(bias.astype(np.float64)) / (float(np.float32(input_scale)) * limit)).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes and float32 scales ``s_x * s_c`` of a bias added to a quantized product (clipped to int32, which
    :func:`bias_scale_floor` on the weight scales makes a no-op)."""
    scales = (np.float32(input_scale) * weight_scales).astype(np.float32)
    info = np.iinfo(np.int32)
    codes = np.clip(np.rint(bias.astype(np.float64) / scales), info.min, info.max).astype(np.int32)
    return codes, scales


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """||reference - approximation|| / ||reference|| (0 for an all-zero reference)."""
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - approximation)) / norm if norm else 0.0


def estimated_error(
    mean_square: np.ndarray, w: np.ndarray, w_dequantized: np.ndarray, activation_step: float
) -> tuple[float, float]:
    """(error, signal) energy per row of ``Y = X W`` under the module docstring's model; ``w`` is [K, N]."""
    ms = mean_square.astype(np.float64)
    w64 = w.astype(np.float64)
    wq = w_dequantized.astype(np.float64)
    weight_term = float(ms @ np.square(w64 - wq).sum(axis=1))
    noise_term = activation_step**2 / 12.0 * float(np.square(wq).sum())
    signal = float(ms @ np.square(w64).sum(axis=1))
    return weight_term + noise_term, signal


def ensure_opset(model: ir.Model, minimum: int = MIN_OPSET) -> dict[str, int] | None:
    """Raise the default-domain opset to ``minimum`` if lower; returns {"from", "to"} when it converted."""
    current = model.opset_imports.get("")
    if current is not None and current >= minimum:
        return None
    try:
        version_converter.convert_version(model, minimum)
    except Exception as e:
        raise KilnError(
            f"8-bit QDQ needs the default opset >= {minimum}; converting from {current} failed ({e})"
        ) from e
    model.ir_version = max(
        model.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", minimum)])
    )
    return {"from": current, "to": model.opset_imports.get("")}
