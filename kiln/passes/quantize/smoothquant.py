"""SmoothQuant: move activation outliers into the weights, so that 8-bit activations and weights (W8A8) both hold.

Math. For an activation ``X`` [..., K] read by linear layers ``Y_i = X W_i`` (``W_i`` [K, N_i]), one positive
scale per input channel ``j``::

    s_j = max|X_j|^a / max_i max_n |W_i[j, n]|^(1 - a)          (both maxima floored at 1e-5)
    X W_i = (X diag(1/s)) (diag(s) W_i)

``max|X_j|`` comes from calibration (per-channel min/max streamed over the calibration set). Layers sharing
``X`` (Q, K and V after one norm; gate and up after another) share one ``s``. The rewrite is exact in real
arithmetic: the smoothed float model computes what the original did, and a later ``quantize.static-int8`` sees
a flatter ``X / s`` (smaller per-tensor step) and taller weight rows (per-channel grids absorb that).

Migration strength ``a``: fixed by option ``alpha``, or searched per group over ``alphas``, minimising the
estimated output error of the W8A8 layers (:func:`kiln.passes.quantize.int8.estimated_error`): per-channel
mean squares of ``X / s``, the smoothed weights' round-trip through the per-channel int8 grid, and the
activation step of ``X / s``'s range on the grid of ``activation_type``. When searching, a group whose best
estimate is no better than leaving it alone is left alone.

Graph change. ``diag(s)`` is multiplied into each ``W_i`` (the rows of a MatMul weight, the columns of a Gemm
weight with ``transB=1``). ``1/s`` is folded into what produces ``X`` when nothing else reads ``X``, following
these rules from ``X`` upwards (each intermediate tensor read only by the next step):

    LayerNormalization / RMSNormalization / SimplifiedLayerNormalization / Skip(Simplified)LayerNormalization
                                -> scale (and bias) / s
    Mul(x, c), c constant [C] or broadcast along the last axis only      -> c / s
    Add(y, c), c constant as above                                       -> c / s, and fold into y
    Mul(a, b), both computed, b's (else a's) last axis of size C         -> fold into that operand
    MatMul(h, V) / Gemm(h, V[, c]), V constant                           -> columns of V (and c) / s

so RMSNorm's weight, LayerNorm's affine, and for a Llama MLP the ``up`` projection (``down`` reads
``silu(gate) * up``) absorb it with no new node. Otherwise (a post-norm encoder's LayerNorm output also feeds the
residual; attention outputs come through Reshape), with ``scope="all"`` (default) an explicit ``Mul(X, 1/s)`` is
inserted before the group's layers; with ``scope="foldable"`` the group is left alone. A constant read elsewhere
too is copied rather than changed. Reasons are in ``details["skipped"]``.

Eligible layers: MatMul and Gemm (``transA=0``) of the main graph reading a float32 activation as their first
input and a 2-D float32 constant weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import ChannelMeanSquare
from kiln.compiler.registry import register
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.quantize import int8
from kiln.passes.quantize.ranges import ChannelMinMax

_OP_TYPES = ("MatMul", "Gemm")
#: Normalizations whose output is scaled per channel by constants: op type -> (scale input, bias input).
_NORMS = {
    "LayerNormalization": (1, 2),
    "RMSNormalization": (1, None),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}
_FLOOR = 1e-5
_MAX_FOLD_DEPTH = 4


def _default_alphas() -> list[float]:
    return [round(0.3 + 0.05 * i, 2) for i in range(13)]


@dataclasses.dataclass
class SmoothQuantOptions:
    """Options of ``quantize.smoothquant``.

    * ``alpha``: fixed migration strength in [0, 1]; ``None`` searches ``alphas`` per group.
    * ``alphas``: the grid searched when ``alpha`` is ``None`` (default 0.30, 0.35, ..., 0.90).
    * ``scope``: "foldable" smooths only groups whose ``1/s`` folds into a producer; "all" inserts a Mul elsewhere.
    * ``activation_type``: the activation grid the search assumes; match the static-int8 pass that follows.
    * ``weight_type``: the weight storage the search assumes (values are the same for "uint8" and "int8").
    * ``op_types``: which of MatMul and Gemm are smoothed.
    * ``exclude``: node names of layers to leave alone (their input then counts as read elsewhere).
    """

    alpha: float | None = None
    alphas: list[float] = dataclasses.field(default_factory=_default_alphas)
    scope: Literal["foldable", "all"] = "all"
    activation_type: int8.ActivationType = "uint8"
    weight_type: int8.WeightType = "uint8"
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(_OP_TYPES))
    exclude: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty list of values in [0, 1], got {self.alphas}")
        if self.scope not in ("foldable", "all"):
            raise ValueError(f"scope must be 'foldable' or 'all', got {self.scope!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type must be 'uint8' or 'int8', got {self.activation_type!r}")
        if self.weight_type not in ("uint8", "int8"):
            raise ValueError(f"weight_type must be 'uint8' or 'int8', got {self.weight_type!r}")
        unknown = sorted(set(self.op_types) - set(_OP_TYPES))
        if unknown:
            raise ValueError(f"op_types may contain only MatMul and Gemm, got {unknown}")


@dataclasses.dataclass
class _Layer:
    label: str
    node: ir.Node
    #: Gemm ``transB=1``: the weight is stored [N, K].
    transposed: bool
    #: Input channels.
    k: int


@dataclasses.dataclass
class _Group:
    """An activation and the linear layers reading it, which share one smoothing scale."""

    activation: ir.Value
    layers: list[_Layer]
    #: Applies ``1/s`` to the activation: constants folded upstream, or an inserted Mul.
    apply: Callable[[np.ndarray], None]
    how: str


#: A folding step: given the scale s [C], change one constant so that the tensor it feeds is divided by s.
_Fold = Callable[[np.ndarray], None]


@register("quantize.smoothquant")
class SmoothQuant(KilnPass):
    """SmoothQuant: per-channel scales move activation outliers into the weights before W8A8 quantization."""

    Options = SmoothQuantOptions
    needs_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        calibration = self.context.calibration
        assert calibration is not None  # checked in requires()
        calibration.validate(model)
        self.details = {
            "alpha": opts.alpha if opts.alpha is not None else "search",
            "scope": opts.scope,
            "groups": {},
            "skipped": {},
        }
        names = _weights.NameScope(model)
        groups = self._find_groups(model, names)
        if not groups:
            return ir.passes.PassResult(model, modified=False)

        ranges = {g.activation.name: ChannelMinMax() for g in groups}
        mean_squares = {g.activation.name: ChannelMeanSquare() for g in groups}
        calibration.collect(model, {name: [ranges[name], mean_squares[name]] for name in ranges})

        modified = False
        for group in groups:
            name = group.activation.name
            stat = ranges[name]
            record = self._smooth(group, stat, mean_squares[name].value, names)
            record.update({"layers": [layer.label for layer in group.layers], "fold": group.how})
            self.details["groups"][name] = record
            modified = modified or record["alpha"] is not None
        return ir.passes.PassResult(model, modified=modified)

    # -- finding groups ------------------------------------------------------------------------------------------

    def _find_groups(self, model: ir.Model, names: _weights.NameScope) -> list[_Group]:
        skipped: dict[str, str] = self.details["skipped"]
        readers: dict[ir.Value, list[_Layer]] = {}
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.options.op_types:
                continue
            label = node.name or f"{node.op_type}:{node.outputs[0].name}"
            layer = self._inspect(node, label)
            if isinstance(layer, str):
                skipped[label] = layer
            else:
                readers.setdefault(layer.node.inputs[0], []).append(layer)  # type: ignore[arg-type]
        groups = []
        for activation, layers in readers.items():
            apply, how = self._plan(activation, layers, names)
            if apply is None:
                for layer in layers:
                    skipped[layer.label] = how
            else:
                groups.append(_Group(activation, layers, apply, how))
        return groups

    def _inspect(self, node: ir.Node, label: str) -> _Layer | str:
        if label in self.options.exclude:
            return "excluded by option 'exclude'"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "node lacks an input"
        activation, weight = node.inputs[0], node.inputs[1]
        if activation.dtype not in (None, ir.DataType.FLOAT) or _weights.constant_tensor(activation) is not None:
            return f"first input {activation.name!r} is not a float32 activation"
        tensor = _weights.constant_tensor(weight)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            return f"second input {weight.name!r} is not a 2-D float32 constant"
        if weight.is_graph_input():
            return f"weight {weight.name!r} is a graph input (it can be overridden at run time)"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "Gemm with transA=1 is not handled"
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        rows, columns = tensor.shape.numpy()
        return _Layer(label, node, transposed, columns if transposed else rows)

    def _plan(self, activation: ir.Value, layers: list[_Layer], names: _weights.NameScope) -> tuple[_Fold | None, str]:
        """How ``1/s`` reaches ``activation`` (a fold upstream, or an inserted Mul), or why it cannot."""
        k = layers[0].k
        if any(layer.k != k for layer in layers):
            return None, f"layers reading {activation.name!r} disagree on its channel count"
        group_nodes = {layer.node for layer in layers}
        others = [use.node for use in activation.uses() if use.node not in group_nodes or use.idx != 0]
        if others or activation.is_graph_output():
            why = "it is a graph output" if not others else f"{others[0].op_type} {others[0].name!r} reads it too"
        else:
            folds = _fold_steps(activation, k, 0, names)
            if isinstance(folds, list):
                producer = activation.producer()
                assert producer is not None
                return _run_all(folds), f"folded into {producer.op_type} {producer.name!r}"
            why = folds
        if self.options.scope == "all":
            return _inserted_mul(activation, layers, names), f"Mul inserted ({why})"
        return None, f"input {activation.name!r} not smoothed: {why} (scope='foldable')"

    # -- choosing and applying s -----------------------------------------------------------------------------------

    def _smooth(
        self, group: _Group, stat: ChannelMinMax, mean_square: np.ndarray, names: _weights.NameScope
    ) -> dict[str, Any]:
        """Pick ``s`` for ``group`` (fixed alpha or search), apply it, and return what was done."""
        opts = self.options
        assert stat.min is not None and stat.max is not None
        weights = [_layer_weight(layer) for layer in group.layers]
        act_max = np.maximum(stat.absmax.astype(np.float64), _FLOOR)
        w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64), _FLOOR)

        def error(s: np.ndarray) -> tuple[float, float]:
            grid = int8.activation_grid(float(np.min(stat.min / s)), float(np.max(stat.max / s)), opts.activation_type)
            total, signal = 0.0, 0.0
            for w in weights:
                smoothed = (w * s[:, None]).astype(np.float32)
                restored = int8.quantize_weight(smoothed, 1, opts.weight_type).dequantize()
                e, sig = int8.estimated_error(mean_square / s**2, smoothed, restored, grid.scale)
                total, signal = total + e, signal + sig
            return total, signal

        def scales(alpha: float) -> np.ndarray:
            return act_max**alpha / w_max ** (1.0 - alpha)

        base_error, signal = error(np.ones_like(act_max))
        record: dict[str, Any] = {"est_rel_error_unsmoothed": _ratio(base_error, signal)}
        if opts.alpha is not None:
            alpha, s = opts.alpha, scales(opts.alpha)
            best_error = error(s)[0]
        else:
            candidates = [(error(scales(a))[0], a) for a in opts.alphas]
            best_error, alpha = min(candidates, key=lambda c: c[0])
            record["search"] = {f"{a:g}": _ratio(e, signal) for e, a in candidates}
            s = scales(alpha)
            if best_error >= base_error:
                record.update(alpha=None, reason="no alpha lowers the estimated W8A8 error")
                return record
        group.apply(s)
        for layer, w in zip(group.layers, weights):
            _set_layer_weight(layer, w * s[:, None], names)
        record.update(
            alpha=alpha,
            est_rel_error=_ratio(best_error, signal),
            range_before=[float(stat.min.min()), float(stat.max.max())],
            range_after=[float(np.min(stat.min / s)), float(np.max(stat.max / s))],
            scale_min=float(s.min()),
            scale_max=float(s.max()),
        )
        return record


def _inserted_mul(activation: ir.Value, layers: list[_Layer], names: _weights.NameScope) -> _Fold:
    """A fold that, applied, inserts ``Mul(X, 1/s)`` before the group's layers and makes them read it."""

    def apply(s: np.ndarray) -> None:
        graph = layers[0].node.graph
        assert isinstance(graph, ir.Graph)
        base = activation.name or "activation"
        inverse = _weights.add_initializer(graph, names.fresh(f"{base}_smooth_inv"), (1.0 / s).astype(np.float32))
        mul = ir.node("Mul", [activation, inverse], name=names.fresh(f"{base}_smooth"))
        mul.outputs[0].name = names.fresh(f"{base}_smoothed")
        mul.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        mul.outputs[0].shape = ir.Shape(activation.shape) if activation.shape is not None else None
        graph.insert_before(layers[0].node, mul)
        for layer in layers:
            layer.node.replace_input_with(0, mul.outputs[0])

    return apply


