"""Calibration statistics the pruning passes need beyond :mod:`kiln.compiler.calibration`'s reducers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Reducer
from kiln.errors import CalibrationError


class CosineGap:
    """Mean over rows (tokens) of ``1 - cos(a, b)`` between two tensors of the same shape, e.g. the residual stream
    before and after a block (ShortGPT's Block Influence). ``side("a")`` and ``side("b")`` are the two reducers."""

    def __init__(self) -> None:
        self._pending: dict[str, np.ndarray] = {}
        self.sum = 0.0
        self.count = 0

    def side(self, key: str) -> Reducer:
        gap = self

        class _Side(Reducer):
            def update(self, array: np.ndarray) -> None:
                gap._feed(key, array)

        return _Side()

    def _feed(self, key: str, array: np.ndarray) -> None:
        self._pending[key] = array.reshape(-1, array.shape[-1]).astype(np.float64)
        if len(self._pending) == 2:
            a, b = self._pending.pop("a"), self._pending.pop("b")
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            cos = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
            self.sum += float((1.0 - cos).sum())
            self.count += a.shape[0]

    @property
    def value(self) -> float:
        if self.count == 0:
            raise CalibrationError("no calibration rows reached this tensor")
        return self.sum / self.count


class ChannelMoments(Reducer):
    """Per-channel mean and mean square (importance and bias compensation); channels along ``axis`` (NCHW: 1)."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.square: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        array = np.moveaxis(array, self.axis, -1)
        rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
        total, square = rows.sum(axis=0), (rows * rows).sum(axis=0)
        self.sum = total if self.sum is None else self.sum + total
        self.square = square if self.square is None else self.square + square
        self.count += rows.shape[0]

    def _check(self) -> None:
        if self.count == 0:
            raise CalibrationError("no calibration rows reached this tensor")

    @property
    def mean(self) -> np.ndarray:
        self._check()
        return self.sum / self.count

    @property
    def mean_square(self) -> np.ndarray:
        self._check()
        return self.square / self.count


def channel_moments(
    calibration: CalibrationData, model: ir.Model, values: Iterable[ir.Value], axis: int = -1
) -> dict[ir.Value, ChannelMoments]:
    """Per-channel moments of every value in ``values``, gathered in one pass over the calibration data."""
    moments = {value: ChannelMoments(axis) for value in values}
    calibration.collect(model, {value.name: [reducer] for value, reducer in moments.items()})
    return moments
