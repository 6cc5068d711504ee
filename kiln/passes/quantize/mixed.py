"""Mixed-precision weight-only quantization: bits per layer chosen under a size budget by an exact knapsack.

Sensitivity. Every calibrated weight ``W`` is quantized at each candidate width ``b`` (with GPTQ, or RTN). Its own
output error on the calibration data (:mod:`kiln.passes.quantize.gptq`) is measured around the mean::

    r(W, b) = tr(D^T C D) / tr(W^T C W),   D = W - Q_b(W),   C = G - E[x]^T E[x]  (the input's covariance)

(in a transformer most of the output energy of Q, K and O is a constant offset, 75-85% on SmolLM2, which the next
norm or softmax absorbs; uncentered, those layers look several times cheaper to cut than they are).

* ``sensitivity="layer"`` scores ``e(W, b) = r(W, b)``.
* ``sensitivity="model"`` (default) asks the model itself: with only ``W`` at the lowest candidate width ``b0``,
  ONNX Runtime runs the float model on the first ``sensitivity_batches`` calibration batches (``W`` is fed as an
  overriding input, so the model is saved once) and ``m(W)`` is the relative squared error of all graph outputs;
  then ``e(W, b) = m(W) r(W, b) / r(W, b0)``. A layer's own error says little about what it does to the output:
  on SmolLM2 at 3.5 bits, the allocations chosen from ``r`` alone reached perplexity 38.2 (uncentered) and 42.7
  (centered) where putting Q, K and O at 2 bits by hand gave 32.0. It costs one model run per weight and batch.
  A weight held by a Constant node cannot be fed; it gets ``r`` times the median ``m / r`` of the others.

Allocation. With ``n_W`` elements per weight, choose ``b_W`` among the candidates to::

    minimize  sum_W e(W, b_W)   subject to   sum_W n_W b_W <= average_bits * sum_W n_W

(errors from different layers are taken to add up, the usual first-order assumption).

(the budget counts code bits; scales and zero points come on top, as for any "W4" figure). This is a multiple-choice
knapsack, solved exactly by dynamic programming over the extra bits above the all-lowest choice: costs are
``n_W (b - b_min)``, all multiples of their greatest common divisor, so the budget axis is counted in that unit.
When that still leaves more than ``max_states`` budget steps, costs are rounded up to a coarser unit: the result
still respects the budget, is optimal for the rounded costs, and ``details["allocation"]["exact"]`` says false.

Which widths can be emitted: ONNX Runtime 1.32's MatMulNBits runs 2, 4 and 8 bits, and ONNX has INT2/INT4/INT8
for DequantizeLinear. There is no 3-bit carrier in either format, so 3 is refused as a candidate; an average such
as 3.5 bits comes from mixing 2 and 4 (and 8) bits across layers. Speed: with float activations (``accuracy_level``
0) ONNX Runtime 1.32 runs 2 bits fast only where its LUT kernel fits the shape and has no fast 8-bit GEMV (batch-1
GEMV at 576x576: 904 us at 2 bits, 265 us at 8, 36 us at 4); at ``accuracy_level=4`` (int8 activations) the three
take 24, 22 and 22 us, so a mixed model that is to decode fast wants level 4.

Matmuls inside If/Loop/Scan bodies have no statistics: they are rounded to nearest at ``bits`` and stay outside
the budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler import io
from kiln.compiler.calibration import ChannelMean, Feed, Reducer
from kiln.compiler.registry import register
from kiln.errors import KilnError
from kiln.passes.quantize import grid, pack
from kiln.passes.quantize.gptq import (
    CLIP_RATIOS,
    GPTQ,
    GPTQOptions,
    Group,
    MemberKey,
    MemberResult,
    clip_search,
    load_weight,
    quadratic,
    scale_dtype_of,
)
from kiln.passes.quantize.rtn import RTNOptions
from kiln.targets.ort.runner import make_session


def allocate(
    sizes: list[int], bits: list[int], errors: np.ndarray, budget: float, *, max_states: int = 1 << 18
) -> tuple[list[int], bool]:
    """Choose one of ``bits`` per item, minimizing ``sum errors[item, choice]`` with ``sum size * bits <= budget``.

    ``errors`` is [items, len(bits)]. Returns (choice index per item, whether the solution is exactly optimal).
    Raises KilnError when even the smallest width exceeds the budget.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    bits_arr = np.asarray(bits, dtype=np.int64)
    extra = sizes_arr[:, None] * (bits_arr - bits_arr.min())[None, :]
    floor = int((sizes_arr * bits_arr.min()).sum())
    if budget < floor:
        total = max(int(sizes_arr.sum()), 1)
        raise KilnError(
            f"bit budget of {budget / total:.3f} bits per weight is below the smallest candidate width "
            f"({bits_arr.min()} bits)"
        )
    capacity = math.floor(budget) - floor
    unit = math.gcd(*(int(c) for c in extra.ravel() if c)) or 1
    exact = capacity // unit <= max_states
    if not exact:
        unit = -(-capacity // max_states)
    costs = -(-extra // unit)
    steps = capacity // unit

    best = np.zeros(steps + 1)
    choice = np.zeros((len(sizes), steps + 1), dtype=np.int16)
    for item in range(len(sizes)):
        new = np.full(steps + 1, np.inf)
        for c, cost in enumerate(costs[item]):
            if cost > steps:
                continue
            candidate = np.full(steps + 1, np.inf)
            candidate[cost:] = best[: steps + 1 - cost] + errors[item, c]
            better = candidate < new
            new[better] = candidate[better]
            choice[item, better] = c
        best = new
    picks = []
    step = steps
    for item in reversed(range(len(sizes))):
        c = int(choice[item, step])
        picks.append(c)
        step -= int(costs[item, c])
    return picks[::-1], exact


class _ModelProbe:
    """The float model with some weights overridable by feeds, to run it with one weight replaced at a time."""

    def __init__(self, model: ir.Model, weights: list[ir.Value], feeds: list[Feed], directory: Path) -> None:
        graph = model.graph
        added = [w for w in dict.fromkeys(weights) if not w.is_graph_input()]
        graph.inputs.extend(added)  # an initializer listed as a graph input is a default a feed may override
        try:
            path = io.save(model, directory / "sensitivity.onnx")
        finally:
            for value in added:
                graph.inputs.remove(value)
        self.session = make_session(path)
        self.feeds = feeds
        self.reference = [self.session.run(None, feed) for feed in feeds]
        self.overridable = set(added)

    def error(self, key: MemberKey, dequantized: np.ndarray) -> float | None:
        """Relative squared error of all outputs with the weight of ``key`` replaced; None if it cannot be fed."""
        weight, transposed = key
        if weight not in self.overridable:
            return None
        array = np.ascontiguousarray(dequantized.T if transposed else dequantized)
        noise = signal = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            for y, expected in zip(self.session.run(None, feed | {weight.name: array}), reference):
                noise += float(np.square(y - expected, dtype=np.float64).sum())
                signal += float(np.square(expected, dtype=np.float64).sum())
        return noise / signal if signal else 0.0


def _scale_to_model(ratios: np.ndarray, measured: list[float | None]) -> np.ndarray:
    """``e(W, b) = m(W) r(W, b) / r(W, b0)``; weights without ``m`` use the median ``m / r(b0)`` of the others."""
    lowest = ratios[:, 0]
    factors = np.array([np.nan if m is None else (m / r if r > 0 else 0.0) for m, r in zip(measured, lowest)])
    known = factors[~np.isnan(factors)]
    factors[np.isnan(factors)] = np.median(known) if known.size else 1.0
    return ratios * factors[:, None]


@dataclasses.dataclass
class MixedOptions(GPTQOptions):
    """Options of ``quantize.mixed``, on top of ``quantize.gptq``'s (``bits`` is the width of uncalibrated layers).

    * ``candidate_bits``: widths each layer may get: 2, 4 or 8, the widths that are stored as such.
    * ``average_bits``: the budget, in code bits per weight element over the calibrated layers.
    * ``method``: how each width quantizes, "gptq" or "rtn".
    * ``max_states``: budget steps of the knapsack before costs are rounded (module docstring).
    * ``sensitivity``: "model" (each layer's effect on the model's outputs) or "layer" (its own output error).
    * ``sensitivity_batches``: calibration batches the "model" sensitivity runs on.
    """

    candidate_bits: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8])
    average_bits: float = 3.5
    method: Literal["gptq", "rtn"] = "gptq"
    max_states: int = 1 << 18
    sensitivity: Literal["model", "layer"] = "model"
    sensitivity_batches: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value_hessian != "input":
            raise ValueError("quantize.mixed prices every weight by its input's Gram: leave value_hessian at 'input'")
        if not self.candidate_bits:
            raise ValueError("candidate_bits must name at least one width")
        if self.stages != 1:
            raise ValueError(f"stages must be 1 here, got {self.stages}: it needs every layer's statistics first")
        if self.sequential:
            raise ValueError("sequential=True is not available here: it needs every layer's statistics first")
        for bits in self.candidate_bits:
            RTNOptions(bits, self.group_size, self.symmetric, self.format, self.accuracy_level)
            if bits not in pack.STORAGE_BITS:
                raise ValueError(
                    f"candidate_bits may hold 2, 4 and 8, got {bits}: a {bits}-bit grid is stored in "
                    f"{pack.storage_bits(bits)} bits, so under a size budget it costs as much as that width"
                )
        if self.format == "matmulnbits" and 2 in self.candidate_bits and self.group_size == 0:
            raise ValueError("2-bit MatMulNBits needs block_size <= 256: use a group_size with candidate 2")
        if self.average_bits < min(self.candidate_bits):
            raise ValueError(
                f"average_bits={self.average_bits} is below the smallest candidate ({min(self.candidate_bits)})"
            )
        if self.max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {self.max_states}")
        if self.sensitivity_batches < 1:
            raise ValueError(f"sensitivity_batches must be >= 1, got {self.sensitivity_batches}")


