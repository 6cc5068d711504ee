"""Static 8-bit quantization (W8A8): QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into int8 kernels.

Math. Each quantized layer ``Y = op(X, W[, b])`` (MatMul, Gemm, Conv) computes with

    X' = (clip(round(X / s_x) + z_x, qmin, qmax) - z_x) * s_x       per tensor, s_x and z_x from calibration
    W' = round(W / s_c) * s_c                                      per output channel c, s_c = max|W_c| / 127
    b' = round(b / (s_x * s_c)) * s_x * s_c                         int32, as the integer kernels need

(grids in :mod:`kiln.passes.quantize.int8`). Activation ranges come from the calibration set by ``method``:
``minmax``, ``percentile``, ``entropy`` or ``mse`` (:mod:`kiln.passes.quantize.ranges`), from statistics streamed
batch by batch, never from stored activations. Activations are uint8 asymmetric (default) or int8 symmetric.

Weight rounding. ``rounding="gptq"`` keeps every scale ``s_c`` but picks the codes with GPTQ
(:func:`kiln.passes.quantize.int8.gptq_codes`) on the Hessian ``H = E[p^T p]`` of the rows ``p`` the weight
multiplies: rows of a MatMul/Gemm input, im2col patches of a Conv input per group (padding included,
:mod:`kiln.passes.quantize.patches`). The layer's output error on the calibration data, ``tr(D^T H D)`` with
``D = W - W'``, is what it minimizes; ``details`` reports it as ``output_rel_error`` next to round-to-nearest's
``output_rel_error_nearest``. GPTQ's greedy order can lose to plain rounding on an output channel (on small
layers, mostly): such a channel keeps the nearest codes (``channels_kept_nearest``), so every channel's error on
the calibration data is at most round-to-nearest's. ``bias_correction`` then folds the remaining mean error into
the bias, ``b' = b + E[p] D``, so the layer's mean output on the calibration data is the float one (a Conv without
a bias gets one). Both matter where a filter's weights nearly cancel on smooth inputs: EfficientNet-Lite0's
first depthwise filters (edge detectors, weights up to 18, summing to about 0) turn independent rounding errors
into an offset of the whole feature map; on its photos these two options halve the logit error of W8A8.
``output_correction`` goes further, on the quantized model itself, layer by layer in graph order: each output
channel's mean (and scale) is fitted to the float model's on the calibration data, which also corrects what
activation quantization shifts (:mod:`kiln.passes.quantize.output_correction`).

Graph change. For an activation tensor ``X`` read by quantized layers::

    X -> QuantizeLinear(s_x, z_x) -> DequantizeLinear(s_x, z_x) -> X'      (one pair per tensor, shared by
                                                                             every quantized layer reading X)
    Y = MatMul(X, W)       ->  Y = MatMul(X', DequantizeLinear(Wq, s, z, axis=1))
    Y = Gemm(X, W, b)      ->  Y = Gemm(X', DequantizeLinear(Wq, axis=0 if transB else 1), DequantizeLinear(bq))
    Y = Conv(X, W, b)      ->  Y = Conv(X', DequantizeLinear(Wq, axis=0), DequantizeLinear(bq)), and Y itself,
                               or the output of a Relu/Clip that is Y's only reader, gets a pair too

ONNX Runtime (``ORT_ENABLE_EXTENDED`` and above) then runs ``DQ -> MatMul`` as ``MatMulIntegerToFloat``,
``DQ -> Gemm`` as ``QGemm`` (float output) and ``DQ -> Conv [-> Relu/Clip] -> Q`` as ``QLinearConv``: a Conv only
fuses with a QuantizeLinear on its output, and ORT drops a Relu/Clip whose work the uint8 clip already does
(zero point 0). MatMul and Gemm outputs stay float, which saves a rounding step. A MatMul on a 2-D input whose
output only feeds an ``Add`` of a constant vector [N] becomes a Gemm in ORT (``MatMulAddFusion``), and QGemm
needs an int32 bias, so that vector is stored as int32 codes too: ``Add(Y, DequantizeLinear(bq))``. Only the
first input of a layer is treated as the activation; a MatMul whose second input is not a constant (attention
scores) stays float.
Unnamed quantized nodes are given names, which ORT keeps on the fused nodes: ``check_fusion`` lets ORT optimize
the result and records which layers run on integer kernels (``details["ort_fusion"]``).

Kept float: op types not in ``op_types`` (LayerNormalization, Softmax and everything else are never
quantized), nodes named in ``exclude``, the first and last quantizable layers with ``exclude_first_last``, and
layers whose weight is not a float32 constant, whose activation is not float32, Gemms with ``transA``,
``alpha != 1`` or ``beta != 1``, biases that are not constant vectors, subgraph nodes (calibration sees only
the main graph), with ``max_layer_error``, MatMul/Gemm layers whose estimated output error exceeds it, and with
``max_model_error``, layers whose quantization alone moves the model's outputs by more than that (measured by
:mod:`kiln.passes.quantize.sensitivity`: a convolution computing an STFT of raw audio is the case it is for), and
with ``max_error_share``, layers whose error so measured is more than that share of the sum over all layers.
Reasons are in ``details["skipped"]``. Per layer, ``details`` records the activation range, scale and zero
point, the weight's relative error and, for MatMul/Gemm, the estimated relative output error from calibration
statistics (:func:`kiln.passes.quantize.int8.estimated_error`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, ChannelMeanSquare, Reducer
from kiln.compiler.registry import register
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.quantize import int8, ort_fusion, output_correction, ranges, sensitivity
from kiln.passes.quantize.patches import ConvGeometry, InputMoments

_OP_TYPES = ("MatMul", "Gemm", "Conv")
#: Activations a uint8 QuantizeLinear after a Conv can absorb (ONNX Runtime removes them before fusing).
_CLIPPING_ACTIVATIONS = ("Relu", "Clip")
_QDQ_TYPES = {np.uint8: ir.DataType.UINT8, np.int8: ir.DataType.INT8}


@dataclasses.dataclass
class StaticInt8Options:
    """Options of ``quantize.static-int8``.

    * ``method``: activation ranges by "minmax", "percentile", "entropy" (KL divergence, TensorRT-style) or "mse"
      (least expected squared quantization error of each tensor).
    * ``percentile``: share of values (in %) the range keeps, for ``method="percentile"``.
    * ``bins``: histogram bins for "percentile", "entropy" and "mse".
    * ``activation_type``: "uint8" (asymmetric) or "int8" (symmetric) activations.
    * ``weight_type``: storage of the symmetric per-channel weight codes: "uint8" (zero point 128) runs exactly
      on every x86 CPU; "int8" saturates in ONNX Runtime's kernels on CPUs without VNNI.
    * ``op_types``: which of MatMul, Gemm and Conv to quantize.
    * ``exclude``: node names to keep float (an unnamed node is named ``"OpType:output_name"``, as in details).
    * ``exclude_first_last``: keep the first and the last quantizable layer float.
    * ``quantize_model_inputs``: False keeps float every layer that reads a graph input directly. Pixels of 8-bit
      images normalized as ``2g/255 - 1`` lie half a step off every 8-bit grid with an integer zero point, so
      quantizing that input alone costs EfficientNet-Lite0 a relative logit error of 0.012 (98.4% top-1 agreement
      by itself); the first convolution is a small share of the work.
    * ``max_layer_error``: keep a MatMul/Gemm float when its estimated relative output error exceeds this (None:
      quantize whatever the estimate), a cheap mixed precision for the few layers that dominate the loss.
    * ``check_fusion``: ask ONNX Runtime which layers it fuses into integer kernels (costs one session build).
    * ``rounding``: "nearest" rounds each weight to its grid; "gptq" chooses grid points that minimize the layer's
      output error on the calibration data (same scales, same storage; module docstring).
    * ``bias_correction``: remove each layer's mean output error on the calibration data through its bias (a Conv
      without one gets one).
    * ``damp``: GPTQ's damping, a share of the Hessian's mean diagonal.
    * ``max_model_error``: keep float every layer whose quantization alone (its weight, its input and output
      activations) changes the model's outputs by more than this relative error on ``sensitivity_batches``
      calibration batches (:mod:`kiln.passes.quantize.sensitivity`); None: no such check.
    * ``max_error_share``: keep float every layer whose error so measured is more than this share of the sum over
      all layers: one layer that does much of the damage (EfficientNet-Lite0's first depthwise convolution, 13% of
      the sum over 49 layers, twice the next) costs little speed to keep float; None: no such check.
    * ``output_correction``: after the rewrite, match each layer's output channels to the float model's on the
      calibration data, layer by layer in graph order: "bias" their means, "affine" their means and scales
      (:mod:`kiln.passes.quantize.output_correction`); "none" leaves them.
    * ``correction_batches``: calibration batches the output correction walks (None: all); its memory holds the
      tensors crossing each cut for every batch, twice (the float model's and the quantized one's).
    """

    method: ranges.Method = "minmax"
    percentile: float = 99.99
    bins: int = 2048
    activation_type: int8.ActivationType = "uint8"
    weight_type: int8.WeightType = "uint8"
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(_OP_TYPES))
    exclude: list[str] = dataclasses.field(default_factory=list)
    exclude_first_last: bool = False
    quantize_model_inputs: bool = True
    max_layer_error: float | None = None
    check_fusion: bool = True
    rounding: Literal["nearest", "gptq"] = "nearest"
    bias_correction: bool = False
    damp: float = 0.01
    output_correction: output_correction.Mode = "none"
    max_model_error: float | None = None
    max_error_share: float | None = None
    sensitivity_batches: int = 2
    correction_batches: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "percentile", "entropy", "mse"):
            raise ValueError(f"method must be 'minmax', 'percentile', 'entropy' or 'mse', got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.bins < ranges.ENTROPY_LEVELS:
            raise ValueError(f"bins must be >= {ranges.ENTROPY_LEVELS}, got {self.bins}")
        if self.activation_type not in ("uint8", "int8"):
            raise ValueError(f"activation_type must be 'uint8' or 'int8', got {self.activation_type!r}")
        if self.weight_type not in ("uint8", "int8"):
            raise ValueError(f"weight_type must be 'uint8' or 'int8', got {self.weight_type!r}")
        unknown = sorted(set(self.op_types) - set(_OP_TYPES))
        if unknown:
            raise ValueError(f"op_types may contain only MatMul, Gemm and Conv, got {unknown}")
        if self.max_layer_error is not None and not self.max_layer_error > 0:
            raise ValueError(f"max_layer_error must be positive, got {self.max_layer_error}")
        if self.rounding not in ("nearest", "gptq"):
            raise ValueError(f"rounding must be 'nearest' or 'gptq', got {self.rounding!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.max_model_error is not None and not self.max_model_error > 0:
            raise ValueError(f"max_model_error must be positive, got {self.max_model_error}")
        if self.max_error_share is not None and not 0 < self.max_error_share < 1:
            raise ValueError(f"max_error_share must be in (0, 1), got {self.max_error_share}")
        if self.correction_batches is not None and self.correction_batches < 1:
            raise ValueError(f"correction_batches must be >= 1, got {self.correction_batches}")
        if self.sensitivity_batches < 1:
            raise ValueError(f"sensitivity_batches must be >= 1, got {self.sensitivity_batches}")
        if self.output_correction not in ("none", "bias", "affine"):
            raise ValueError(f"output_correction must be 'none', 'bias' or 'affine', got {self.output_correction!r}")


@dataclasses.dataclass
class _Site:
    """A layer to quantize."""

    label: str
    node: ir.Node
    activation: ir.Value
    weight: ir.Value
    #: Output-channel axis of the stored weight.
    axis: int
    bias: ir.Value | None
    #: Where the bias is read: input 2 of a Gemm/Conv, or the Add after a 2-D MatMul.
    bias_use: tuple[ir.Node, int] | None = None
    #: Conv: the tensor after the layer that gets a QuantizeLinear (so ORT can fuse QLinearConv).
    output: ir.Value | None = None

    @property
    def is_linear(self) -> bool:
        return self.node.op_type in ("MatMul", "Gemm")


@register("quantize.static-int8")
class StaticInt8(KilnPass):
    """Static W8A8: calibrated QuantizeLinear/DequantizeLinear around MatMul, Gemm and Conv, fused by ONNX Runtime."""

    Options = StaticInt8Options
    needs_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        calibration = self.context.calibration
        assert calibration is not None  # checked in requires()
        calibration.validate(model)
        self.details = {
            "method": opts.method,
            "activation_type": opts.activation_type,
            "weight_type": opts.weight_type,
            "layers": {},
            "activations": {},
            "skipped": {},
        }
        sites = self._find_sites(model)
        if not sites:
            return ir.passes.PassResult(model, modified=False)
        converted = int8.ensure_opset(model)
        if converted:
            self.details["opset"] = converted
            sites = self._find_sites(model)

        tensors = list(dict.fromkeys(v.name for s in sites for v in (s.activation, s.output) if v is not None))
        mean_squares = {s.activation.name: ChannelMeanSquare() for s in sites if s.is_linear}
        extra: dict[str, list[Reducer]] = {name: [stat] for name, stat in mean_squares.items()}
        self._moments = self._input_moments(sites, extra)
        self._shifts: dict[str, np.ndarray] = {}
        found = ranges.collect_ranges(
            calibration,
            model,
            tensors,
            method=opts.method,
            percentile=opts.percentile,
            bins=opts.bins,
            symmetric=opts.activation_type == "int8",
            extra=extra,
        )
        grids = {name: int8.activation_grid(*found[name], opts.activation_type) for name in tensors}
        quantized: dict[tuple[ir.Value, int], int8.QuantizedWeight] = {}
        sites = self._select(sites, grids, quantized, mean_squares)
        if (opts.max_model_error is not None or opts.max_error_share is not None) and sites:
            sites = self._keep_sensitive_float(model, sites, grids, quantized)
        for name in tensors:
            if any(name in (s.activation.name, _name(s.output)) for s in sites):
                grid = grids[name]
                self.details["activations"][name] = {
                    "range": list(found[name]),
                    "scale": grid.scale,
                    "zero_point": grid.zero_point,
                }
        if not sites:
            return ir.passes.PassResult(model, modified=bool(converted))
        reference = None
        if opts.output_correction != "none":
            reference = model.clone()
            for site in sites:  # a Conv without a bias gets one to carry its correction
                if site.node.op_type == "Conv" and site.bias is None:
                    channels = quantized[(site.weight, site.axis)].scales.size
                    self._shifts.setdefault(site.label, np.zeros(channels, np.float32))
        self._bias_nodes: dict[str, ir.Node] = {}
        self._rewrite(model, sites, grids, quantized)
        if reference is not None:
            self._correct_outputs(model, reference, sites, grids)
        if opts.check_fusion:
            report = ort_fusion.fusion_report(model, [site.node.name for site in sites])
            self.details["ort_fusion"] = report.to_dict()
            fused = set(report.fused)
            for site in sites:
                self.details["layers"][site.label]["fused"] = site.node.name in fused
        return ir.passes.PassResult(model, modified=True)

    def _input_moments(self, sites: list[_Site], extra: dict[str, list[Reducer]]) -> dict[str, InputMoments]:
        """Per layer label, the input statistics GPTQ rounding and bias correction need (one per distinct input)."""
        if self.options.rounding == "nearest" and not self.options.bias_correction:
            return {}
        shared: dict[tuple[str, ConvGeometry | None], InputMoments] = {}
        moments = {}
        for site in sites:
            geometry = None
            if site.node.op_type == "Conv":
                found = ConvGeometry.of(site.node, tuple(site.weight.shape.numpy()))  # type: ignore[union-attr]
                if isinstance(found, str):
                    without = self.details.setdefault("layers_without_statistics", {})
                    without[site.label] = f"rounded to nearest, no bias correction: {found}"
                    continue
                geometry = found
            key = (site.activation.name, geometry)
            if key not in shared:
                shared[key] = InputMoments(geometry)
                extra.setdefault(site.activation.name, []).append(shared[key])
            moments[site.label] = shared[key]
        return moments

    def _select(
        self,
        sites: list[_Site],
        grids: dict[str, int8.ActivationGrid],
        quantized: dict[tuple[ir.Value, int], int8.QuantizedWeight],
        mean_squares: dict[str, ChannelMeanSquare],
    ) -> list[_Site]:
        """Quantize every weight, record each layer's errors, and drop layers above ``max_layer_error``."""
        floors = _bias_floors(sites, grids)
        kept = []
        for site in sites:
            layer = self._measure(site, grids[site.activation.name], quantized, floors, mean_squares)
            estimate = layer.get("est_output_rel_error", 0.0)
            limit = self.options.max_layer_error
            if limit is not None and estimate > limit:
                self.details["skipped"][site.label] = f"estimated output error {estimate:.4f} > max_layer_error"
            else:
                self.details["layers"][site.label] = layer
                kept.append(site)
        return kept

    def _keep_sensitive_float(
        self,
        model: ir.Model,
        sites: list[_Site],
        grids: dict[str, int8.ActivationGrid],
        quantized: dict[tuple[ir.Value, int], int8.QuantizedWeight],
    ) -> list[_Site]:
        """Measure each layer's effect on the model's outputs alone; drop those above ``max_model_error`` or above
        ``max_error_share`` of the sum over all layers."""
        limit, share = self.options.max_model_error, self.options.max_error_share
        assert self.context.calibration is not None
        feeds = list(itertools.islice(self.context.calibration, self.options.sensitivity_batches))
        probes = [
            sensitivity.Probe(
                site.label,
                site.node,
                site.activation,
                grids[site.activation.name],
                site.weight,
                quantized[(site.weight, site.axis)],
                site.output,
                None if site.output is None else grids[site.output.name],
            )
            for site in sites
        ]
        errors = sensitivity.model_errors(model, probes, feeds)
        total = sum(errors.values())
        kept = []
        for site in sites:
            error = errors[site.label]
            if limit is not None and error > limit:
                bound = " > max_model_error"
            elif share is not None and error > share * total:
                bound = f", {error / total:.1%} of the sum over all {len(sites)} layers > max_error_share"
            else:
                self.details["layers"][site.label]["model_error"] = error
                kept.append(site)
                continue
            del self.details["layers"][site.label]
            self.details["skipped"][site.label] = (
                f"quantized alone, it changes the model's outputs by {error:.3g} (relative){bound}"
            )
        return kept

    def _rewrite(
        self,
        model: ir.Model,
        sites: list[_Site],
        grids: dict[str, int8.ActivationGrid],
        quantized: dict[tuple[ir.Value, int], int8.QuantizedWeight],
    ) -> None:
        """Insert the activation QDQ pairs, swap weights and biases for their DequantizeLinear, drop float copies."""
        names = _weights.NameScope(model)
        for site in sites:
            if not site.node.name:
                site.node.name = names.fresh(site.label.replace(":", "_"))
        tensors = list(dict.fromkeys(v.name for s in sites for v in (s.activation, s.output) if v is not None))
        dequantized = {name: self._insert_qdq(model.graph, name, sites, grids[name], names) for name in tensors}
        weights: dict[tuple[ir.Value, int], ir.Value] = {}
        for site in sites:
            site.node.replace_input_with(0, dequantized[site.activation.name])
            self._quantize_layer(site, grids[site.activation.name], quantized, weights, names)
        for value in {site.weight for site in sites} | {site.bias for site in sites if site.bias is not None}:
            _weights.remove_if_unused(value)

    # -- finding what to quantize ------------------------------------------------------------------------------

    def _find_sites(self, model: ir.Model) -> list[_Site]:
        skipped: dict[str, str] = {}
        self.details["skipped"] = skipped
        sites = []
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.options.op_types:
                continue
            label = node.name or f"{node.op_type}:{node.outputs[0].name}"
            site = self._inspect(node, label)
            if isinstance(site, str):
                skipped[label] = site
            else:
                sites.append(site)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.graph is not model.graph and node.op_type in self.options.op_types:
                skipped[node.name or f"{node.op_type}:{node.outputs[0].name}"] = "in a subgraph (not calibrated)"
        if self.options.exclude_first_last and sites:
            for site in {sites[0].label: sites[0], sites[-1].label: sites[-1]}.values():
                skipped[site.label] = "first or last quantizable layer (exclude_first_last)"
            sites = sites[1:-1]
        return sites

    def _inspect(self, node: ir.Node, label: str) -> _Site | str:
        """The site for ``node``, or why it stays float."""
        if label in self.options.exclude:
            return "excluded by option 'exclude'"
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        activation, weight, bias = inputs[:3]
        if activation is None or weight is None:
            return "node lacks an input"
        if not self.options.quantize_model_inputs and activation.is_graph_input():
            return f"reads the model input {activation.name!r} (quantize_model_inputs=false)"
        if _weights.constant_tensor(activation) is not None:
            return "first input is a constant"
        if activation.dtype not in (None, ir.DataType.FLOAT):
            return f"activation {activation.name!r} is not float32"
        producer = activation.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return f"activation {activation.name!r} is already dequantized"
        tensor = _weights.constant_tensor(weight)
        if tensor is None:
            return f"second input {weight.name!r} is not a constant"
        if weight.is_graph_input():
            return f"weight {weight.name!r} is a graph input (it can be overridden at run time)"
        if tensor.dtype != ir.DataType.FLOAT:
            return f"weight {weight.name!r} has dtype {tensor.dtype.name}: only float32 is quantized"
        shape = tuple(tensor.shape.numpy())
        if node.op_type == "MatMul":
            if len(shape) != 2:
                return f"weight {weight.name!r} has shape {list(shape)}: only 2-D MatMul weights are quantized"
            bias, bias_use = _matmul_bias(node, activation, shape[1])
            return _Site(label, node, activation, weight, axis=1, bias=bias, bias_use=bias_use)
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0):
                return "Gemm with transA=1 is not handled"
            if attrs.get_float("alpha", 1.0) != 1.0 or (bias is not None and attrs.get_float("beta", 1.0) != 1.0):
                return "Gemm with alpha or beta other than 1 is not handled"
            axis = 0 if attrs.get_int("transB", 0) else 1
            reason = _check_bias(bias, shape[axis])
            if reason:
                return reason
            return _Site(label, node, activation, weight, axis, bias, None if bias is None else (node, 2))
        if len(shape) < 3:
            return f"Conv weight {weight.name!r} has shape {list(shape)}"
        reason = _check_bias(bias, shape[0])
        if reason:
            return reason
        bias_use = None if bias is None else (node, 2)
        return _Site(label, node, activation, weight, 0, bias, bias_use, output=_conv_output(node))

    # -- rewriting ---------------------------------------------------------------------------------------------

    def _insert_qdq(
        self, graph: ir.Graph, name: str, sites: list[_Site], grid: int8.ActivationGrid, names: _weights.NameScope
    ) -> ir.Value:
        """Insert QuantizeLinear -> DequantizeLinear after tensor ``name``; rewire readers; return the DQ output.

        A layer input is rewired by the caller, only for the quantized layers; a Conv output tensor is rewired for
        every reader, so ONNX Runtime sees the QuantizeLinear as the Conv's only consumer.
        """
        value = next(v for s in sites for v in (s.activation, s.output) if v is not None and v.name == name)
        scale = _weights.add_initializer(graph, names.fresh(f"{name}_scale"), grid.scale_array())
        zero_point = _weights.add_initializer(graph, names.fresh(f"{name}_zero_point"), grid.zero_point_array())
        quantize = ir.node("QuantizeLinear", [value, scale, zero_point], name=names.fresh(f"{name}_QuantizeLinear"))
        dequantize = ir.node(
            "DequantizeLinear", [quantize.outputs[0], scale, zero_point], name=names.fresh(f"{name}_DequantizeLinear")
        )
        _annotate(quantize.outputs[0], names.fresh(f"{name}_quantized"), _QDQ_TYPES[grid.dtype], value.shape)
        _annotate(dequantize.outputs[0], names.fresh(f"{name}_dequantized"), ir.DataType.FLOAT, value.shape)
        producer = value.producer()
        if producer is None:
            graph.insert_before(graph[0], [quantize, dequantize])
        else:
            graph.insert_after(producer, [quantize, dequantize])
        if any(site.output is value for site in sites):
            for use in list(value.uses()):
                if use.node is not quantize:
                    use.node.replace_input_with(use.idx, dequantize.outputs[0])
        return dequantize.outputs[0]

    def _measure(
        self,
        site: _Site,
        grid: int8.ActivationGrid,
        quantized: dict[tuple[ir.Value, int], int8.QuantizedWeight],
        floors: dict[tuple[ir.Value, int], np.ndarray],
        mean_squares: dict[str, ChannelMeanSquare],
    ) -> dict[str, Any]:
        """Quantize the layer's weight (once per weight, kept in ``quantized``) and estimate the layer's errors."""
        layer: dict[str, Any] = {"op": site.node.op_type, "input": site.activation.name, "weight": site.weight.name}
        tensor = _weights.constant_tensor(site.weight)
        assert tensor is not None  # checked in _inspect
        array = tensor.numpy()
        key = (site.weight, site.axis)
        moments = self._moments.get(site.label)
        hessian = None if moments is None else moments.hessian
        if key not in quantized:
            if hessian is not None and self.options.rounding == "gptq":
                quantized[key], kept_nearest = self._gptq_weight(array, site, hessian, floors.get(key))
                layer["channels_kept_nearest"] = kept_nearest
            else:
                quantized[key] = int8.quantize_weight(array, site.axis, self.options.weight_type, floors.get(key))
        raised = int((floors[key] > quantized[key].scales * (1 - 1e-6)).sum()) if key in floors else 0
        if raised:
            layer["scales_raised_for_bias"] = raised
        restored = quantized[key].dequantize()
        layer["weight_rel_error"] = int8.relative_error(array, restored)
        if moments is not None and hessian is not None:
            layer.update(self._calibrated_errors(array, quantized[key], site, hessian, moments))
        if site.is_linear:
            transposed = site.axis == 0
            error, signal = int8.estimated_error(
                mean_squares[site.activation.name].value,
                array.T if transposed else array,
                restored.T if transposed else restored,
                grid.scale,
            )
            layer["est_output_rel_error"] = math.sqrt(error / signal) if signal > 0 else 0.0
        if site.output is not None:
            layer["output"] = site.output.name
        del array, restored
        _weights.release(tensor)
        return layer

    def _gptq_weight(
        self, array: np.ndarray, site: _Site, hessian: np.ndarray, min_scales: np.ndarray | None
    ) -> tuple[int8.QuantizedWeight, int]:
        """The weight on round-to-nearest's scales, its grid points chosen by GPTQ on the layer's input Hessian, and
        how many output channels kept round-to-nearest's codes because GPTQ's were worse for them."""
        scales = int8.channel_scales(array, site.axis, min_scales)
        groups = hessian.shape[0]
        grouped = _to_groups(array, site, groups)
        steps = scales.reshape(groups, 1, -1)
        codes = int8.gptq_codes(grouped, hessian, steps[:, 0], damp=self.options.damp)
        nearest = _to_groups(int8.nearest_codes(array, scales, site.axis), site, groups)
        # each output channel's error is its own (GPTQ compensates along the input only): keep the better codes
        worse = _channel_errors(grouped, codes * steps, hessian) > _channel_errors(grouped, nearest * steps, hessian)
        codes = np.where(worse[:, None, :], nearest, codes)
        weight = int8.encode_weight(_from_groups(codes, site, array.shape), scales, site.axis, self.options.weight_type)
        return weight, int(worse.sum())

    def _calibrated_errors(
        self,
        array: np.ndarray,
        quantized: int8.QuantizedWeight,
        site: _Site,
        hessian: np.ndarray,
        moments: InputMoments,
    ) -> dict[str, Any]:
        """The layer's exact output error on the calibration data, and its bias correction when asked for."""
        groups = hessian.shape[0]
        w = _to_groups(array, site, groups).astype(np.float64)
        signal = float(np.einsum("gkn,gkn->", w, hessian @ w))

        def relative(restored: np.ndarray) -> tuple[float, np.ndarray]:
            d = w - _to_groups(restored, site, groups)
            error = float(np.einsum("gkn,gkn->", d, hessian @ d))
            return (math.sqrt(error / signal) if signal > 0 else 0.0), d

        found: dict[str, Any] = {}
        found["output_rel_error"], d = relative(quantized.dequantize())
        if self.options.rounding == "gptq":
            nearest = int8.nearest_codes(array, quantized.scales, site.axis)
            shape = [1] * array.ndim
            shape[site.axis] = -1
            found["output_rel_error_nearest"], _ = relative(nearest * quantized.scales.reshape(shape))
        if self.options.bias_correction:
            if site.bias_use is None and site.node.op_type != "Conv":
                found["bias_correction"] = "none: the layer has no constant bias to carry it"
            else:
                # E[p W + b] = E[p W' + b'] on the calibration data: b' = b + E[p] (W - W').
                shift = np.einsum("gk,gkn->gn", moments.mean, d).reshape(-1).astype(np.float32)
                self._shifts[site.label] = shift
                found["bias_correction_norm"] = float(np.linalg.norm(shift))
        return found

    def _quantize_layer(
        self,
        site: _Site,
        grid: int8.ActivationGrid,
        quantized: dict[tuple[ir.Value, int], int8.QuantizedWeight],
        weights: dict[tuple[ir.Value, int], ir.Value],
        names: _weights.NameScope,
    ) -> None:
        """Replace the layer's weight (and bias) by DequantizeLinear of their integer codes."""
        graph = site.node.graph
        assert isinstance(graph, ir.Graph)
        key = (site.weight, site.axis)
        weight = quantized[key]
        if key not in weights:
            dequantize = _dequantize_node(graph, site.weight.name or site.label, weight, names)
            dequantize.outputs[0].shape = ir.Shape(site.weight.shape) if site.weight.shape is not None else None
            graph.insert_before(site.node, dequantize)
            weights[key] = dequantize.outputs[0]
        site.node.replace_input_with(1, weights[key])

        shift = self._shifts.get(site.label)
        if site.bias is not None and site.bias_use is not None:
            bias = _weights.constant_array(site.bias)
            assert bias is not None  # checked in _inspect
            reader, index = site.bias_use
            base = f"{site.bias.name or site.label}_{site.node.name}"
            self.details["layers"][site.label]["bias"] = site.bias.name
        elif shift is not None:  # a Conv without bias: its correction becomes one
            bias = np.zeros_like(shift)
            site.node.resize_inputs(3)
            reader, index = site.node, 2
            base = f"{site.label}_bias"
        else:
            return
        if shift is not None:
            bias = bias + shift
        codes, scales = int8.quantize_bias(bias, grid.scale, weight.scales)
        bias_q = int8.QuantizedWeight(codes, scales, np.zeros(scales.shape, np.int32), axis=0)
        dequantize = _dequantize_node(graph, base, bias_q, names)
        dequantize.outputs[0].shape = ir.Shape(bias.shape)
        graph.insert_before(site.node, dequantize)
        reader.replace_input_with(index, dequantize.outputs[0])
        self._bias_nodes[site.label] = dequantize

    def _correct_outputs(
        self, model: ir.Model, reference: ir.Model, sites: list[_Site], grids: dict[str, int8.ActivationGrid]
    ) -> None:
        """Staged output correction of every layer with a bias (:mod:`kiln.passes.quantize.output_correction`)."""
        readers = collections.Counter(site.weight for site in sites)
        layers = []
        for site in sites:
            bias: ir.Node | ir.Value | None = self._bias_nodes.get(site.label)
            # the tensor with the bias added: the layer's output, or that of the Add after a MatMul
            output = site.node if site.bias_use is None or site.node.op_type != "MatMul" else site.bias_use[0]
            if bias is None and site.node.op_type == "MatMul":
                bias, output = _float_bias(site)
            if bias is None or output is None:
                self.details["layers"][site.label]["output_correction"] = "none: no constant bias to carry it"
                continue
            weight = site.node.inputs[1].producer()  # type: ignore[union-attr]
            assert weight is not None  # the weight's DequantizeLinear, made by _quantize_layer
            layers.append(
                output_correction.Layer(
                    label=site.label,
                    tensor=output.outputs[0].name,  # type: ignore[arg-type]
                    axis=1 if site.node.op_type == "Conv" else -1,
                    bias=bias,
                    weight=weight,
                    shared=readers[site.weight] > 1,
                    input_scale=grids[site.activation.name].scale,
                )
            )
        full = self.context.calibration
        assert full is not None
        calibration = full
        if self.options.correction_batches is not None:
            calibration = CalibrationData(lambda: iter(full), name=full.name, limit=self.options.correction_batches)
        found = output_correction.correct(calibration, model, reference, layers, self.options.output_correction)
        for label, entry in found.items():
            self.details["layers"][label]["output_correction"] = entry


