"""Staged output correction of a quantized model: each layer's output channels matched to the float model's.

Why. Rounding weights and activations shifts and scales a layer's output channels on average (clipped activation
ranges, rounding that does not cancel on smooth inputs), and every shift travels into the layers after it. An
analytic correction from weight statistics alone (``bias_correction``) cannot see what activation quantization
does; a correction measured on the quantized model can, but only layer by layer: corrected all at once, each layer
also answers for errors its predecessors are about to remove, and the corrections overshoot (on
EfficientNet-Lite0, one such round took the logit error from 0.10 to 0.45).

Math. Layers are taken in graph order on the calibration data (:class:`kiln.compiler.sequential.Sequential`, the
float model run beside the quantized one). For layer ``l`` with output channel ``c`` (float ``t``, quantized ``t̂``,
both including the bias ``b̂``), given every layer before ``l`` already corrected::

    "bias":    t̂' = t̂ + (E[t] - E[t̂])                     (the bias codes move by the mean difference)
    "affine":  t̂' = g (t̂ - b̂) + b',  g = Cov(t, t̂) / Var(t̂),  b' = E[t] - g (E[t̂] - b̂)

the least-squares per-channel fit of ``t`` by ``t̂`` (``g`` clipped to ``[1/MAX_GAIN, MAX_GAIN]``). The gain goes
into the weight's per-channel scale, so the integer codes stay as they are, and the bias is stored again as int32
codes on the new scale ``s_x * g s_c``. The cached values of ``t̂`` are revised to the corrected ones before the
walk goes on. A weight read by several layers gets no gain (one scale cannot serve two fits).

Measured on EfficientNet-Lite0 int8-static (GPTQ rounding, bias correction, mse ranges; 16 calibration batches,
256 verification crops): logit error 0.078 -> 0.054 with "bias", 0.044 with "affine"; top-1 agreement with fp32
89.8% -> 94.1% and 95.3%. On MiniLM "bias" alone hurts (embedding cosine 0.9917 -> 0.9823: a mean moved without
its scale), "affine" does not (0.9920).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData
from kiln.compiler.sequential import PairReducer, Sequential
from kiln.passes.quantize import int8

Mode = Literal["none", "bias", "affine"]
#: Gains beyond this factor either way are clipped: a channel whose fit wants more is not one a gain repairs.
MAX_GAIN = 1.25


@dataclasses.dataclass
class Layer:
    """A quantized layer's handles: its output ``tensor`` (bias included) with channels on ``axis``; its bias, the
    DequantizeLinear of int32 codes or a float32 initializer only this layer reads (a MatMul's on a 3-D input,
    which ONNX Runtime adds in float); the DequantizeLinear of its weight (``shared``: read by other layers too, so
    no gain); and its activation's scale."""

    label: str
    tensor: str
    axis: int
    bias: ir.Node | ir.Value
    weight: ir.Node
    shared: bool
    input_scale: float

    def read_bias(self) -> np.ndarray:
        if isinstance(self.bias, ir.Value):
            return _constant(self.bias).astype(np.float64)
        codes, scales = (_constant(self.bias.inputs[i]) for i in (0, 1))
        return codes.astype(np.float64) * scales

    def write_bias(self, bias: np.ndarray, channel_scales: np.ndarray) -> np.ndarray:
        """Store ``bias`` (as int32 codes on ``s_x * channel_scales`` when quantized); the value stored."""
        if isinstance(self.bias, ir.Value):
            stored = bias.astype(np.float32)
            self.bias.const_value = ir.tensor(stored, name=self.bias.name)
            return stored.astype(np.float64)
        codes, scales = int8.quantize_bias(bias, self.input_scale, channel_scales)
        for value, array in zip(self.bias.inputs[:2], (codes, scales)):
            assert value is not None
            value.const_value = ir.tensor(array, name=value.name)
        return codes.astype(np.float64) * scales


def _constant(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None
    return value.const_value.numpy()


class ChannelMoments(PairReducer):
    """Per-channel sums of ``t``, ``t̂``, ``t t̂`` and ``t̂^2`` along ``axis``, in float64."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sums: np.ndarray | None = None
        self.count = 0

    def update(self, reference: np.ndarray, current: np.ndarray) -> None:
        rows = [np.moveaxis(a.astype(np.float64), self.axis, -1) for a in (reference, current)]
        t, q = (a.reshape(-1, a.shape[-1]) for a in rows)
        batch = np.stack([t.sum(0), q.sum(0), (t * q).sum(0), (q * q).sum(0)])
        self.sums = batch if self.sums is None else self.sums + batch
        self.count += t.shape[0]


def fit(moments: ChannelMoments, bias: np.ndarray, affine: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(g, b')`` per channel (module docstring) from the moments and the current bias ``b̂``."""
    if moments.sums is None or moments.count == 0:
        return np.ones_like(bias), bias
    mean_t, mean_q, cross, square = moments.sums / moments.count
    gain = np.ones_like(mean_t)
    if affine:
        variance = square - mean_q * mean_q
        covariance = cross - mean_t * mean_q
        ok = variance > 1e-12 * np.maximum(square, 1e-30)
        gain[ok] = np.clip(covariance[ok] / variance[ok], 1 / MAX_GAIN, MAX_GAIN)
    return gain, mean_t - gain * (mean_q - bias)


def correct(
    calibration: CalibrationData, model: ir.Model, reference: ir.Model, layers: list[Layer], mode: Mode
) -> dict[str, dict[str, Any]]:
    """Correct ``layers`` (in graph order) of ``model`` in place against ``reference``; per layer what changed."""
    walk = Sequential(calibration, model, reference)
    report: dict[str, dict[str, Any]] = {}
    for layer in layers:
        moments = ChannelMoments(layer.axis)
        walk.collect({layer.tensor: [moments]})
        old = layer.read_bias()
        gain, target = fit(moments, old, affine=mode == "affine" and not layer.shared)
        weight_scales = layer.weight.inputs[1]
        channel_scales = _constant(weight_scales)
        if np.any(gain != 1):
            assert weight_scales is not None
            channel_scales = (channel_scales * gain).astype(np.float32)
            weight_scales.const_value = ir.tensor(channel_scales, name=weight_scales.name)
        new = layer.write_bias(target, channel_scales)
        if walk.cached(layer.tensor):  # read further on: the walk goes on from the corrected values
            walk.revise(layer.tensor, _affine(gain, old, new, layer.axis))
        entry: dict[str, Any] = {"bias_shift_norm": float(np.linalg.norm(new - old))}
        if mode == "affine":
            entry["gain_range"] = [float(gain.min()), float(gain.max())]
        report[layer.label] = entry
    return report


def _affine(gain: np.ndarray, old: np.ndarray, new: np.ndarray, axis: int) -> Any:
    """``t -> g (t - b̂) + b'`` per channel along ``axis``."""

    def apply(t: np.ndarray) -> np.ndarray:
        shape = [1] * t.ndim
        shape[axis] = -1
        g, b0, b1 = (np.reshape(v, shape) for v in (gain, old, new))
        return (g * (t - b0) + b1).astype(t.dtype)

    return apply
