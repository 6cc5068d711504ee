"""``shiftadd.bcq``: MatMul/Gemm weights as binary planes with shift-add scales (ShiftAddLLM-style).

Math. Each constant weight ``W`` [K, N] becomes ``W' = sum_{i < q} S_i * B_i`` with sign planes ``B_i`` in
{-1, +1} and scales per (group of ``group_size`` rows of K, column, plane), fitted against the Gram of the layer's
input on the calibration data with GPTQ-style error compensation (:mod:`kiln.passes.shiftadd.fit`). A scale is a
power of two ``2^e`` or, with ``mantissa_bits = t``, ``2^e (1 + f / 2^t)``, one int8 code either way. A product
with ``W'`` needs no multiplication: adds and subtracts of activations per plane, then a shift (and with ``t > 0``
at most ``t`` more shift-adds per plane and group, as ShiftAddLLM's own code scales by sums of three powers of two).

Bits per layer. With ``average_bits`` set, each calibrated weight gets one of ``candidate_bits`` planes, chosen to
minimize the summed sensitivity under ``sum_W n_W q_W <= average_bits * sum_W n_W`` with
:func:`kiln.passes.quantize.mixed.allocate` (an exact knapsack). Sensitivity is measured as in ``quantize.mixed``:
each layer's centered output error ``r(W, q) = tr(D^T C D) / tr(W^T C W)`` at each candidate (``C`` the input's
covariance); with ``sensitivity="model"`` it is scaled by the model's own output error with only that layer at the
lowest candidate (one ONNX Runtime run per weight on ``sensitivity_batches`` batches).

Graph changes, for each eligible node (found as ``quantize.rtn`` finds them; ``Y`` keeps its name and consumers)::

    Y = MatMul(A, W)           ->  Y = ai.kiln.ShiftAddMatMul(A, planes, exponents)
    Y = Gemm(A, W, C)          ->  Y = Add(ai.kiln.ShiftAddMatMul(A, planes, exponents), C)

with the op's ONNX-function form (:mod:`kiln.runtime_ops.shiftadd`) added to the model's functions and the
``ai.kiln`` opset imported, so ONNX Runtime runs the result unchanged. Matmuls inside If/Loop/Scan bodies have no
calibration statistics and are skipped, with the reason in ``details["skipped"]``. A tied embedding table stays
float for its Gather, as in ``quantize.rtn``.

Stages (``stages``, as in ``quantize.gptq``): the weights of a stage's layers compute with their fitted values
while the next stage's statistics are collected (the model's own weights are restored before the rewrite), so later
layers are fitted to the inputs the shift-add model feeds them.

Sequential (``sequential``, as in ``quantize.gptq``): instead of stages, every layer group in graph order, each from
the inputs ``x̂`` the fitted groups before it give (:mod:`kiln.compiler.sequential`), fitted to the refit target
``W* = (G + λ I)^-1 (C W + λ W)`` with ``G = E[x̂^T x̂]``, ``C = E[x̂^T x]``: the error that counts is against the
float model's outputs, so each layer absorbs part of what the layers before it lost. Measured at 3 planes with 32
calibration windows (``tools/calibration_size.py``): 36.56, against 39.64 with 16 stages; with 8 windows 45.70
against 42.56 (the refit wants many times more rows than the widest layer input has channels, 1536: 4096 rows
are too few). At 2 planes with 32 windows: 69.9 against 106.6.

Measured (``tools/shiftadd_perplexity.py``: SmolLM2-135M, 8 calibration and 16 evaluation windows of 512 tokens;
the LM head stays float, as the exported graph computes its weight with a Transpose at run time): perplexity 43.39
at 3 planes in groups of 128 (44.33 without the refit, 49.41 without act-order, 42.34 in groups of 64 without the
refit) and 289.8 at 2 planes, where the float model scores 24.22 and kiln's GPTQ (groups of 128, one stage) 35.65
at 3 bits and 175.3 at 2; the refit doubles the fitting time (105 -> 189 s at 3 planes). With 16 stages: 42.56 at
3 planes and 125.3 at 2 (231 and 195 s).
Power-of-two scales cost more than binary coding gains on this model (see :mod:`kiln.passes.shiftadd.fit`); a
3-bit mantissa wins most of it back at the same bytes. Sequential, 32 calibration windows
(``tools/calibration_size.py``): 3 planes 36.56 (t = 0), 31.33 (t = 2), 30.86 (t = 3), 31.63 (t = 4); 2 planes 69.9
(t = 0) and 55.95 (t = 3); with rows priced by their cost after compensation (:mod:`kiln.passes.shiftadd.fit`)
3 planes 30.07, 2 planes 56.26. kiln's GPTQ at 3 bits reaches 29.91 on the same protocol (30.33 before its
act-order clip search got the same pricing; 29.47 with damping 0.03, which costs shift-add: 30.41), and stays ahead
on two more disjoint calibration sets (30.39 / 30.56, 29.91 / 30.41), although shift-add's per-layer output error
is lower on 198 of its 210 layers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import ChannelMean
from kiln.compiler.registry import register
from kiln.compiler.sequential import Sequential, refit_error, refit_target, walk_order
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.quantize.gptq import Group, MemberKey, Statistics, damping, load_weight, quadratic, split_stages
from kiln.passes.quantize.mixed import _ModelProbe, _scale_to_model, allocate
from kiln.passes.quantize.rtn import RTNOptions, WeightOnlyRTN, WeightSite
from kiln.passes.quantize.value_gram import value_grams
from kiln.passes.shiftadd.fit import BCQWeight, bcq_gptq
from kiln.runtime_ops import shiftadd


@dataclasses.dataclass
class BCQOptions:
    """Options of ``shiftadd.bcq``.

    * ``bits``: sign planes per weight, 1..4 (every layer, unless ``average_bits`` is set).
    * ``group_size``: rows of K sharing one exponent per plane and column.
    * ``mantissa_bits``: fraction bits of each scale (the op's attribute): 0 keeps powers of two, ``t`` gives scales
      ``2^e (1 + f / 2^t)``, a multiply of at most ``t`` more shifts and adds, in the same int8 per scale.
    * ``average_bits``: if set, planes per layer are allocated under this average (module docstring).
    * ``candidate_bits``: plane counts a layer may get when allocating.
    * ``sensitivity``, ``sensitivity_batches``: how layers are scored for allocation ("model" or "layer").
    * ``iterations``: alternating sign/scale rounds per group.
    * ``compensate``: GPTQ-style error compensation across rows; ``damp``: its Hessian damping.
    * ``act_order``: compensate rows by decreasing activation energy, with group exponents fitted beforehand.
    * ``refits``: with ``act_order``, further sweeps that refit the exponents on the rows as compensated.
    * ``stages``: collect statistics in this many stages, each on the model with the earlier stages' weights
      already fitted, as ``quantize.gptq``'s ``stages`` (not with ``average_bits``, which scores every layer first).
    * ``sequential``: fit every layer group in graph order toward the float model's outputs (module docstring).
    * ``value_hessian``: "attention" fits a value projection one KV head's columns at a time against the Gram of
      the head's attention-averaged inputs, as ``quantize.gptq``'s option (:mod:`kiln.passes.quantize.value_gram`).
      SmolLM2 at 3 planes, one pass of statistics: perplexity 33.59 -> 31.22; with ``sequential``: 30.07 -> 30.88.
    * ``op_types``, ``min_elements``, ``exclude``, ``quantize_lm_head``: which nodes, as in ``quantize.rtn``.
    * ``stats_memory_mb``: memory for Grams while collecting statistics.
    """

    bits: int = 3
    group_size: int = 128
    mantissa_bits: int = 0
    average_bits: float | None = None
    candidate_bits: list[int] = dataclasses.field(default_factory=lambda: [2, 3])
    sensitivity: Literal["model", "layer"] = "model"
    sensitivity_batches: int = 1
    iterations: int = 4
    compensate: bool = True
    act_order: bool = True
    refits: int = 1
    damp: float = 0.01
    stages: int = 1
    sequential: bool = False
    value_hessian: Literal["input", "attention"] = "input"
    op_types: list[str] = dataclasses.field(default_factory=lambda: ["MatMul", "Gemm"])
    min_elements: int = 4096
    exclude: list[str] = dataclasses.field(default_factory=list)
    quantize_lm_head: bool = True
    stats_memory_mb: int = 1024

    def __post_init__(self) -> None:
        for bits in [self.bits, *self.candidate_bits]:
            if not 1 <= bits <= shiftadd.MAX_BITS:
                raise ValueError(f"planes per weight must be 1..{shiftadd.MAX_BITS}, got {bits}")
        if not 0 <= self.mantissa_bits <= shiftadd.MAX_MANTISSA_BITS:
            raise ValueError(f"mantissa_bits must be 0..{shiftadd.MAX_MANTISSA_BITS}, got {self.mantissa_bits}")
        if self.group_size < 8:
            raise ValueError(f"group_size must be >= 8, got {self.group_size}")
        if self.average_bits is not None:
            if not self.candidate_bits:
                raise ValueError("candidate_bits must name at least one width when average_bits is set")
            if not min(self.candidate_bits) <= self.average_bits:
                raise ValueError(
                    f"average_bits={self.average_bits} is below the smallest candidate ({min(self.candidate_bits)})"
                )
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.refits < 0:
            raise ValueError(f"refits must be >= 0, got {self.refits}")
        if not self.damp > 0:
            raise ValueError(f"damp must be positive, got {self.damp}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.stages > 1 and self.average_bits is not None:
            raise ValueError("stages must be 1 with average_bits: the allocation scores every layer first")
        if self.sequential and (self.stages > 1 or self.average_bits is not None):
            raise ValueError(
                "sequential=True takes every layer group in order: leave stages at 1 and average_bits unset"
            )
        if self.value_hessian != "input" and self.average_bits is not None:
            raise ValueError("value_hessian='attention' takes fixed planes: leave average_bits unset")
        if self.sensitivity_batches < 1:
            raise ValueError(f"sensitivity_batches must be >= 1, got {self.sensitivity_batches}")
        if self.stats_memory_mb <= 0:
            raise ValueError(f"stats_memory_mb must be positive, got {self.stats_memory_mb}")

    def finder(self) -> WeightOnlyRTN:
        """``quantize.rtn`` configured to find the same nodes (its format and bits play no part in finding)."""
        return WeightOnlyRTN(
            RTNOptions(
                format="dq",
                group_size=0,
                op_types=list(self.op_types),
                min_elements=self.min_elements,
                exclude=list(self.exclude),
                quantize_lm_head=self.quantize_lm_head,
            )
        )


@register("shiftadd.bcq")
class ShiftAddBCQ(KilnPass):
    """Calibrated binary-coding quantization with power-of-two scales to ai.kiln.ShiftAddMatMul (shift-add).

    Needs calibration data. Weights sharing an input (Q/K/V, gate/up) share one Gram and are fitted together.
    """

    Options = BCQOptions
    needs_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        finder = opts.finder()
        sites = finder._find_sites(model)
        skipped: dict[str, str] = dict(finder.details["skipped"])
        self.details = {"group_size": opts.group_size, "layers": {}, "skipped": skipped}
        main = [site for site in sites if site.node.graph is model.graph]
        for site in sites:
            if site.node.graph is not model.graph:
                skipped[site.label] = "inside an If/Loop/Scan body: calibration cannot observe its input"
        if not main:
            return ir.passes.PassResult(model, modified=False)
        opset = model.opset_imports.get("", 0)
        if opset < shiftadd.MIN_OPSET:
            raise KilnError(
                f"shiftadd.bcq: the model's default opset is {opset}; ai.kiln.ShiftAddMatMul's function form needs "
                f">= {shiftadd.MIN_OPSET} (convert the model first, e.g. onnxscript's version_converter)"
            )
        groups = _make_groups(main)
        stages = split_stages(groups, opts.stages)
        # Weights the calibration model computes with fitted values until the rewrite; a tied embedding's table
        # keeps its float values for the Gather, so it is not swapped.
        swappable = {(site.weight, site.transposed) for site in main if not site.kept_float}
        originals: dict[ir.Value, ir.TensorProtocol] = {}
        fitted: dict[MemberKey, tuple[BCQWeight, dict[str, Any]]] = {}
        passes = 0
        steps = None
        self._value_grams: dict[str, list[np.ndarray]] = {}
        if opts.value_hessian == "attention":
            assert self.context.calibration is not None  # checked by requires()
            self._value_grams, why = value_grams(model, self.context.calibration)
            self.details["value_hessian"] = {"layers": len(self._value_grams)} | ({"skipped": why} if why else {})
        try:
            with tempfile.TemporaryDirectory(prefix="kiln-stats-") as tmp:
                stats = Statistics(Path(tmp))
                vectors = {"mean": ChannelMean} if opts.average_bits is not None else {}
                assert self.context.calibration is not None  # checked by requires()
                if opts.sequential:
                    walk = Sequential(self.context.calibration, model, model.clone())
                    for group in walk_order(model.graph, groups, lambda group: group.inputs):
                        results = self._fit_group(group, stats, {}, walk.cross_moments(group.inputs))
                        fitted |= results
                        for key, (weight, _) in results.items():
                            if key in swappable:
                                originals.setdefault(key[0], _swap(key, weight))
                    steps = walk.steps  # statistics come from the walk: no separate passes
                else:
                    for stage in stages:
                        dims = {name: group.k for group in stage for name in group.inputs}
                        memory = opts.stats_memory_mb << 20
                        passes += stats.collect(self.context.calibration, model, dims, vectors, memory)
                        allocated = {} if opts.average_bits is None else self._allocate(model, groups, stats, Path(tmp))
                        for group in stage:
                            results = self._fit_group(group, stats, allocated)
                            fitted |= results
                            if len(stages) > 1:
                                for key, (weight, _) in results.items():
                                    if key in swappable:
                                        originals.setdefault(key[0], _swap(key, weight))
        finally:
            for value, tensor in originals.items():
                value.const_value = tensor
        tensors = len({name for group in groups for name in group.inputs})
        self.details["calibration"] = {"tensors": tensors, "passes": passes, "stages": len(stages)}
        if steps is not None:
            self.details["calibration"]["sequential_steps"] = steps
        self._rewrite(model, main, fitted)
        return ir.passes.PassResult(model, modified=True)

    # -- fitting -------------------------------------------------------------------------------------------------

    def _fit(self, weights: list[np.ndarray], hessian: np.ndarray, bits: int) -> list[BCQWeight]:
        """One BCQ problem over the members' concatenated columns, split back per member."""
        opts = self.options
        joined = np.concatenate(weights, axis=1) if len(weights) > 1 else weights[0]
        fitted = bcq_gptq(
            joined,
            hessian,
            bits,
            opts.group_size,
            damp=opts.damp,
            iterations=opts.iterations,
            compensate=opts.compensate,
            act_order=opts.act_order,
            refits=opts.refits,
            mantissa_bits=opts.mantissa_bits,
        )
        starts = list(itertools.accumulate([w.shape[1] for w in weights], initial=0))
        return [fitted.columns(slice(a, b)) for a, b in itertools.pairwise(starts)]

    def _fit_group(
        self,
        group: Group,
        stats: Statistics,
        allocated: dict[MemberKey, BCQWeight],
        refit: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> dict[MemberKey, tuple[BCQWeight, dict[str, Any]]]:
        """Each member's fit (from the allocation if it made one, else at ``bits``) and its errors; with ``refit``
        (the sequential walk's ``(E[x̂^T x̂], E[x̂^T x], E[x^T x])``) fitted to the refit target, its output error
        measured against the float layer's outputs."""
        hessian = _hessian(group, stats) if refit is None else refit[0]
        weights = {key: load_weight(key) for key in group.members}
        targets = weights
        if refit is not None:
            _, lam = damping(refit[0], self.options.damp)
            targets = {key: refit_target(w, refit[0], refit[1], lam).astype(np.float32) for key, w in weights.items()}
        fits = {key: allocated[key] for key in group.members if key in allocated}
        rest = [key for key in group.members if key not in fits]
        heads = {key: self._value_grams[str(key[0].name)] for key in rest if str(key[0].name) in self._value_grams}
        rest = [key for key in rest if key not in heads]
        if rest:
            fits |= dict(zip(rest, self._fit([targets[key] for key in rest], hessian, self.options.bits)))
        for key, grams in heads.items():
            blocks = np.split(targets[key], len(grams), axis=1)
            fits[key] = BCQWeight.concatenate([self._fit([b], h, self.options.bits)[0] for b, h in zip(blocks, grams)])
        results = {}
        for key in group.members:
            w, fitted = weights[key], fits[key]
            dequantized = fitted.dequantize()
            diff = w.astype(np.float32) - dequantized
            if refit is None:
                error, signal = quadratic(hessian, diff), quadratic(hessian, w)
            else:
                error, signal = refit_error(w, dequantized, refit)
            info = {
                "bits": fitted.bits,
                "weight_rel_error": float(np.linalg.norm(diff) / max(np.linalg.norm(w), 1e-30)),
                "output_rel_error": math.sqrt(max(error, 0.0) / signal) if signal > 0 else 0.0,
            }
            if key in heads:
                info["hessian"] = "attention"
            results[key] = (fitted, info)
        return results

    def _allocate(
        self, model: ir.Model, groups: list[Group], stats: Statistics, directory: Path
    ) -> dict[MemberKey, BCQWeight]:
        """Each weight fitted at the plane count the knapsack over sensitivities chose (module docstring).

        Columns are fitted independently (the error compensation runs along K, per column), so a member's fit from
        its group's joint fit at width b is the fit it gets alone at b, and is kept rather than redone.
        """
        opts = self.options
        assert opts.average_bits is not None
        candidates = sorted(set(opts.candidate_bits))
        probe = None
        if opts.sensitivity == "model":
            assert self.context.calibration is not None
            feeds = list(itertools.islice(iter(self.context.calibration), opts.sensitivity_batches))
            weights = [key[0] for group in groups for key in group.members if key[0].is_initializer()]
            probe = _ModelProbe(model, weights, feeds, directory)
        keys: list[MemberKey] = []
        ratios: list[list[float]] = []
        measured: list[float | None] = []
        sizes: list[int] = []
        fits: dict[MemberKey, dict[int, BCQWeight]] = {}
        for group in groups:
            hessian = _hessian(group, stats)
            covariance = hessian - sum(np.outer(m, m) for m in (stats.get(name, "mean") for name in group.inputs))
            weights = [load_weight(key) for key in group.members]
            signal = [quadratic(covariance, w) for w in weights]
            scores: list[list[float]] = [[] for _ in weights]
            for width in candidates:
                fitted = self._fit(weights, hessian, width)
                for key, q in zip(group.members, fitted):
                    fits.setdefault(key, {})[width] = q
                for i, (w, q) in enumerate(zip(weights, fitted)):
                    noise = quadratic(covariance, w.astype(np.float32) - q.dequantize())
                    scores[i].append(noise / signal[i] if signal[i] > 0 else 0.0)
                if width == candidates[0]:
                    for key, w, q in zip(group.members, weights, fitted):
                        lowest = q.dequantize().astype(w.dtype)
                        measured.append(None if probe is None else probe.error(key, lowest))
            keys += group.members
            ratios += scores
            sizes += [w.size for w in weights]
        errors = _scale_to_model(np.array(ratios), measured) if probe is not None else np.array(ratios)
        total = sum(sizes)
        picks, exact = allocate(sizes, candidates, errors, opts.average_bits * total)
        used = sum(size * candidates[c] for size, c in zip(sizes, picks))
        self.details["allocation"] = {
            "budget_bits": opts.average_bits,
            "average_bits": used / total,
            "exact": exact,
            "sensitivity": opts.sensitivity,
            "layers_per_bits": {str(b): sum(candidates[c] == b for c in picks) for b in candidates},
        }
        return {key: fits[key][candidates[c]] for key, c in zip(keys, picks)}

    # -- rewriting -----------------------------------------------------------------------------------------------

    def _rewrite(
        self, model: ir.Model, sites: list[WeightSite], fitted: dict[MemberKey, tuple[BCQWeight, dict[str, Any]]]
    ) -> None:
        graph = model.graph
        names = _weights.NameScope(model)
        packed: dict[MemberKey, tuple[shiftadd.PackedWeight, ir.Value, ir.Value]] = {}
        bytes_before: dict[ir.Value, int] = {}
        for site in sites:
            key = (site.weight, site.transposed)
            weight, info = fitted[key]
            if key not in packed:
                p = weight.pack()
                base = site.weight.name or site.label
                packed[key] = (
                    p,
                    _weights.add_initializer(graph, names.fresh(f"{base}_planes"), p.planes),
                    _weights.add_initializer(graph, names.fresh(f"{base}_exponents"), p.exponents),
                )
                tensor = _weights.constant_tensor(site.weight)
                assert tensor is not None  # checked by the finder
                bytes_before[site.weight] = tensor.nbytes
            p, planes, exponents = packed[key]
            node = site.node
            a, old = node.inputs[0], node.outputs[0]
            assert a is not None  # checked by the finder
            op = shiftadd.add_node(model, a, planes, exponents, p, names.fresh(f"{site.label}_shiftadd"))
            new_nodes = [op]
            if site.bias is not None:
                op.outputs[0].name = names.fresh(f"{old.name}_shiftadd")
                new_nodes.append(ir.node("Add", [op.outputs[0], site.bias], name=names.fresh(f"{site.label}_bias")))
            graph.insert_before(node, new_nodes)
            out = new_nodes[-1].outputs[0]
            out.type, out.shape = old.type, old.shape
            name = old.name
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            out.name = name
            layer = {"K": site.k, "N": site.n, "group_size": p.group_size, "weight": site.weight.name} | info
            layer["bytes_before"], layer["bytes_after"] = bytes_before[site.weight], p.nbytes
            if site.lm_head:
                layer["lm_head"] = True
            if site.kept_float:
                layer["kept_float"] = True
            self.details["layers"][site.label] = layer
        self.details["bytes_before"] = sum(bytes_before.values())
        self.details["bytes_after"] = sum(entry[0].nbytes for entry in packed.values()) + sum(
            nbytes for weight, nbytes in bytes_before.items() if not _weights.remove_if_unused(weight)
        )


def _make_groups(sites: list[WeightSite]) -> list[Group]:
    """Weights grouped by the set of tensors their matmuls read (one Gram per group)."""
    inputs: dict[MemberKey, set[str]] = {}
    dims: dict[MemberKey, int] = {}
    for site in sites:
        key = (site.weight, site.transposed)
        a = site.node.inputs[0]
        assert a is not None and a.name
        inputs.setdefault(key, set()).add(a.name)
        dims[key] = site.k
    groups: dict[tuple[str, ...], Group] = {}
    for key, names in inputs.items():
        tensors = tuple(sorted(names))
        groups.setdefault(tensors, Group(tensors, [], dims[key])).members.append(key)
    return list(groups.values())


def _hessian(group: Group, stats: Statistics) -> np.ndarray:
    return sum((stats.get(name, "gram") for name in group.inputs), start=np.zeros((group.k, group.k)))


def _swap(key: MemberKey, weight: BCQWeight) -> ir.TensorProtocol:
    """Give ``key``'s initializer the fitted weight's values, computed only when read; return its own tensor."""
    value, transposed = key
    original = value.const_value
    assert original is not None  # the finder checked it

    def fitted() -> ir.TensorProtocol:
        w = weight.dequantize()
        return ir.tensor(np.ascontiguousarray(w.T if transposed else w).astype(original.dtype.numpy()))

    value.const_value = ir.LazyTensor(fitted, dtype=original.dtype, shape=original.shape, name=value.name)
    return original