def _bias_floors(sites: list[_Site], grids: dict[str, int8.ActivationGrid]) -> dict[tuple[ir.Value, int], np.ndarray]:
    """Per weight, the smallest channel scales that keep every bias added to its products within int32."""
    floors: dict[tuple[ir.Value, int], np.ndarray] = {}
    for site in sites:
        if site.bias is None or site.bias_use is None:
            continue
        bias = _weights.constant_array(site.bias)
        assert bias is not None  # checked in _inspect
        floor = int8.bias_scale_floor(bias, grids[site.activation.name].scale)
        key = (site.weight, site.axis)
        floors[key] = floor if key not in floors else np.maximum(floors[key], floor)
    return floors


def _name(value: ir.Value | None) -> str | None:
    return None if value is None else value.name


def _check_bias(bias: ir.Value | None, channels: int) -> str | None:
    """Why ``bias`` cannot be stored as int32 codes (it must be a constant float32 vector [channels])."""
    if bias is None:
        return None
    tensor = _weights.constant_tensor(bias)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT:
        return f"bias {bias.name!r} is not a float32 constant"
    if tuple(tensor.shape.numpy()) != (channels,):
        return f"bias {bias.name!r} has shape {list(tensor.shape.numpy())}, not [{channels}]"
    if bias.is_graph_input():
        return f"bias {bias.name!r} is a graph input"
    return None


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Value, tuple[ir.Node, int]] | None:
    """The constant float32 vector [N] added to ``node``'s output by its only reader, an Add, and where it is
    read."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    index = 1 - uses[0].idx
    bias = add.inputs[index]
    if bias is None or _check_bias(bias, n) is not None:
        return None
    return bias, (add, index)


def _matmul_bias(node: ir.Node, activation: ir.Value, n: int) -> tuple[ir.Value | None, tuple[ir.Node, int] | None]:
    """The bias of a 2-D MatMul (:func:`_bias_add`), which ONNX Runtime's QGemm takes as int32 codes."""
    found = _bias_add(node, n) if activation.shape is not None and len(activation.shape) == 2 else None
    return (None, None) if found is None else found


