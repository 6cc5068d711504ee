"""Low-rank factorization of MatMul, Gemm and Conv weights: ``lowrank.svd`` (plain) and ``lowrank.asvd`` (whitened).

Math. A constant weight ``W`` [K, N] (a Conv's filters [M, C, kh, kw] in their matrix view [C kh kw, M]) is
replaced by ``A B`` with ``A`` [K, r] and ``B`` [r, N], the rank-r truncated SVD in the metric of
:mod:`kiln.passes.lowrank.whiten`::

    S W = U Σ V^T,    A = S^-1 U_r Σ_r^(1/2),    B = Σ_r^(1/2) V_r^T,    ||S (W - A B)||_F^2 = sum_{i>r} σ_i^2

``lowrank.svd`` uses ``S = I`` (minimal weight error, no data). ``lowrank.asvd`` takes ``S`` from calibration
statistics of the layer's input (``whiten = "cov"``: Cholesky of the Gram; ``"diag"``: per-channel RMS), which
minimizes the layer's output error on that data instead; on correlated inputs it is lower at every rank.

Ranks (:mod:`kiln.passes.lowrank.rank`): ``target = "params"`` or ``"flops"`` keeps the fraction ``keep`` of the
eligible matrices' parameters (or multiply-adds: a Conv's count is multiplied by its output positions) and spends
it where the (whitened) tail energy, relative to each matrix's total, drops most per unit of cost;
``target = "energy"`` gives each matrix the smallest rank keeping ``keep`` of its (whitened) energy. A matrix is
factored only when that saves at least ``min_saving`` of its parameters: ``r (K + N) <= (1 - min_saving) K N``;
otherwise it stays as it is, with the reason in ``details["skipped"]``. Ranks are multiples of ``rank_step``.

Graph changes, for each factored weight (``Y`` keeps its name, type and consumers)::

    Y = MatMul(X, W)      ->  Y = MatMul(MatMul(X, A), B)
    Y = Gemm(X, W, C)     ->  Y = Gemm(MatMul(X, A), B, C)          (transB=1 stores W^T; the factors are upright)
    Y = Conv(X, W, C)     ->  Y = Conv(Conv(X, A'), B', C)
                              A' = A^T as [r, C, kh, kw] with W's strides, pads and dilations;  B' = B^T as [M, r, 1, 1]

Eligible: MatMul, Gemm (``transA=0``, ``alpha=1``, ``beta=1``) and Conv (``group=1``; depthwise and grouped
convolutions have no cross-channel matrix to factor and are skipped) nodes of every graph and subgraph, whose
weight is a float constant used only by such nodes, in one layout, and is neither a graph input nor output (a
tied embedding table read by a Gather stays). ``A`` and ``B`` are new initializers of the graph defining ``W``,
shared by every node that used ``W``; ``W`` is removed.

Calibration (``lowrank.asvd``): one statistic per distinct (input tensor, Conv geometry), the Gram summed when a
weight reads several inputs. Matmuls in If/Loop/Scan bodies cannot be observed by ONNX Runtime; a weight used only
there is factored by plain SVD and reported with ``"whitened": false``.

Details per layer: ``rank``, ``max_rank`` (the largest rank meeting ``min_saving``), ``kept_energy`` (fraction of
the whitened energy kept), ``tail_rel_error`` (``sqrt`` of the lost fraction: the relative weight error for plain
SVD, the estimated relative output error when whitened) and, with ``"cov"``, ``output_rel_error``: the exact
relative output error ``sqrt(tr(D^T G D) / tr(W^T G W))`` on the calibration data (undamped), and
``calibration_rows``. Whitening needs comfortably more rows than K: from fewer, the Gram is singular, the directions
the calibration never showed look free to drop, and both error figures are optimistic for unseen inputs (measured:
EfficientNet-Lite0's classifier, K=1280 from 128 calibration images, reports 0.2% output error at rank 360 and
still moves top-1 agreement to 0.89).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from kiln.compiler.registry import register
from kiln.compiler.sequential import CrossGram, Sequential, refit_error, walk_order
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.lowrank import rank, whiten

_OP_TYPES = ("MatMul", "Gemm", "Conv")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclasses.dataclass
class SVDOptions:
    """Options of ``lowrank.svd`` (and the base of ``lowrank.asvd``'s).

    * ``target``: "params" or "flops" (a global budget, allocated per matrix), or "energy" (a per-matrix threshold).
    * ``keep``: fraction of the parameters / FLOPs of the eligible matrices kept, or of each matrix's energy.
    * ``min_saving``: factor a matrix only if that removes at least this fraction of its parameters.
    * ``rank_step``: ranks are multiples of this (or the largest rank allowed, when that is smaller).
    * ``op_types``: which of MatMul, Gemm and Conv to factor.
    * ``exclude``: node names to leave alone (an unnamed node is ``"OpType:output_name"``, as in details).
    * ``error_power``: the budget's allocation minimizes the sum over matrices of their relative squared error to
      this power (:func:`rank.allocate`); above 1 it spreads the loss instead of sacrificing a few matrices.
    """

    target: Literal["params", "flops", "energy"] = "params"
    keep: float = 0.8
    min_saving: float = 0.1
    rank_step: int = 8
    op_types: list[str] = dataclasses.field(default_factory=lambda: list(_OP_TYPES))
    exclude: list[str] = dataclasses.field(default_factory=list)
    error_power: float = 1.0

    def __post_init__(self) -> None:
        if self.target not in ("params", "flops", "energy"):
            raise ValueError(f"target must be 'params', 'flops' or 'energy', got {self.target!r}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving}")
        if self.rank_step < 1:
            raise ValueError(f"rank_step must be >= 1, got {self.rank_step}")
        if not self.error_power > 0:
            raise ValueError(f"error_power must be positive, got {self.error_power}")
        unknown = sorted(set(self.op_types) - set(_OP_TYPES))
        if unknown:
            raise ValueError(f"op_types may contain only 'MatMul', 'Gemm' and 'Conv', got {unknown}")


@dataclasses.dataclass
class ASVDOptions(SVDOptions):
    """Options of ``lowrank.asvd``, on top of ``lowrank.svd``'s.

    * ``whiten``: "cov" (Cholesky of the input Gram) or "diag" (per-channel RMS of the input).
    * ``damp``: added to the Gram's diagonal, as a fraction of its mean.
    * ``stats_memory_mb``: memory for statistics while collecting; more than fit take extra calibration passes.
    * ``sequential``: factor the matrices in graph order, each fitted to the inputs the already factored ones give
      it, with the original layer's outputs as the target (:mod:`kiln.passes.lowrank.whiten`, sequential refit;
      :mod:`kiln.compiler.sequential`). Ranks are still allocated from the unmodified model's statistics. Needs
      ``whiten="cov"``; costs about two more passes over the calibration data and one ONNX Runtime session per
      distinct layer input.
    """

    whiten: Literal["cov", "diag"] = "cov"
    damp: float = 0.01
    stats_memory_mb: int = 1024
    sequential: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.whiten not in ("cov", "diag"):
            raise ValueError(f"whiten must be 'cov' or 'diag', got {self.whiten!r}")
        if not self.damp > 0:
            raise ValueError(f"damp must be positive (it keeps the whitening invertible), got {self.damp}")
        if self.stats_memory_mb <= 0:
            raise ValueError(f"stats_memory_mb must be positive, got {self.stats_memory_mb}")
        if self.sequential and self.whiten != "cov":
            raise ValueError("sequential=True refits against the full input Gram: it needs whiten='cov'")


@dataclasses.dataclass
class Site:
    """A node whose weight may be factored."""

    label: str
    node: ir.Node
    #: How the stored weight maps to [K, N]: as is, transposed (Gemm transB=1), or a Conv's filters.
    layout: Literal["matmul", "transposed", "conv"]
    shape: tuple[int, ...]
    #: Where the weight is applied per run (a Conv's output pixels; 1 for matmuls, counted per row), if known.
    positions: int | None
    patches: whiten.Patches | None = None


@dataclasses.dataclass
class Matrix:
    """One weight and the nodes using it, factored together."""

    weight: ir.Value
    sites: list[Site]
    k: int
    n: int
    #: The largest rank that saves ``min_saving``.
    max_rank: int
    #: The statistics its whitening sums: one per main-graph node's (input, Conv geometry); none when not whitened.
    keys: list[whiten.StatKey] = dataclasses.field(default_factory=list)
    #: Calibration rows behind its statistics.
    rows: int = 0

    @property
    def whitened(self) -> bool:
        return bool(self.keys)

    @property
    def layout(self) -> str:
        return self.sites[0].layout

    def load(self) -> np.ndarray:
        """The weight as [K, N] float32, copied so that the memory-mapped file can be released."""
        tensor = _weights.constant_tensor(self.weight)
        assert tensor is not None  # checked when the site was found
        array = tensor.numpy()
        if self.layout == "transposed":
            matrix = array.T
        elif self.layout == "conv":
            matrix = array.reshape(self.n, self.k).T
        else:
            matrix = array
        copy = np.array(matrix, dtype=np.float32)
        del array, matrix
        _weights.release(tensor)
        return copy

    def positions(self) -> int:
        """Applications of the weight per run, summed over its nodes (for FLOPs)."""
        total = 0
        for site in self.sites:
            if site.positions is None:
                raise KilnError(
                    f"target='flops': the output size of {site.node.op_type} node {site.label!r} is not static, "
                    "so its FLOPs are unknown; use target='params'"
                )
            total += site.positions
        return total


@register("lowrank.svd")
class LowRankSVD(KilnPass):
    """Low-rank factorization (truncated SVD) of MatMul/Gemm/Conv weights, ranks allocated under a global budget."""

    Options = SVDOptions

    def whitening_kind(self) -> whiten.Kind:
        return "none"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        kind = self.whitening_kind()
        self.details = {"whiten": kind, "target": opts.target, "keep": opts.keep, "layers": {}, "skipped": {}}
        if opts.target == "flops":
            common.ShapeInferencePass(strict_mode=False)(model)  # a Conv's FLOPs need its output size
        matrices = self._find(model)
        if not matrices:
            return ir.passes.PassResult(model, modified=False)
        with tempfile.TemporaryDirectory(prefix="kiln-lowrank-") as tmp:
            stats = self._statistics(model, matrices, Path(tmp)) if kind != "none" else None
            curves = []
            for matrix in matrices:
                w = matrix.load()
                curves.append(self._curve(matrix, self._whitening(matrix, stats).energy(w)))
                del w
            ranks = self._ranks(matrices, curves)
            names = _weights.NameScope(model)
            for matrix, r in zip(matrices, ranks):
                if r is None:
                    for site in matrix.sites:
                        self.details["skipped"][site.label] = self._dense_reason(matrix)
            chosen = [(matrix, r) for matrix, r in zip(matrices, ranks) if r is not None]
            self._factor_all(model, chosen, stats, names)
        self.details["params_before"] = sum(matrix.k * matrix.n for matrix in matrices)
        self.details["params_after"] = sum(
            matrix.k * matrix.n if r is None else r * (matrix.k + matrix.n) for matrix, r in zip(matrices, ranks)
        )
        if opts.target == "flops":
            self.details["flops_before"] = sum(c.dense_cost or 0.0 for c in curves)
            self.details["flops_after"] = sum(
                c.dense_cost if r is None else r * c.unit_cost for c, r in zip(curves, ranks)
            )
        return ir.passes.PassResult(model, modified=any(r is not None for r in ranks))

    # -- finding what to factor --------------------------------------------------------------------------------

    def _find(self, model: ir.Model) -> list[Matrix]:
        skipped: dict[str, str] = self.details["skipped"]
        by_weight: dict[ir.Value, list[Site]] = {}
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.options.op_types:
                continue
            label = node.name or f"{node.op_type}:{node.outputs[0].name}"
            site = self._inspect(node, label)
            if isinstance(site, str):
                skipped[label] = site
            else:
                by_weight.setdefault(node.inputs[1], []).append(site)  # type: ignore[arg-type]
        matrices = []
        for weight, sites in by_weight.items():
            reason = _weights.replace_blocker(weight, {(site.node, 1) for site in sites})
            if reason is None and len({(site.layout, site.shape) for site in sites}) > 1:
                reason = f"weight {weight.name!r} is used in different layouts (MatMul, Gemm transB, Conv)"
            first = sites[0]
            k, n = _matrix_shape(first)
            max_rank = math.floor((1 - self.options.min_saving) * k * n / (k + n))
            if reason is None and max_rank < 1:
                reason = (
                    f"no rank saves {self.options.min_saving:.0%} of the parameters: "
                    f"rank 1 costs K+N={k + n} of K*N={k * n}"
                )
            if reason is not None:
                for site in sites:
                    skipped[site.label] = reason
                continue
            matrices.append(Matrix(weight, sites, k, n, max_rank))
        return matrices

    def _inspect(self, node: ir.Node, label: str) -> Site | str:
        """The site for ``node``, or why it is skipped."""
        if label in self.options.exclude:
            return "excluded by option 'exclude'"
        op = node.op_type
        attrs = node.attributes
        if op == "Gemm":
            if attrs.get_int("transA", 0):
                return "Gemm with transA=1 is not handled"
            alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
            if alpha != 1.0 or (len(node.inputs) > 2 and node.inputs[2] is not None and beta != 1.0):
                return f"Gemm with alpha={alpha}, beta={beta} is not handled (only 1)"
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "node has no weight input"
        weight = node.inputs[1]
        tensor = _weights.constant_tensor(weight)
        if tensor is None:
            return f"weight {weight.name!r} is not a constant (initializer or Constant node)"
        if weight.is_graph_input():
            return f"weight {weight.name!r} is a graph input (it can be overridden at run time)"
        if tensor.dtype not in _FLOAT_TYPES:
            return f"weight {weight.name!r} has dtype {tensor.dtype.name}: only FLOAT and FLOAT16 are factored"
        shape = tuple(int(d) for d in tensor.shape.numpy())
        if op in ("MatMul", "Gemm"):
            if len(shape) != 2:
                return f"weight {weight.name!r} has shape {list(shape)}: only 2-D matmul weights are factored"
            layout = "transposed" if op == "Gemm" and attrs.get_int("transB", 0) else "matmul"
            return Site(label, node, layout, shape, 1)
        if len(shape) < 3:
            return f"Conv weight {weight.name!r} has shape {list(shape)}: expected [M, C, *kernel]"
        group = attrs.get_int("group", 1)
        if group != 1:
            if shape[1] == 1:
                return f"depthwise Conv (group={group}): each filter reads one input channel, nothing to factor"
            return f"grouped Conv (group={group}) is not factored (only group=1)"
        out = node.outputs[0].shape
        spatial = None if out is None else list(out)[2:]
        positions = math.prod(spatial) if spatial and all(isinstance(d, int) for d in spatial) else None
        return Site(label, node, "conv", shape, positions, whiten.Patches.of(node, shape[2:]))

    # -- statistics and ranks ----------------------------------------------------------------------------------

    def _statistics(self, model: ir.Model, matrices: list[Matrix], directory: Path) -> whiten.Statistics | None:
        """Hook for the whitened pass: collect input statistics; plain SVD needs none."""
        return None

    def _whitening(self, matrix: Matrix, stats: whiten.Statistics | None) -> whiten.Whitening:
        return whiten.Whitening("none")

    def _curve(self, matrix: Matrix, energy: np.ndarray) -> rank.Curve:
        cost = float(matrix.positions()) if self.options.target == "flops" else 1.0
        max_rank = min(matrix.max_rank, len(energy))
        return rank.Curve(
            energy=energy,
            scale=float(energy.sum()),
            unit_cost=(matrix.k + matrix.n) * cost,
            dense_cost=matrix.k * matrix.n * cost,
            min_rank=min(self.options.rank_step, max_rank),
            max_rank=max_rank,
        )

    def _ranks(self, matrices: list[Matrix], curves: list[rank.Curve]) -> list[int | None]:
        opts = self.options
        if opts.target == "energy":
            return [rank.energy_rank(curve, opts.keep, opts.rank_step) for curve in curves]
        budget = opts.keep * sum(curve.dense_cost or 0.0 for curve in curves)
        self.details["budget"] = budget
        return rank.allocate(curves, budget, opts.rank_step, opts.error_power)

    def _dense_reason(self, matrix: Matrix) -> str:
        if self.options.target == "energy":
            return (
                f"keeping {self.options.keep:.0%} of its energy needs a rank above {matrix.max_rank}, "
                f"which saves less than min_saving={self.options.min_saving}"
            )
        return "kept dense by the rank allocation: its error per parameter saved is higher than elsewhere"

    # -- rewriting ---------------------------------------------------------------------------------------------

    def _factor_all(
        self,
        model: ir.Model,
        chosen: list[tuple[Matrix, int]],
        stats: whiten.Statistics | None,
        names: _weights.NameScope,
    ) -> None:
        """Factor each matrix at its rank, all from the statistics collected on the unmodified model."""
        for matrix, r in chosen:
            self._factor(matrix, r, self._whitening(matrix, stats), names)

    def _factor(
        self,
        matrix: Matrix,
        r: int,
        whitening: whiten.Whitening,
        names: _weights.NameScope,
        refit: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Replace ``matrix`` by its rank-``r`` factors; ``refit``: ``(E[x̂^T x], E[x^T x])`` of a sequential pass,
        whose factors approximate the refit target (:meth:`whiten.Whitening.refit`) instead of the weight."""
        w = matrix.load()
        target = w if refit is None else whitening.refit(w, refit[0])
        a, b, energy = whitening.truncated(target, r)
        dtype = np.float16 if matrix.weight.dtype == ir.DataType.FLOAT16 else np.float32
        a, b = a.astype(dtype), b.astype(dtype)
        total = float(energy.sum())
        layer: dict[str, Any] = {
            "K": matrix.k,
            "N": matrix.n,
            "rank": r,
            "max_rank": matrix.max_rank,
            "kept_energy": float(energy[:r].sum()) / total if total else 1.0,
            "tail_rel_error": math.sqrt(float(energy[r:].sum()) / total) if total else 0.0,
            "params_before": matrix.k * matrix.n,
            "params_after": r * (matrix.k + matrix.n),
            "whitened": matrix.whitened,
        }
        if whitening.gram is not None and refit is None:
            d = w.astype(np.float64) - a.astype(np.float64) @ b.astype(np.float64)
            signal = float(np.einsum("kn,kn->", w, whitening.gram @ w, dtype=np.float64))
            error = float(np.einsum("kn,kn->", d, whitening.gram @ d))
            layer["output_rel_error"] = math.sqrt(error / signal) if signal > 0 else 0.0
        elif whitening.gram is not None and refit is not None:
            # Against the original layer's outputs, including what the layers before it changed.
            new = a.astype(np.float64) @ b.astype(np.float64)
            error, signal = refit_error(w, new, (whitening.gram, *refit))
            layer["output_rel_error"] = math.sqrt(error / signal) if signal > 0 else 0.0
            layer["refit"] = True
        if matrix.whitened:
            layer["calibration_rows"] = matrix.rows
        del w

        graph = _weights.defining_graph(matrix.weight)
        assert graph is not None  # a constant's graph
        base = matrix.weight.name or matrix.sites[0].label
        if matrix.layout == "conv":
            m, c, *kernel = matrix.sites[0].shape
            a_array = np.ascontiguousarray(a.T).reshape(r, c, *kernel)
            b_array = np.ascontiguousarray(b.T).reshape(m, r, *[1] * len(kernel))
        else:
            a_array, b_array = a, b
        a_value = _weights.add_initializer(graph, names.fresh(f"{base}_lowrank_a"), a_array)
        b_value = _weights.add_initializer(graph, names.fresh(f"{base}_lowrank_b"), b_array)
        for site in matrix.sites:
            self._rewrite(site, a_value, b_value, r, names)
            self.details["layers"][site.label] = layer | ({"shared_weight": True} if len(matrix.sites) > 1 else {})
        _weights.remove_if_unused(matrix.weight)

    @staticmethod
    def _rewrite(site: Site, a: ir.Value, b: ir.Value, r: int, names: _weights.NameScope) -> None:
        """Replace ``site.node`` by its two factors, keeping its output value's name and consumers."""
        node = site.node
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        x = node.inputs[0]
        assert x is not None
        old = node.outputs[0]
        bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        if site.layout == "conv":
            attributes = {name: attr.value for name, attr in node.attributes.items() if name != "group"}
            first = ir.node("Conv", [x, a], attributes=attributes, name=names.fresh(f"{site.label}_lowrank_a"))
            ones = [1] * (len(site.shape) - 2)
            second = ir.node(
                "Conv", [first.outputs[0], b, *bias], attributes={"kernel_shape": ones}, name=names.fresh(site.label)
            )
            hidden = None if old.shape is None else ir.Shape([old.shape[0], r, *list(old.shape)[2:]])
        else:
            first = ir.node("MatMul", [x, a], name=names.fresh(f"{site.label}_lowrank_a"))
            op = "Gemm" if node.op_type == "Gemm" else "MatMul"
            second = ir.node(op, [first.outputs[0], b, *bias], name=names.fresh(site.label))
            hidden = None if x.shape is None else ir.Shape([*list(x.shape)[:-1], r])
        first.outputs[0].name = names.fresh(f"{old.name or site.label}_lowrank")
        first.outputs[0].type, first.outputs[0].shape = a.type, hidden
        graph.insert_before(node, [first, second])
        out = second.outputs[0]
        out.type, out.shape = old.type, old.shape
        name = old.name
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = name