def _ratio(error: float, signal: float) -> float:
    return math.sqrt(error / signal) if signal > 0 else 0.0


def _run_all(folds: list[_Fold]) -> _Fold:
    def apply(s: np.ndarray) -> None:
        for fold in folds:
            fold(s)

    return apply


def _layer_weight(layer: _Layer) -> np.ndarray:
    """The layer's current weight as float64 [K, N]."""
    array = _weights.constant_array(layer.node.inputs[1])  # type: ignore[arg-type]
    assert array is not None
    w = np.asarray(array, dtype=np.float64)
    return w.T if layer.transposed else w


def _set_layer_weight(layer: _Layer, w: np.ndarray, names: _weights.NameScope) -> None:
    """Store ``w`` [K, N] as the layer's weight, in its own orientation."""
    stored = (w.T if layer.transposed else w).astype(np.float32)
    _replace_constant(layer.node, 1, stored, names)


def _replace_constant(node: ir.Node, index: int, array: np.ndarray, names: _weights.NameScope) -> None:
    """Make ``node``'s input ``index`` hold ``array``: in place when nothing else reads the old constant."""
    value = node.inputs[index]
    assert value is not None
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    alone = all(use.node is node and use.idx == index for use in value.uses())
    same_shape = value.shape is not None and tuple(value.shape) == array.shape
    if alone and same_shape and value.is_initializer() and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
        return
    replacement = _weights.add_initializer(graph, names.fresh(f"{value.name or 'constant'}_smoothed"), array)
    node.replace_input_with(index, replacement)
    _weights.remove_if_unused(value)