def _float_bias(site: _Site) -> tuple[ir.Value | None, ir.Node | None]:
    """A MatMul's float bias (:func:`_bias_add`; ONNX Runtime adds it in float after a 3-D MatMul) when it is an
    initializer only that Add reads, and that Add; (None, None) without one."""
    found = _bias_add(site.node, site.weight.shape[1]) if site.weight.shape is not None else None
    if found is None:
        return None, None
    bias, (add, _) = found
    if not bias.is_initializer() or len(list(bias.uses())) != 1:
        return None, None
    return bias, add


def _conv_output(node: ir.Node) -> ir.Value | None:
    """The tensor after a Conv that should carry a QuantizeLinear: its output, or that of a Relu/Clip reading only
    it; None when it is a graph output (its float value must stay observable)."""
    value = node.outputs[0]
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output():
        reader = uses[0].node
        if reader.op_type in _CLIPPING_ACTIVATIONS and reader.domain in ("", "ai.onnx"):
            bounds = [v for v in list(reader.inputs)[1:] if v is not None]
            if all(_weights.constant_tensor(v) is not None for v in bounds):
                value = reader.outputs[0]
    if value.is_graph_output() or value.dtype != ir.DataType.FLOAT:
        return None
    return value


def _annotate(value: ir.Value, name: str, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    value.name = name
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape) if shape is not None else None


