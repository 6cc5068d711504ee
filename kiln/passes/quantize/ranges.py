"""Activation ranges from calibration statistics: min-max, percentile and entropy (KL divergence).

Every method works on streamed statistics, never on stored activations. A first pass over the calibration set
collects each tensor's :class:`~kiln.compiler.calibration.MinMax`; percentile and entropy then make a second pass
with a histogram over that range, so histogram bins are fixed before any data is binned.

* ``minmax``: ``[min, max]`` of the tensor over the whole calibration set.
* ``percentile`` (``p``, e.g. 99.99): int8-symmetric grids take a histogram of ``|x|`` over ``[0, max|x|]`` and
  keep ``t`` = the upper edge of the first bin where the cumulative share of values reaches ``p / 100``;
  the range is ``[-t, t]`` clipped to ``[min, max]``. Asymmetric grids take a histogram of ``x`` over
  ``[min, max]`` and cut ``(100 - p) / 2`` percent on each side: the lower bound is the lower edge of the bin
  where the cumulative share reaches ``(1 - p/100) / 2``, the upper bound the upper edge of the bin where it
  reaches ``1 - (1 - p/100) / 2``.
* ``entropy``: TensorRT's calibration. On a histogram ``H`` of ``|x|`` with ``B`` bins (2048) and ``L`` = 128
  quantization levels, for every candidate ``i`` in ``L..B``:

      P = H[:i], with the clipped tail sum(H[i:]) added to P[i-1]
      Q = H[:i] merged into L groups of i // L bins (the last group takes the remainder); each group's total is
          spread evenly over its bins where H is non-zero (zero bins stay zero)
      KL(P || Q) over P and Q normalised and then mixed with the uniform distribution on i bins at weight 1e-4,
          so that every log is finite (Q is zero where H is, and the tail can make P non-zero there)

  and ``t = edge[i*]`` for the ``i*`` of least divergence (the first on ties). The range is ``[-t, t]`` clipped
  to ``[min, max]``, so a non-negative tensor (after ReLU) gets ``[0, t]``. Exact zeros are left out of this
  histogram: every candidate grid holds 0 exactly, so they say nothing about ``t``, and a ReLU output's spike at 0
  would otherwise make the first candidates (where each of the L groups is a single bin, so Q copies P) look
  best: on EfficientNet-Lite0 that cut ReLU6 outputs to [0, 0.75] and the model to chance.
* ``mse``: the range of least expected squared quantization error of the tensor's values. For a candidate range
  with step ``Δ`` (``(hi - lo) / 255`` on the uint8 grid, ``t / 127`` on the symmetric int8 one), values inside it
  cost the rounding noise ``Δ^2 / 12`` each and values outside cost their squared distance to the nearer end
  (bin centres stand for the values)::

      err(lo, hi) = sum_{c < lo} n_c (c - lo)^2 + sum_{c > hi} n_c (c - hi)^2 + n_inside Δ^2 / 12

  Candidates are the histogram's edges (``lo <= 0 <= hi`` as the grid holds 0 anyway), searched on every
  ``bins / 256``-th edge and then edge by edge around the best; prefix sums of ``n``, ``n c`` and ``n c^2`` make
  each candidate O(1). Exact zeros are left out, as for entropy: the grid holds 0 exactly, so they cost nothing at
  any range. Unlike percentile, nothing is clipped where clipping costs more than the coarser step it buys: a
  tensor whose few large values carry its signal keeps them.

The quantization grid itself (scale, zero point) is made from the range by :mod:`kiln.passes.quantize.int8`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Histogram, MinMax, Reducer
from kiln.errors import CalibrationError

Method = Literal["minmax", "percentile", "entropy", "mse"]
Range = tuple[float, float]

#: TensorRT's number of int8 magnitude levels the entropy method compares against.
ENTROPY_LEVELS = 128
_SMOOTHING = 1e-4


class AbsHistogram(Reducer):
    """Histogram of ``|x|`` over ``[0, high]`` (values above ``high`` land in the last bin), optionally without
    exact zeros."""

    def __init__(self, high: float, bins: int = 2048, *, skip_zeros: bool = False) -> None:
        self.edges = np.linspace(0.0, high if high > 0 else 1e-12, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.skip_zeros = skip_zeros

    def update(self, array: np.ndarray) -> None:
        magnitudes = np.minimum(np.abs(array.ravel()), self.edges[-1])
        if self.skip_zeros:
            magnitudes = magnitudes[magnitudes != 0]
        self.counts += np.histogram(magnitudes, bins=self.edges)[0]


class ChannelMinMax(Reducer):
    """Per-channel minimum and maximum along the last axis."""

    def __init__(self) -> None:
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        rows = array.reshape(-1, array.shape[-1])
        if not rows.shape[0]:
            return
        low, high = rows.min(axis=0), rows.max(axis=0)
        self.min = low if self.min is None else np.minimum(self.min, low)
        self.max = high if self.max is None else np.maximum(self.max, high)

    @property
    def absmax(self) -> np.ndarray:
        if self.min is None or self.max is None:
            raise CalibrationError("no calibration rows reached this tensor")
        return np.maximum(-self.min, self.max)


def _cumulative_share(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    if total == 0:
        raise CalibrationError("histogram is empty: no calibration values reached this tensor")
    return np.cumsum(counts, dtype=np.float64) / total


def percentile_magnitude(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """``t`` with at least ``percentile`` % of ``|x|`` in ``[0, t]``, from a histogram of ``|x|``."""
    index = int(np.searchsorted(_cumulative_share(counts), percentile / 100.0))
    return float(edges[min(index, len(counts) - 1) + 1])


def percentile_range(counts: np.ndarray, edges: np.ndarray, percentile: float) -> Range:
    """``[lo, hi]`` leaving ``(100 - percentile) / 2`` % of the values out on each side, from a histogram of ``x``."""
    cdf = _cumulative_share(counts)
    tail = (1.0 - percentile / 100.0) / 2.0
    last = len(counts) - 1
    low = int(np.searchsorted(cdf, tail))
    high = int(np.searchsorted(cdf, 1.0 - tail))
    return float(edges[min(low, last)]), float(edges[min(high, last) + 1])


def _smooth(counts: np.ndarray) -> np.ndarray:
    """``counts`` normalised, then mixed with the uniform distribution at weight ``1e-4``: no bin stays 0."""
    return (1.0 - _SMOOTHING) * counts / counts.sum() + _SMOOTHING / counts.size


def entropy_threshold(counts: np.ndarray, edges: np.ndarray, levels: int = ENTROPY_LEVELS) -> float:
    """TensorRT's KL-divergence threshold on a histogram of ``|x|`` (see the module docstring)."""
    counts = np.asarray(counts, dtype=np.float64)
    bins = len(counts)
    if counts.sum() == 0:
        raise CalibrationError("histogram is empty: no calibration values reached this tensor")
    if bins <= levels:
        return float(edges[-1])
    tails = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    best_index, best_divergence = bins, np.inf
    for i in range(levels, bins + 1):
        sliced = counts[:i]
        p = sliced.copy()
        p[-1] += tails[i]
        if p.sum() == 0:
            continue
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        nonzero = sliced != 0
        totals = np.bincount(group, weights=sliced, minlength=levels)
        members = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, totals[group] / np.maximum(members[group], 1), 0.0)
        if q.sum() == 0:
            continue
        p = _smooth(p)
        q = _smooth(q)
        divergence = float(np.sum(p * np.log(p / q)))
        if divergence < best_divergence:
            best_index, best_divergence = i, divergence
    return float(edges[best_index])


