"""Calibration statistics the pruning passes need beyond :mod:`kiln.compiler.calibration`'s reducers."""

from __future__ import annotations

import abc
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Gram, Reducer
from kiln.errors import CalibrationError


class Joined(abc.ABC):
    """Several tensors of the same calibration batch, as rows of their last axis: each name in ``sides`` is one
    reducer (``side(name)``); ``combine`` gets the batch once all have arrived."""

    sides: tuple[str, ...]

    def __init__(self) -> None:
        self._pending: dict[str, np.ndarray] = {}

    def side(self, key: str) -> Reducer:
        joined = self

        class _Side(Reducer):
            def update(self, array: np.ndarray) -> None:
                joined._pending[key] = array.reshape(-1, array.shape[-1]).astype(np.float64)
                if len(joined._pending) == len(joined.sides):
                    arrays, joined._pending = joined._pending, {}
                    joined.combine(**arrays)

        return _Side()

    @abc.abstractmethod
    def combine(self, **arrays: np.ndarray) -> None:
        """Fold one batch in."""


def cosine_gap_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over rows of ``1 - cos(a, b)`` (rows of zeros count as aligned)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    return float((1.0 - cos).sum())


class CosineGap(Joined):
    """Mean over rows (tokens) of ``1 - cos(a, b)`` between two tensors of the same shape, e.g. the residual stream
    before and after a block (ShortGPT's Block Influence). ``side("a")`` and ``side("b")`` are the two reducers."""

    sides = ("a", "b")

    def __init__(self) -> None:
        super().__init__()
        self.sum = 0.0
        self.count = 0

    def combine(self, a: np.ndarray, b: np.ndarray) -> None:
        self.sum += cosine_gap_sum(a, b)
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


def projection_statistics(
    calibration: CalibrationData, model: ir.Model, inputs: list[ir.Value], streams: list[ir.Value], grams: bool
) -> tuple[dict[ir.Value, ChannelMoments], dict[ir.Value, ChannelMoments], dict[ir.Value, Gram]]:
    """Per-channel moments of projection ``inputs`` and residual ``streams`` and, with ``grams``, the inputs' Gram
    matrices, in one pass over the calibration data."""
    moments = {value: ChannelMoments() for value in [*inputs, *streams]}
    gram_of = {value: Gram() for value in inputs} if grams else {}
    reducers: dict[str, list[Reducer]] = {}
    for value, reducer in [*moments.items(), *gram_of.items()]:
        reducers.setdefault(value.name, []).append(reducer)
    calibration.collect(model, reducers)
    return {v: moments[v] for v in inputs}, {v: moments[v] for v in streams}, gram_of