def _dequantize_node(graph: ir.Graph, base: str, quantized: int8.QuantizedWeight, names: _weights.NameScope) -> ir.Node:
    """A DequantizeLinear of ``quantized``'s codes (new initializers in ``graph``), along its channel axis."""
    codes = _weights.add_initializer(graph, names.fresh(f"{base}_quantized"), quantized.codes)
    scales = _weights.add_initializer(graph, names.fresh(f"{base}_scale"), quantized.scales)
    zero_points = _weights.add_initializer(graph, names.fresh(f"{base}_zero_point"), quantized.zero_points)
    node = ir.node(
        "DequantizeLinear",
        [codes, scales, zero_points],
        attributes={"axis": quantized.axis},
        name=names.fresh(f"{base}_DequantizeLinear"),
    )
    node.outputs[0].name = names.fresh(f"{base}_dequantized")
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    return node


def _channel_errors(w: np.ndarray, restored: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Output error ``d^T H d`` [G, N] of each output channel of grouped weights [G, K, N]."""
    d = (w - restored).astype(np.float64)
    return np.einsum("gkn,gkn->gn", d, hessian @ d)


def _to_groups(array: np.ndarray, site: _Site, groups: int) -> np.ndarray:
    """The weight as the matrices its input rows multiply: [G, K, N] (:mod:`kiln.passes.quantize.patches`)."""
    if site.node.op_type != "Conv":
        return (array.T if site.axis == 0 else array)[None]
    per_group = array.shape[0] // groups
    return array.reshape(groups, per_group, -1).transpose(0, 2, 1)


def _from_groups(grouped: np.ndarray, site: _Site, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_to_groups`."""
    if site.node.op_type != "Conv":
        return grouped[0].T if site.axis == 0 else grouped[0]
    return grouped.transpose(0, 2, 1).reshape(shape)