def _last_axis_vector(value: ir.Value, channels: int) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only (shape [C], [1, ..., C], or a single value)."""
    array = _weights.constant_array(value)
    if array is None or array.dtype != np.float32:
        return None
    if array.size == 1 or (array.shape[-1] == channels and array.size == channels):
        return array
    return None


def _scaled(array: np.ndarray, s: np.ndarray, channels: int) -> np.ndarray:
    """``array / s`` along the last axis, widened from a single value to [C] when needed."""
    if array.size == 1:
        return (np.full(channels, array.reshape(()), dtype=np.float64) / s).astype(np.float32)
    return (array.astype(np.float64) / s.reshape(array.shape)).astype(np.float32)


def _fold_steps(value: ir.Value, channels: int, depth: int, names: _weights.NameScope) -> list[_Fold] | str:
    """Constant changes that divide ``value`` by s along its last axis, or why there are none."""
    if depth > _MAX_FOLD_DEPTH:
        return "no producer within reach absorbs the scale"
    if depth and (len(value.uses()) != 1 or value.is_graph_output()):
        return f"intermediate {value.name!r} is read elsewhere"
    producer = value.producer()
    if producer is None:
        return f"{value.name!r} is a graph input"
    op = producer.op_type
    inputs = list(producer.inputs)

    def constant_fold(index: int) -> _Fold:
        def fold(s: np.ndarray) -> None:
            # Read when applied: an earlier group may have replaced this constant since the plan was made.
            array = _weights.constant_array(producer.inputs[index])  # type: ignore[arg-type]
            assert array is not None
            _replace_constant(producer, index, _scaled(array, s, channels), names)

        return fold

    if op in _NORMS and producer.outputs[0] is value:
        scale_index, bias_index = _NORMS[op]
        if producer.domain not in ("", "ai.onnx", "com.microsoft"):
            return f"{op} of domain {producer.domain!r} is not handled"
        if op == "LayerNormalization" and producer.attributes.get_int("axis", -1) not in (-1, _rank(value) - 1):
            return "LayerNormalization does not normalise the last axis"
        folds = []
        for index in (scale_index, bias_index):
            if index is None or index >= len(inputs) or inputs[index] is None:
                continue
            if _last_axis_vector(inputs[index], channels) is None:  # type: ignore[arg-type]
                return f"{op} {producer.name!r} has a non-constant scale or bias"
            folds.append(constant_fold(index))
        return folds
    if producer.domain not in ("", "ai.onnx"):
        return f"producer {op} {producer.name!r} cannot absorb the scale"
    if op in ("Mul", "Add") and len(inputs) == 2:
        constant = [i for i, v in enumerate(inputs) if v is not None and _weights.constant_tensor(v) is not None]
        if len(constant) == 1:
            index = constant[0]
            if _last_axis_vector(inputs[index], channels) is None or not _last_dim(value, channels):  # type: ignore[arg-type]
                return f"{op} {producer.name!r} has a constant that is not a per-channel vector"
            if op == "Mul":
                return [constant_fold(index)]
            upstream = _fold_steps(inputs[1 - index], channels, depth + 1, names)  # type: ignore[arg-type]
            return [constant_fold(index), *upstream] if isinstance(upstream, list) else upstream
        if op == "Mul" and not constant:
            reasons = []
            for operand in (inputs[1], inputs[0]):
                if operand is None or not _last_dim(operand, channels):
                    reasons.append(f"{operand.name if operand else '?'!r} may broadcast")
                    continue
                steps = _fold_steps(operand, channels, depth + 1, names)
                if isinstance(steps, list):
                    return steps
                reasons.append(steps)
            return "; ".join(reasons)
    if op in ("MatMul", "Gemm") and len(inputs) >= 2 and inputs[1] is not None:
        transposed = op == "Gemm" and producer.attributes.get_int("transB", 0)
        if op == "Gemm" and (
            producer.attributes.get_float("alpha", 1.0) != 1.0 or producer.attributes.get_float("beta", 1.0) != 1.0
        ):
            return f"Gemm {producer.name!r} has alpha or beta other than 1"
        weight = _weights.constant_array(inputs[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return f"{op} {producer.name!r} has no 2-D float32 constant weight"

        def fold_weight(s: np.ndarray) -> None:
            array = _weights.constant_array(producer.inputs[1])  # type: ignore[arg-type]
            assert array is not None
            divisor = s[:, None] if transposed else s[None, :]
            _replace_constant(producer, 1, (array.astype(np.float64) / divisor).astype(np.float32), names)

        folds: list[_Fold] = [fold_weight]
        if op == "Gemm" and len(inputs) > 2 and inputs[2] is not None:
            if _last_axis_vector(inputs[2], channels) is None:
                return f"Gemm {producer.name!r} has a bias that is not a per-channel vector"
            folds.append(constant_fold(2))
        return folds
    return f"producer {op} {producer.name!r} cannot absorb the scale"


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else -1


def _last_dim(value: ir.Value, channels: int) -> bool:
    """Whether ``value``'s last axis is known to have size ``channels`` (so it does not broadcast)."""
    return value.shape is not None and len(value.shape) > 0 and value.shape[-1] == channels