@register("lowrank.asvd")
class ActivationAwareSVD(LowRankSVD):
    """Activation-aware low-rank factorization: truncated SVD of the whitened weight, minimizing output error.

    Needs calibration data. ``whiten="cov"`` uses the input Gram (SVD-LLM), ``"diag"`` per-channel input RMS.
    """

    Options = ASVDOptions
    needs_calibration = True

    def whitening_kind(self) -> whiten.Kind:
        return self.options.whiten

    def _statistics(self, model: ir.Model, matrices: list[Matrix], directory: Path) -> whiten.Statistics:
        start = time.perf_counter()
        dims: dict[whiten.StatKey, int] = {}
        for matrix in matrices:
            matrix.keys = self._keys(matrix, model.graph)
            dims.update(dict.fromkeys(matrix.keys, matrix.k))
        stats = whiten.Statistics(directory, full=self.options.whiten == "cov")
        assert self.context.calibration is not None  # checked by requires()
        passes = 0
        if dims:
            passes = stats.collect(self.context.calibration, model, dims, self.options.stats_memory_mb << 20)
        for matrix in matrices:
            matrix.rows = sum(stats.rows[key] for key in matrix.keys)
        self.details["calibration"] = {
            "statistics": len(dims),
            "passes": passes,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return stats

    def _factor_all(
        self,
        model: ir.Model,
        chosen: list[tuple[Matrix, int]],
        stats: whiten.Statistics | None,
        names: _weights.NameScope,
    ) -> None:
        """With ``sequential``, walk the layer inputs in graph order (:class:`kiln.compiler.sequential.Sequential`):
        the matrices reading one tensor are refitted from statistics of the model as factored so far. A matrix
        that reads several tensors (a weight shared by nodes with different inputs) is factored from the
        unmodified model's statistics, first."""
        if not self.options.sequential:
            super()._factor_all(model, chosen, stats, names)
            return
        start = time.perf_counter()
        reference = model.clone()
        staged, others = [], []
        for pair in chosen:
            (staged if len({key[0] for key in pair[0].keys}) == 1 else others).append(pair)
        super()._factor_all(model, others, stats, names)
        by_tensor: dict[str, list[tuple[Matrix, int]]] = {}
        for matrix, r in walk_order(model.graph, staged, lambda pair: [pair[0].keys[0][0]]):
            by_tensor.setdefault(matrix.keys[0][0], []).append((matrix, r))
        assert self.context.calibration is not None  # checked by requires()
        walk = Sequential(self.context.calibration, model, reference)
        for tensor, members in by_tensor.items():
            reducers = {
                key: CrossGram(None if key[1] is None else key[1].rows) for matrix, _ in members for key in matrix.keys
            }
            walk.collect({tensor: list(reducers.values())})
            for matrix, r in members:
                gram, cross, ref = (sum(parts) for parts in zip(*(reducers[key].value for key in matrix.keys)))
                whitening = whiten.Whitening("cov", gram, self.options.damp)
                self._factor(matrix, r, whitening, names, refit=(cross, ref))
        self.details["sequential"] = {
            "steps": len(by_tensor),
            "seconds": round(time.perf_counter() - start, 3),
        }

    @staticmethod
    def _keys(matrix: Matrix, main: ir.Graph) -> list[whiten.StatKey]:
        """The statistics a matrix's whitening sums: one per main-graph site's (input, Conv geometry)."""
        keys: list[whiten.StatKey] = []
        for site in matrix.sites:
            x = site.node.inputs[0]
            if site.node.graph is main and x is not None and x.name:
                key = (x.name, site.patches)
                if key not in keys:
                    keys.append(key)
        return keys

    def _whitening(self, matrix: Matrix, stats: whiten.Statistics | None) -> whiten.Whitening:
        if not matrix.keys or stats is None:
            return whiten.Whitening("none")
        first, *others = matrix.keys
        moments = sum((stats.get(key) for key in others), start=stats.get(first))
        return whiten.Whitening(self.options.whiten, moments, self.options.damp)


def _matrix_shape(site: Site) -> tuple[int, int]:
    """(K, N) of a site's weight in its matrix view."""
    if site.layout == "matmul":
        return site.shape[0], site.shape[1]
    if site.layout == "transposed":
        return site.shape[1], site.shape[0]
    return math.prod(site.shape[1:]), site.shape[0]