_MSE_COARSE = 256


def _prefix(counts: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums of ``n``, ``n c`` and ``n c^2`` over bins ``[0, i)``, for i = 0..bins."""
    n = np.asarray(counts, dtype=np.float64)
    return tuple(np.concatenate([[0.0], np.cumsum(n * centres**p)]) for p in range(3))  # type: ignore[return-value]


def _grid_error(
    low: np.ndarray, high: np.ndarray, i: np.ndarray, j: np.ndarray, sums: tuple[np.ndarray, ...], levels: int
) -> np.ndarray:
    """Expected squared error of ranges ``[low, high]`` clipping bins below edge ``i`` and from edge ``j`` on."""
    p0, p1, p2 = sums
    below = p2[i] - 2 * low * p1[i] + low * low * p0[i]
    t0, t1, t2 = p0[-1] - p0[j], p1[-1] - p1[j], p2[-1] - p2[j]
    above = t2 - 2 * high * t1 + high * high * t0
    step = (np.maximum(high, 0.0) - np.minimum(low, 0.0)) / levels
    return below + above + (p0[j] - p0[i]) * step * step / 12.0


def mse_range(counts: np.ndarray, edges: np.ndarray, levels: int = 255) -> Range:
    """``[lo, hi]`` of least expected squared error on a grid of ``levels`` steps, from a histogram of ``x``."""
    _cumulative_share(counts)  # raises on an empty histogram
    bins = len(counts)
    sums = _prefix(counts, (edges[:-1] + edges[1:]) / 2)
    zero = int(np.clip(np.searchsorted(edges, 0.0), 0, bins))
    lows = np.arange(0, zero + 1)  # lo = edges[i] <= 0 (or the minimum, when every value is positive)
    highs = np.arange(max(zero, 1), bins + 1)

    def best(lo_candidates: np.ndarray, hi_candidates: np.ndarray) -> tuple[int, int]:
        i, j = np.meshgrid(lo_candidates, hi_candidates, indexing="ij")
        keep = j > i
        i, j = i[keep], j[keep]
        error = _grid_error(edges[i], edges[j], i, j, sums, levels)
        k = int(np.argmin(error))
        return int(i[k]), int(j[k])

    stride = max(1, bins // _MSE_COARSE)
    i, j = best(np.unique(np.append(lows[::stride], lows[-1])), np.unique(np.append(highs[::stride], highs[-1])))
    window = np.arange(-stride, stride + 1)
    i, j = best(np.intersect1d(i + window, lows), np.intersect1d(j + window, highs))
    return float(edges[i]), float(edges[j])


def mse_magnitude(counts: np.ndarray, edges: np.ndarray, levels: int = 127) -> float:
    """``t`` of least expected squared error of ``|x|`` on the grid ``[-t, t]`` of ``levels`` steps each side."""
    _cumulative_share(counts)
    sums = _prefix(counts, (edges[:-1] + edges[1:]) / 2)
    j = np.arange(1, len(counts) + 1)
    error = _grid_error(np.zeros(len(j)), edges[j], np.zeros(len(j), dtype=np.int64), j, sums, levels)
    return float(edges[int(np.argmin(error)) + 1])


def collect_ranges(
    calibration: CalibrationData,
    model: ir.Model,
    tensors: Iterable[str],
    *,
    method: Method,
    percentile: float = 99.99,
    bins: int = 2048,
    symmetric: bool = False,
    extra: Mapping[str, Sequence[Reducer]] | None = None,
) -> dict[str, Range]:
    """Calibrated ``[lo, hi]`` of each named tensor of ``model``; ``extra`` reducers ride along the first pass."""
    names = list(dict.fromkeys(tensors))
    minmax = {name: MinMax() for name in names}
    reducers: dict[str, list[Reducer]] = {name: [minmax[name]] for name in names}
    for name, more in (extra or {}).items():
        reducers.setdefault(name, []).extend(more)
    calibration.collect(model, reducers)
    for name, stat in minmax.items():
        if not np.isfinite(stat.min) or not np.isfinite(stat.max):
            raise CalibrationError(f"no finite calibration values reached tensor {name!r}")
    if method == "minmax":
        return {name: (stat.min, stat.max) for name, stat in minmax.items()}

    use_magnitude = method == "entropy" or symmetric
    skip_zeros = method in ("entropy", "mse")
    histograms: dict[str, Histogram | AbsHistogram] = {}
    for name, stat in minmax.items():
        if use_magnitude:
            histograms[name] = AbsHistogram(max(-stat.min, stat.max), bins, skip_zeros=skip_zeros)
        else:
            histograms[name] = Histogram(stat.min, stat.max, bins, skip_zeros=skip_zeros)
    calibration.collect(model, {name: [hist] for name, hist in histograms.items()})

    ranges: dict[str, Range] = {}
    for name, hist in histograms.items():
        low, high = minmax[name].min, minmax[name].max
        if not hist.counts.any():  # every value was an exact zero (skipped by the entropy and mse histograms)
            ranges[name] = (low, high)
            continue
        if method == "percentile" and not use_magnitude:
            ranges[name] = percentile_range(hist.counts, hist.edges, percentile)
            continue
        if method == "mse" and not use_magnitude:
            ranges[name] = mse_range(hist.counts, hist.edges)
            continue
        if method == "percentile":
            t = percentile_magnitude(hist.counts, hist.edges, percentile)
        elif method == "mse":
            t = mse_magnitude(hist.counts, hist.edges)
        else:
            t = entropy_threshold(hist.counts, hist.edges)
        ranges[name] = (max(low, -t), min(high, t))
    return ranges
