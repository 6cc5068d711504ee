"""Weight-only quantization with a low-rank error-compensation branch (EoRA-style): ``lowrank.compensate``.

Why one pass. The branch approximates ``E = W - Q(W)``, which needs the float weight ``W``; once a quantization
pass has run, the graph holds only ``Q(W)``. So this pass quantizes (round-to-nearest, or GPTQ: the grid, the
``"matmulnbits"``/``"dq"`` formats and every quantization option are those of ``quantize.rtn``/``quantize.gptq``)
and fits the branch while ``W`` and ``Q(W)`` are both in hand.

Math. With ``G`` the Gram of the layer's input and ``S`` its damped Cholesky whitening
(:mod:`kiln.passes.lowrank.whiten`), the rank-r branch minimizing the output error ``E ||x E - x A B||^2`` is the
truncated SVD of ``S E`` mapped back, exactly as in ``lowrank.asvd`` but applied to the quantization error, i.e.
in the activations' eigenspace::

    S E = U Σ V^T,   A = S^-1 U_r Σ_r^(1/2),   B = Σ_r^(1/2) V_r^T
    y = x Q(W) + (x A) B,     output error tr(E^T G E)  ->  sum_{i>r} σ_i^2  (damped metric)

Ranks. ``allocation = "uniform"``: every layer gets ``rank`` (at most min(K, N)). ``"optimal"``: the same number
of branch parameters, ``rank * sum(K + N)``, is spread by :func:`kiln.passes.lowrank.rank.allocate` over the layers,
each rank from 0 to ``4 * rank`` in steps of ``rank_step``, minimizing the sum of the residuals' tail energies
relative to each layer's own output energy ``||S W||^2``: layers that quantize badly get more.

Graph changes, for each quantized main-graph layer (``Y`` keeps its name and consumers)::

    Y = MatMul(X, W)   ->   Y = Add(Yq, MatMul(MatMul(X, A), B)),   Yq = quantize.rtn's rewrite of the node

``A`` [K, r] and ``B`` [r, N] are float initializers of the weight's dtype (``r (K + N)`` values per weight, shared
by the nodes that share the weight). Layers inside If/Loop/Scan bodies have no statistics: they are quantized as
``quantize.rtn`` does, without a branch (``"compensated": false``). Memory holds each layer's factors up to the
largest rank it may get until the ranks are chosen.

Sequential (``sequential``, with ``allocation = "uniform"``). As in ``quantize.gptq``'s sequential mode, each
layer group is quantized when the walk of :mod:`kiln.compiler.sequential` reaches it, from the inputs ``x̂`` the
quantized (and compensated) layers before it give, toward the refit target ``W* = (G + λ I)^-1 (C W + λ W)``
(``G = E[x̂^T x̂]``, ``C = E[x̂^T x]``). The branch then approximates ``E = W* - Q(W*)`` in the metric of ``G``,
which is what the error against the *float* layer's outputs leaves to it::

    E ||x W - x̂ (Q + A B)||^2 + λ ||W - Q - A B||^2 = ||S (W* - Q - A B)||_F^2 + const,   S^T S = G + λ I

and it goes into the graph at once, so the layers after it are fitted to inputs that include it. Ranks must be
known then: the "optimal" allocation, which needs every layer's residual first, is refused with ``sequential``.

Details per layer, besides quantize's: ``rank``, ``branch_bytes``, ``output_rel_error`` (the quantized layer
alone) and ``compensated_output_rel_error`` (with the branch), both exact on the calibration data (undamped; with
``sequential``, against the float model's outputs of that layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.registry import register
from kiln.compiler.sequential import refit_error
from kiln.passes import _weights
from kiln.passes.lowrank import rank, whiten
from kiln.passes.quantize import grid
from kiln.passes.quantize.gptq import (
    GPTQ,
    GPTQOptions,
    Group,
    MemberKey,
    MemberResult,
    scale_dtype_of,
)
from kiln.passes.quantize.rtn import WeightSite, _Packed

#: With allocation "optimal" a layer may get up to this many times the average rank.
_MAX_RANK_FACTOR = 4


@dataclasses.dataclass
class CompensateOptions(GPTQOptions):
    """Options of ``lowrank.compensate``, on top of ``quantize.gptq``'s.

    GPTQ's own options (``block_size``, ``act_order``, ``clip``) apply with ``method="gptq"``; ``damp`` damps both the
    GPTQ Hessian and the whitening.

    * ``method``: "rtn" (round to nearest) or "gptq" for the quantized weight.
    * ``rank``: rank of every branch ("uniform"), or the average rank ("optimal").
    * ``allocation``: "uniform" or "optimal" (module docstring).
    * ``rank_step``: with "optimal", ranks are multiples of this.
    """

    method: Literal["rtn", "gptq"] = "rtn"
    rank: int = 16
    allocation: Literal["uniform", "optimal"] = "uniform"
    rank_step: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be 'rtn' or 'gptq', got {self.method!r}")
        if self.value_hessian != "input" and self.method != "gptq":
            raise ValueError("value_hessian='attention' needs method='gptq' (round to nearest uses no Gram)")
        if self.allocation not in ("uniform", "optimal"):
            raise ValueError(f"allocation must be 'uniform' or 'optimal', got {self.allocation!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.rank_step < 1:
            raise ValueError(f"rank_step must be >= 1, got {self.rank_step}")
        if self.bias_correction:
            raise ValueError("bias_correction and the compensation branch both correct the quantization error")
        if self.sequential and self.allocation != "uniform":
            raise ValueError(
                "sequential=True adds each branch as its layer is quantized, before the ranks of the layers after it "
                "are known: use allocation='uniform'"
            )


@dataclasses.dataclass
class _Branch:
    """One layer's residual factors up to its largest possible rank, and what each rank achieves."""

    a: np.ndarray
    b: np.ndarray
    #: Squared singular values of the whitened residual ``S E``.
    energy: np.ndarray
    #: ``||S W||^2``: the layer's (damped) output energy, the scale its errors are compared at.
    scale: float
    #: Exact ``tr(D_r^T G D_r)`` for r = 0 .. width, and ``tr(W^T G W)``; with ``sequential`` only the entry of
    #: the rank it gets is filled: the error against the float layer's outputs (:func:`refit_error`).
    errors: np.ndarray
    signal: float


