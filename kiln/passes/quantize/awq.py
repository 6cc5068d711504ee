"""AWQ: activation-aware weight-only quantization (Lin et al.), with the scale folded into the graph exactly.

Scale search. The matmuls reading one tensor ``A`` (Q/K/V; gate/up) share one scale per input channel::

    m = sqrt(E[A^2]) per channel,   s = clamp(m^alpha, 1e-4) / sqrt(max(.) * min(.))   (AWQ's normalization)
    A W = (A diag(1/s)) (diag(s) W)

so the quantized weight is ``diag(s) W``: channels with large activations get a finer effective grid. ``alpha``
runs over ``{0, 1/n, ..., (n-1)/n}`` (``n = grid_points``; alpha 0 is plain RTN) and the one minimizing the group's
calibration output error ``sum tr(D^T G D)``, ``D = W - diag(1/s) Q(diag(s) W)`` (``G`` the Gram of ``A``, see
:mod:`kiln.passes.quantize.gptq`) wins; if no alpha beats RTN, ``s = 1``. AWQ measures a channel by its mean
magnitude ``E|A|`` (``magnitude="mean_abs"``); the RMS (the default, read off the Gram's diagonal, so no extra
statistic) weighs a channel's outliers more. SmolLM2 at 4 bits, group 128 (fp32 24.22): perplexity 27.14 with the
mean magnitude and 26.94 with the RMS on 32 calibration windows; 27.15 and 27.13 on 128.

With ``duo_scaling`` (AutoAWQ's default) the weights' own magnitudes enter too, ``s = m^alpha / w^(1 - alpha)``,
``w`` the mean over output columns of ``|W|`` relative to its (group, column) maximum: a channel whose weights are
already large within their groups needs less protection. On SmolLM2 at 4 bits, groups of 128, it did not help:
perplexity 27.70 against 27.77 without it on 8 calibration windows, 27.55 against 27.38 on 128 (fp32 24.22), so it
is off by default.

Folding ``1/s`` (each is exact in float; ``A`` must feed only the group's matmuls):

* ``A = Mul(x, c)`` with a constant ``c`` per channel (RMSNorm's weight): ``c`` becomes ``c / s``;
* ``A`` = output 0 of LayerNormalization, RMSNormalization or (Skip)SimplifiedLayerNormalization /
  SkipLayerNormalization: their scale (and bias) become ``/ s``;
* ``A = v`` or ``A = Mul(u, v)`` where ``v = MatMul(x, Wp)`` and ``Wp`` is quantized by this pass and used nowhere
  else (SwiGLU: the down projection reads ``silu(gate) * up``): ``Wp``'s output columns are divided by ``s``. This
  is applied to ``Wp``'s quantized group scales: grids have one scale per (group, column) and clipping and GPTQ
  work column by column, so ``Q(Wp diag(c)) = Q(Wp) diag(c)`` and nothing about ``Wp``'s own quantization changes;
* otherwise, with ``insert_mul``, an explicit ``Mul(A, 1/s)`` feeding the group (one elementwise op per group, e.g.
  the attention output projection); without it the group keeps ``s = 1`` (clipping only).

Sequential (``sequential``, as in :mod:`kiln.passes.quantize.gptq`). Groups are then searched, folded and
quantized in graph order on the inputs ``x̂`` the already quantized groups give, toward the float model's outputs:
the search runs on the refit target ``W*`` with ``G = E[x̂^T x̂]`` (a group whose inputs nothing before it changed
gets exactly the one-pass result). A fold changes a tensor the walk has already computed, so the walk's cached
values of ``A`` are divided by ``s`` too (:meth:`kiln.compiler.sequential.Sequential.revise`), and a fold into an
up projection's output columns scales that projection's emitted grid scales (the same ``Q(Wp) diag(c)`` as above).
An inserted Mul lies after the walk's cut and simply runs. The channel magnitude is then the RMS of ``x̂``.
SmolLM2 at 4 bits, group 128 (fp32 24.22): perplexity 26.94 -> 26.32 on 32 calibration windows, 27.13 -> 26.02 on
128 (``python tools/calibration_size.py --recipe <awq-w4 with sequential = true> 32 128``).

With ``method="gptq"`` the scaled weight ``diag(s) W`` is quantized by GPTQ (:mod:`kiln.passes.quantize.gptq`)
against the Hessian of the scaled input, ``diag(1/s) G diag(1/s)``, instead of round-to-nearest.

Clipping (``clip``). Per (group along K, column), the grid's range ``[lo, hi]`` is shrunk to ``[a lo, b hi]``,
``a`` and ``b`` each in ``{1, 0.95, ..., 0.55}``, and the pair minimizing that group's own output error
``d^T G_gg d`` wins (``G_gg`` the group's diagonal block of the Gram of ``A diag(1/s)``; terms across groups are
ignored, as in AWQ). Codes outside the shrunk range saturate. AWQ shrinks both ends by one ratio
(``clip_ends="joint"``); searching them separately suits asymmetric grids, whose groups are rarely centred on 0.
SmolLM2 at 4 bits, group 128, 32 calibration windows (fp32 24.22): perplexity 27.75 joint, 27.14 independent;
a finer grid (steps of 0.025 down to 0.525) gave 27.44 joint and 27.11 independent, at 4x the clipping time.
Two things did not help there: clipping inside the scale search (27.27) and refitting each group's scale and zero
point by weighted least squares once its codes are fixed (27.15).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import ChannelMean, Reducer
from kiln.compiler.registry import register
from kiln.passes import _weights
from kiln.passes.quantize import grid
from kiln.passes.quantize.gptq import (
    CLIP_RATIOS,
    CalibratedWeightOnly,
    GPTQOptions,
    Group,
    MemberKey,
    MemberResult,
    clip_search,
    column_chunks,
    gptq,
    load_weight,
    quadratic,
    scale_dtype_of,
    split_columns,
)
from kiln.passes.quantize.rtn import WeightSite, _Packed

#: Normalizations whose output 0 is ``normalized * scale (+ bias)`` over the last axis: (scale input, bias input).
_NORMS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1, None),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1, None),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2, None),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
}
#: The ops among ``_NORMS`` that have an ``axis`` attribute (default -1); the Skip* ops always use the last axis.
_NORMS_WITH_AXIS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}


def awq_scales(magnitude: np.ndarray, alpha: float, weight_mean: np.ndarray | None = None) -> np.ndarray:
    """AWQ's per-channel scale for activation magnitudes ``magnitude`` and exponent ``alpha``.

    ``weight_mean`` (duo scaling, module docstring) divides by the weights' relative magnitudes to ``1 - alpha``.
    """
    s = np.power(np.asarray(magnitude, dtype=np.float64), alpha)
    if weight_mean is not None:
        s = s / (np.power(np.asarray(weight_mean, dtype=np.float64), 1.0 - alpha) + 1e-4)
    s = np.maximum(s, 1e-4)
    return s / np.sqrt(s.max() * s.min())


def relative_weight_mean(w: np.ndarray, group_size: int) -> np.ndarray:
    """Per input channel (row of ``w``, K x N), the mean over columns of ``|w|`` over its (group, column) maximum."""
    k = w.shape[0]
    size = group_size or k
    magnitude = np.abs(np.asarray(w, dtype=np.float64))
    total = np.zeros(k)
    for start in range(0, k, size):
        block = magnitude[start : start + size]
        peak = block.max(axis=0, keepdims=True)
        total[start : start + size] = (block / np.where(peak > 0, peak, 1.0)).mean(axis=1)
    return total


@dataclasses.dataclass
class Fold:
    """Where ``1/s`` of an input tensor goes (module docstring).

    ``node`` and ``inputs``: the producer and its constant inputs to divide by ``s`` ("constant", "norm");
    ``owner``: the weight whose output columns are divided by ``s`` ("columns").
    """

    kind: Literal["constant", "norm", "columns", "mul", "none"]
    node: ir.Node | None = None
    inputs: tuple[int, ...] = ()
    owner: ir.Value | None = None

    def describe(self) -> str:
        if self.kind in ("constant", "norm"):
            assert self.node is not None
            return f"{self.kind} of {self.node.op_type} node {self.node.name!r}"
        if self.kind == "columns":
            assert self.owner is not None
            return f"output columns of weight {self.owner.name!r}"
        return {"mul": "inserted Mul", "none": "not scaled (no exact fold)"}[self.kind]


def _per_channel_constant(value: ir.Value | None, k: int) -> bool:
    """``value`` is a float constant broadcasting along the last axis only, with 1 or ``k`` entries there."""
    tensor = None if value is None else _weights.constant_tensor(value)
    if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return False
    shape = tuple(tensor.shape.numpy())
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, k))


def _column_owner(value: ir.Value | None, scalable: Collection[ir.Value]) -> ir.Value | None:
    """The weight of ``value = MatMul(x, W)`` if ``W`` is in ``scalable`` and nothing else reads ``W`` or ``value``."""
    if value is None or len(value.uses()) != 1 or value.is_graph_output():
        return None
    producer = value.producer()
    if producer is None or producer.op_type != "MatMul" or producer.domain not in ("", "ai.onnx"):
        return None
    weight = producer.inputs[1]
    if weight is None or weight not in scalable or len(weight.uses()) != 1:
        return None
    return weight


def plan_fold(
    a: ir.Value, consumers: Collection[ir.Node], k: int, scalable: Collection[ir.Value], *, insert_mul: bool
) -> Fold:
    """Where the inverse scale of ``a`` (read as input 0 by ``consumers``) can go; nothing is changed yet.

    ``scalable``: weights (MatMul orientation) whose output columns the caller can scale.
    """
    exclusive = not a.is_graph_output() and all(use.node in consumers and use.idx == 0 for use in a.uses())
    producer = a.producer()
    if exclusive and producer is not None:
        if producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
            for index in (0, 1):
                if _per_channel_constant(producer.inputs[index], k):
                    return Fold("constant", producer, (index,))
            for index in (0, 1):
                owner = _column_owner(producer.inputs[index], scalable)
                if owner is not None:
                    return Fold("columns", owner=owner)
        norm = _NORMS.get((producer.domain if producer.domain != "ai.onnx" else "", producer.op_type))
        if norm is not None and producer.outputs[0] is a and _last_axis(producer, a):
            scale, bias = norm
            indices = [i for i in (scale, bias) if i is not None and i < len(producer.inputs) and producer.inputs[i]]
            if all(_per_channel_constant(producer.inputs[i], k) for i in indices):
                return Fold("norm", producer, tuple(indices))
        owner = _column_owner(a, scalable)
        if owner is not None:
            return Fold("columns", owner=owner)
    return Fold("mul") if insert_mul else Fold("none")


def _last_axis(node: ir.Node, output: ir.Value) -> bool:
    if node.op_type not in _NORMS_WITH_AXIS:
        return True
    axis = node.attributes.get_int("axis", -1)
    return axis == -1 or (output.shape is not None and axis == len(output.shape) - 1)


def apply_fold(
    graph: ir.Graph,
    fold: Fold,
    a: ir.Value,
    consumers: Collection[ir.Node],
    s: np.ndarray,
    names: _weights.NameScope,
) -> None:
    """Divide ``a`` by ``s`` as planned. "columns" and "none" change nothing here (the caller scales ``owner``)."""
    inverse = 1.0 / np.asarray(s, dtype=np.float64)
    if fold.kind in ("constant", "norm"):
        assert fold.node is not None
        for index in fold.inputs:
            old = fold.node.inputs[index]
            assert old is not None
            array = _weights.constant_array(old)
            assert array is not None  # checked by plan_fold
            shape = (*array.shape[:-1], len(inverse)) if array.ndim else (len(inverse),)
            scaled = (np.broadcast_to(array.astype(np.float64), shape) * inverse).astype(array.dtype)
            new = _weights.add_initializer(graph, names.fresh(f"{old.name or 'scale'}_awq"), scaled)
            fold.node.replace_input_with(index, new)
            _weights.remove_if_unused(old)
    elif fold.kind == "mul":
        # ``a`` may carry no type (an unannotated intermediate); MatMul's inputs share one type, so its weight's.
        known = [a.dtype, *(node.inputs[1].dtype for node in consumers if len(node.inputs) > 1 and node.inputs[1])]
        dtype = np.float16 if next((t for t in known if t is not None), None) == ir.DataType.FLOAT16 else np.float32
        factor = _weights.add_initializer(graph, names.fresh(f"{a.name}_awq_inverse_scale"), inverse.astype(dtype))
        mul = ir.node("Mul", [a, factor], name=names.fresh(f"{a.name}_awq_scale"))
        scaled = mul.outputs[0]
        scaled.name = names.fresh(f"{a.name}_awq")
        scaled.type, scaled.shape = a.type, a.shape
        producer = a.producer()
        if producer is not None:
            graph.insert_after(producer, [mul])
        else:
            graph.insert_before(graph.node(0), [mul])
        for node in consumers:
            node.replace_input_with(0, scaled)


def _scale_grid_columns(scales: ir.Value, factor: np.ndarray, layout: str) -> None:
    """Multiply the output columns of an emitted quantized weight by ``factor`` through its grid scales: rows of
    MatMulNBits' ``[N, n_blocks]``, the last axis of DequantizeLinear's ``[n_blocks, N]`` (or ``[N]``)."""
    tensor = scales.const_value
    assert tensor is not None
    array = tensor.numpy()
    column = factor[:, None] if layout == "matmulnbits" else factor
    scales.const_value = ir.tensor((array.astype(np.float64) * column).astype(array.dtype), name=scales.name)


@dataclasses.dataclass
class AWQOptions(GPTQOptions):
    """Options of ``quantize.awq``, on top of ``quantize.rtn``'s (and ``quantize.gptq``'s, for ``method="gptq"``).

    * ``grid_points``: alphas searched for the scale.
    * ``magnitude``: a channel's activation magnitude, "rms" or AWQ's "mean_abs" (module docstring).
    * ``duo_scaling``: the scale also divides by the weights' relative magnitudes (module docstring).
    * ``clip``: search a range shrink per (group, column).
    * ``clip_ends``: as in ``quantize.gptq``, but "independent" by default here (module docstring).
    * ``insert_mul``: scale inputs whose inverse cannot be folded into their producer with an explicit Mul.
    * ``method``: how the scaled weights are put on the grid: "rtn" (AWQ) or "gptq" (GPTQ on ``diag(s) W`` with
      the scaled input's Hessian, its group ranges clipped as above when ``clip``).
    """

    clip: bool = True
    clip_ends: Literal["joint", "independent"] = "independent"
    grid_points: int = 20
    magnitude: Literal["mean_abs", "rms"] = "rms"
    duo_scaling: bool = False
    insert_mul: bool = True
    method: Literal["rtn", "gptq"] = "rtn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value_hessian != "input":
            raise ValueError("quantize.awq prices every weight by its input's Gram: leave value_hessian at 'input'")
        if self.grid_points < 1:
            raise ValueError(f"grid_points must be >= 1, got {self.grid_points}")
        if self.stages != 1:
            raise ValueError(f"stages must be 1 here, got {self.stages}: use sequential=True to see earlier layers")
        if self.sequential and self.magnitude == "mean_abs":
            raise ValueError('sequential=True measures channels by their RMS: set magnitude="rms"')


@register("quantize.awq")
class AWQ(CalibratedWeightOnly):
    """Weight-only AWQ: per-input-channel scales from activation magnitudes, folded exactly, plus range clipping.

    Needs calibration data. The scale is searched per input tensor (Q/K/V together); the output error on the
    calibration data decides.
    """

    Options = AWQOptions

    def vector_statistics(self) -> dict[str, Callable[[], Reducer]]:
        extra = {"mean_abs": lambda: ChannelMean(absolute=True)} if self.options.magnitude == "mean_abs" else {}
        return super().vector_statistics() | extra

    def sequential(self) -> bool:
        return self.options.sequential

    def prepare(self, model: ir.Model, groups: list[Group]) -> None:
        self._input_scale: dict[tuple[str, ...], np.ndarray] = {}
        self._column_scale: dict[MemberKey, np.ndarray] = {}
        self._info: dict[MemberKey, dict[str, Any]] = {}
        self._plans: dict[tuple[str, ...], tuple[Fold, ir.Value, list[ir.Node]]] = {}
        self._emitted: dict[MemberKey, ir.Value] = {}
        nodes: dict[MemberKey, list[ir.Node]] = {}
        for site in self.sites:
            if site.label in self.calibrated:
                nodes.setdefault((site.weight, site.transposed), []).append(site.node)
        scalable = {weight for group in groups for weight, transposed in group.members if not transposed}
        self._names = _weights.NameScope(model)
        for group in groups:
            if len(group.inputs) != 1:
                for key in group.members:
                    self._info[key] = {"fold": "not scaled (the weight reads several tensors)"}
                continue
            consumers = [node for key in group.members for node in nodes[key]]
            a = consumers[0].inputs[0]
            assert a is not None
            fold = plan_fold(a, consumers, group.k, scalable, insert_mul=self.options.insert_mul)
            for key in group.members:
                self._info[key] = {"fold": fold.describe()}
            if fold.kind == "none":
                continue
            self._plans[group.inputs] = (fold, a, consumers)
            if not self.sequential():  # else searched when the walk reaches the group (quantize_group)
                self._scale_group(group, self.hessian(group), [load_weight(key) for key in group.members])

    def release(self) -> None:
        super().release()
        self._input_scale = {}
        self._column_scale = {}
        self._info = {}
        self._plans = {}
        self._emitted = {}

    def _quantize(self, site: WeightSite, names: _weights.NameScope) -> _Packed:
        packed = super()._quantize(site, names)
        if self.sequential() and site.node.graph is self._main:
            self._emitted[site.weight, site.transposed] = packed.inputs[1]  # its scales, for a later column fold
        return packed

    def _scale_group(self, group: Group, hessian: np.ndarray, weights: list[np.ndarray]) -> None:
        """Search the planned group's scale for ``weights`` under ``hessian`` and fold it (module docstring).

        During a sequential walk the fold changes tensors the walk has already computed: its cached values of the
        scaled tensor are revised, and a fold into an earlier weight's output columns scales that weight's emitted
        grid scales (in one pass the weight is not quantized yet and takes the column scale then).
        """
        fold, a, consumers = self._plans[group.inputs]
        alpha, s, gain = self._search(group, hessian, weights)
        if alpha is None:
            info = {"fold": "not scaled (no scale beat RTN's on the calibration data)"}
        else:
            apply_fold(self._main, fold, a, consumers, s, self._names)
            info = {"fold": fold.describe(), "alpha": alpha, "search_error_vs_rtn": gain}
            self._input_scale[group.inputs] = s
            if self._walk is not None:
                assert a.name is not None
                if fold.kind != "mul":  # an inserted Mul lies after the walk's cut and runs in its next segment
                    self._walk.revise(a.name, lambda x: (x / s).astype(x.dtype))
                if fold.owner is not None:
                    _scale_grid_columns(self._emitted[fold.owner, False], 1.0 / s, self.options.format)
            elif fold.owner is not None:
                self._column_scale[fold.owner, False] = 1.0 / s
        for key in group.members:
            self._info[key] = dict(info)

    def _search(
        self, group: Group, hessian: np.ndarray, weights: list[np.ndarray]
    ) -> tuple[float | None, np.ndarray, float]:
        """(alpha, its scale, its output error relative to RTN's) for a group's ``weights`` under ``hessian``; alpha
        None when RTN's scale 1 wins."""
        opts = self.options
        spec = opts.spec
        if opts.magnitude == "mean_abs":
            magnitude = self.stats.get(group.inputs[0], "mean_abs")
        else:
            magnitude = np.sqrt(np.maximum(np.diag(hessian), 0.0))
        dtype = scale_dtype_of(weights[0])
        w = np.concatenate([np.asarray(x, dtype=np.float32) for x in weights], axis=1)
        weight_mean = relative_weight_mean(w, spec.group_size) if opts.duo_scaling else None

        def loss(s: np.ndarray) -> float:
            column = s.astype(np.float32)[:, None]
            total = 0.0
            for cols in column_chunks(*w.shape):
                q = grid.quantize(w[:, cols] * column, spec, dtype)
                total += quadratic(hessian, w[:, cols] - grid.dequantize(q) / column)
            return total

        rtn = loss(np.ones(group.k))
        best: tuple[float, float | None, np.ndarray] = (rtn, None, np.ones(group.k))
        for i in range(opts.grid_points):
            alpha = i / opts.grid_points
            if alpha == 0 and weight_mean is None:
                continue  # scale 1: RTN, measured above
            s = awq_scales(magnitude, alpha, weight_mean)
            error = loss(s)
            if error < best[0]:
                best = (error, alpha, s)
        error, alpha, s = best
        return alpha, s, error / rtn if rtn else 1.0

    def quantize_group(self, group: Group, weights: list[np.ndarray]) -> list[MemberResult]:
        opts = self.options
        dtype = scale_dtype_of(weights[0])
        gram = self.hessian(group)
        if self._walk is not None and group.inputs in self._plans:
            self._scale_group(group, gram, weights)
        s = self._input_scale.get(group.inputs)
        scaled = [np.asarray(w, dtype=np.float32) for w in weights]
        if s is not None:
            scaled = [w * s.astype(np.float32)[:, None] for w in scaled]
            gram = gram / np.outer(s, s)  # the Gram of A diag(1/s)
        ratios = CLIP_RATIOS if opts.clip else None
        independent = opts.clip_ends == "independent"
        if opts.method == "gptq":
            joined = np.concatenate(scaled, axis=1) if len(scaled) > 1 else scaled[0]
            q = gptq(
                joined,
                gram,
                opts.spec,
                damp=opts.damp,
                block_size=opts.block_size,
                act_order=opts.act_order,
                clip_ratios=ratios,
                scale_dtype=dtype,
                independent_ends=independent,
            )
            quantized = split_columns(q, [w.shape[1] for w in scaled])
        elif ratios:
            quantized = [clip_search(w, gram, opts.spec, ratios, dtype, independent) for w in scaled]
        else:
            quantized = [grid.quantize(w, opts.spec, dtype) for w in scaled]
        results = []
        for key, q in zip(group.members, quantized):
            dequantized = grid.dequantize(q)
            if s is not None:
                dequantized /= s.astype(np.float32)[:, None]
            column = self._column_scale.get(key)
            if column is not None:
                q.scales = (q.scales.astype(np.float64) * column).astype(q.scales.dtype)
            info = self._info.get(key, {}) | ({"output_columns_scaled": True} if column is not None else {})
            results.append(MemberResult(q, dequantized, column, info))
        return results