@register("quantize.mixed")
class MixedPrecision(GPTQ):
    """Weight-only mixed precision: per-layer bit widths from calibration sensitivity under an average-bits budget.

    Needs calibration data. Each layer is scored at every candidate width; an exact knapsack picks the widths.
    """

    Options = MixedOptions

    def dq_opset(self) -> int:
        return max(pack.dq_min_opset(bits) for bits in {*self.options.candidate_bits, self.options.bits})

    def _spec(self, bits: int) -> grid.GridSpec:
        return grid.GridSpec(bits, self.options.group_size, self.options.symmetric)

    def _at_bits(self, weights: list[np.ndarray], hessian: np.ndarray, bits: int) -> list[grid.QuantizedWeight]:
        if self.options.method == "gptq":
            return self.joint(weights, hessian, self._spec(bits))
        if self.options.clip:
            independent = self.options.clip_ends == "independent"
            spec = self._spec(bits)
            return [clip_search(w, hessian, spec, CLIP_RATIOS, scale_dtype_of(w), independent) for w in weights]
        return [grid.quantize(w, self._spec(bits), scale_dtype_of(w)) for w in weights]

    def vector_statistics(self) -> dict[str, Callable[[], Reducer]]:
        return super().vector_statistics() | {"mean": ChannelMean}

    def _mean(self, name: str) -> np.ndarray:
        return self.stats.get(name, "mean")

    def prepare(self, model: ir.Model, groups: list[Group]) -> None:
        candidates = sorted(set(self.options.candidate_bits))
        probe = self._probe(model, groups) if self.options.sensitivity == "model" else None
        keys: list[MemberKey] = []
        ratios: list[list[float]] = []
        measured: list[float | None] = []
        sizes: list[int] = []
        for group in groups:
            hessian = self.hessian(group)
            covariance = hessian - sum(np.outer(mean, mean) for mean in map(self._mean, group.inputs))
            weights = [load_weight(key) for key in group.members]
            signal = [quadratic(covariance, w) for w in weights]
            scores: list[list[float]] = [[] for _ in weights]
            for bits in candidates:
                quantized = self._at_bits(weights, hessian, bits)
                for i, (w, q) in enumerate(zip(weights, quantized)):
                    noise = quadratic(covariance, np.asarray(w, dtype=np.float32) - grid.dequantize(q))
                    scores[i].append(noise / signal[i] if signal[i] > 0 else 0.0)
                if bits == candidates[0]:
                    lowest = quantized
            for key, w, q in zip(group.members, weights, lowest):
                measured.append(None if probe is None else probe.error(key, grid.dequantize(q).astype(w.dtype)))
            keys += group.members
            ratios += scores
            sizes += [w.size for w in weights]
            del weights, lowest
        table = np.array(ratios, dtype=np.float64).reshape(len(ratios), len(candidates))  # (0, n) with no weights
        errors = _scale_to_model(table, measured) if probe is not None else table
        total = sum(sizes)
        budget = self.options.average_bits * total
        picks, exact = allocate(sizes, candidates, errors, budget, max_states=self.options.max_states)
        self._bits = {key: candidates[c] for key, c in zip(keys, picks)}
        self._sensitivity = {key: dict(zip(map(str, candidates), map(float, e))) for key, e in zip(keys, errors)}
        used = sum(size * candidates[c] for size, c in zip(sizes, picks))
        self.details["allocation"] = {
            "budget_bits": self.options.average_bits,
            "average_bits": used / total if total else 0.0,
            "exact": exact,
            "elements": total,
            "sensitivity": self.options.sensitivity,
            "layers_per_bits": {str(b): sum(candidates[c] == b for c in picks) for b in candidates},
            "sum_error": float(sum(e[c] for e, c in zip(errors, picks))),
        }

    def _probe(self, model: ir.Model, groups: list[Group]) -> _ModelProbe:
        assert self.context.calibration is not None  # checked by requires()
        feeds = list(itertools.islice(iter(self.context.calibration), self.options.sensitivity_batches))
        weights = [key[0] for group in groups for key in group.members if key[0].is_initializer()]
        return _ModelProbe(model, weights, feeds, self.stats.directory)

    def release(self) -> None:
        super().release()
        self._bits: dict[MemberKey, int] = {}
        self._sensitivity: dict[MemberKey, dict[str, float]] = {}

    def quantize_group(self, group: Group, weights: list[np.ndarray]) -> list[MemberResult]:
        hessian = self.hessian(group)
        results: dict[MemberKey, MemberResult] = {}
        for bits in sorted({self._bits[key] for key in group.members}):
            chosen = [(key, w) for key, w in zip(group.members, weights) if self._bits[key] == bits]
            quantized = self._at_bits([w for _, w in chosen], hessian, bits)
            for (key, _), q in zip(chosen, quantized):
                info: dict[str, Any] = {"bits": bits, "sensitivity": self._sensitivity[key]}
                results[key] = MemberResult(q, grid.dequantize(q), info=info)
        return [results[key] for key in group.members]