@register("lowrank.compensate")
class Compensate(GPTQ):
    """Weight-only RTN/GPTQ quantization plus a whitened low-rank branch approximating each layer's error.

    Needs calibration data. The quantized layers are those of ``quantize.rtn``, in the same formats.
    """

    Options = CompensateOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._branches: dict[MemberKey, _Branch] = {}
        self._factors: dict[MemberKey, tuple[ir.Value, ir.Value]] = {}
        return super().call(model)

    def release(self) -> None:
        super().release()
        self._branches = {}
        self._factors = {}

    def quantize_group(self, group: Group, weights: list[np.ndarray]) -> list[MemberResult]:
        opts = self.options
        if opts.method == "gptq":
            results = super().quantize_group(group, weights)
        else:
            quantized = [grid.quantize(w, opts.spec, scale_dtype_of(w)) for w in weights]
            results = [MemberResult(q, grid.dequantize(q)) for q in quantized]
        gram = self.hessian(group)
        whitening = whiten.Whitening("cov", gram, opts.damp)
        width = opts.rank if opts.allocation == "uniform" else _MAX_RANK_FACTOR * opts.rank
        refit = self._refits.get(group.inputs)
        for member, w, result in zip(group.members, weights, results):
            error = w.astype(np.float64) - result.dequantized
            a, b, energy = whitening.truncated(error, width)
            a, b = a.astype(w.dtype), b.astype(w.dtype)
            if refit is None:
                errors = whiten.output_errors(gram, error, a, b)
                signal = float(np.einsum("kn,kn->", w, gram @ w, dtype=np.float64))
            else:
                # ``w`` is the refit target: the error that counts is against the original weight's outputs.
                r = min(opts.rank, a.shape[1])
                new = result.dequantized + a[:, :r].astype(np.float64) @ b[:r].astype(np.float64)
                errors = np.full(a.shape[1] + 1, np.nan)
                errors[r], signal = refit_error(self.originals[member], new, refit)
            self._branches[member] = _Branch(a, b, energy, float(np.square(whitening.apply(w)).sum()), errors, signal)
        return results

    def _rewrite(
        self, site: WeightSite, packed: _Packed, names: _weights.NameScope, main_graph: ir.Graph, shared: bool
    ) -> ir.Value:
        """With ``sequential``, the branch goes in with the quantized node: the walk's next segments run it."""
        x = site.node.inputs[0]
        y = super()._rewrite(site, packed, names, main_graph, shared)
        key = (site.weight, site.transposed)
        if self.sequential() and site.label in self.calibrated and key in self._branches:
            assert x is not None  # a calibrated site's input
            self._attach(main_graph, site, self._ranks([key])[key], x, y, names)
        return y

    def _attach(
        self, graph: ir.Graph, site: WeightSite, r: int, x: ir.Value, y: ir.Value, names: _weights.NameScope
    ) -> None:
        """Add ``site``'s rank-``r`` branch from its input ``x`` to its output ``y`` (factors made once per weight)."""
        key = (site.weight, site.transposed)
        branch = self._branches[key]
        if key not in self._factors:
            base = site.weight.name or site.label
            self._factors[key] = (
                _weights.add_initializer(graph, names.fresh(f"{base}_eora_a"), branch.a[:, :r].copy()),
                _weights.add_initializer(graph, names.fresh(f"{base}_eora_b"), branch.b[:r].copy()),
            )
        self._add_branch(graph, x, y, *self._factors[key], names)

    def _finish(self, model: ir.Model) -> None:
        super()._finish(model)
        layers: dict[str, dict[str, Any]] = self.details["layers"]
        sites = [site for site in self.sites if site.label in self.calibrated and site.label in layers]
        members = list(dict.fromkeys((site.weight, site.transposed) for site in sites))
        ranks = self._ranks(members)
        names = _weights.NameScope(model)
        attached = self.sequential()  # the branches went in with their layers
        values: dict[str, ir.Value] = {}
        if not attached:
            values = {v.name: v for v in model.graph.inputs if v.name}
            values.update((v.name, v) for node in model.graph for v in node.outputs if v.name)
        counted: set[MemberKey] = set()
        branch_bytes = 0
        errors = []
        for site in self.sites:
            if site.label in layers and site.label not in self.calibrated:
                layers[site.label]["compensated"] = False
        for site in sites:
            key = (site.weight, site.transposed)
            branch, r = self._branches[key], ranks[key]
            layer = layers[site.label]
            layer["rank"] = r
            layer["compensated_output_rel_error"] = (
                math.sqrt(max(branch.errors[r], 0.0) / branch.signal) if branch.signal > 0 else 0.0
            )
            errors.append(layer["compensated_output_rel_error"])
            if r == 0:
                continue
            if not attached:
                input_name, output_name = self.calibrated[site.label]
                self._attach(model.graph, site, r, values[input_name], values[output_name], names)
            layer["branch_bytes"] = branch.a[:, :r].nbytes + branch.b[:r].nbytes
            if key not in counted:  # a shared weight's factors count once
                counted.add(key)
                branch_bytes += layer["branch_bytes"]
        self.details.update(rank=self.options.rank, allocation=self.options.allocation, branch_bytes=branch_bytes)
        self.details["bytes_after"] += branch_bytes
        if errors:
            self.details["compensated_output_rel_error_mean"] = float(np.mean(errors))
            self.details["compensated_output_rel_error_max"] = float(np.max(errors))

    def _ranks(self, members: list[MemberKey]) -> dict[MemberKey, int]:
        opts = self.options
        branches = [self._branches[key] for key in members]
        if opts.allocation == "uniform":
            return {key: min(opts.rank, branch.a.shape[1]) for key, branch in zip(members, branches)}
        curves = [
            rank.Curve(
                energy=branch.energy,
                scale=branch.scale,
                unit_cost=float(branch.a.shape[0] + branch.b.shape[1]),
                dense_cost=None,
                min_rank=0,
                max_rank=branch.a.shape[1],
            )
            for branch in branches
        ]
        budget = opts.rank * sum(curve.unit_cost for curve in curves)
        chosen = rank.allocate(curves, budget, opts.rank_step)
        return {key: r or 0 for key, r in zip(members, chosen)}

    @staticmethod
    def _add_branch(
        graph: ir.Graph, x: ir.Value, y: ir.Value, a: ir.Value, b: ir.Value, names: _weights.NameScope
    ) -> None:
        """``y`` becomes ``y + (x A) B`` for its consumers (and as a graph output), keeping its name."""
        producer = y.producer()
        assert producer is not None  # the quantized matmul
        uses = list(y.uses())
        first = ir.node("MatMul", [x, a], name=names.fresh(f"{y.name}_eora_a"))
        second = ir.node("MatMul", [first.outputs[0], b], name=names.fresh(f"{y.name}_eora_b"))
        add = ir.node("Add", [y, second.outputs[0]], name=names.fresh(f"{y.name}_eora_add"))
        first.outputs[0].name = names.fresh(f"{y.name}_eora_hidden")
        second.outputs[0].name = names.fresh(f"{y.name}_eora")
        first.outputs[0].type = second.outputs[0].type = a.type
        second.outputs[0].shape = y.shape
        if x.shape is not None:
            first.outputs[0].shape = ir.Shape([*list(x.shape)[:-1], b.shape[0]])
        graph.insert_after(producer, [first, second, add])
        corrected = add.outputs[0]
        corrected.type, corrected.shape = y.type, y.shape
        for use in uses:
            use.node.replace_input_with(use.idx, corrected)
        if y.is_graph_output():
            graph.outputs[graph.outputs.index(y)] = corrected
        name = y.name
        y.name = names.fresh(f"{name}_quantized")
        corrected.name = name
