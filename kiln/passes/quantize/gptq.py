"""GPTQ weight-only quantization, and the calibrated base that AWQ and mixed precision share with it.

Statistics. For a layer ``y = x W`` (``W`` [K, N]) and calibration rows ``x`` [K], kiln collects the Gram matrix
``G = E[x^T x]`` (``calibration.Gram``) once per distinct input tensor (Q/K/V share one). Any quantized weight ``W'``
then has an exactly known mean squared output error on the calibration data::

    E ||x W - x W'||^2 = tr(D^T G D),   D = W - W'

which every calibrated pass reports per layer as ``output_rel_error = sqrt(tr(D^T G D) / tr(W^T G W))``, next to
``weight_rel_error = ||D|| / ||W||``. Grams are collected in chunks of at most ``stats_memory_mb`` (one ONNX Runtime
pass over the calibration data per chunk) and spilled to a temporary directory as float32, so memory holds one chunk
while collecting and one layer group's Gram while quantizing.

Stages (``stages``). Statistics collected in one go describe the float model's activations, but a quantized model
feeds its later layers slightly different ones. With ``stages = S`` the layer groups are split, in graph order, into
S stages, and a stage's statistics are collected once the stages before it have been rewritten (ONNX Runtime runs
their quantized kernels), so GPTQ compensates for the inputs later layers really receive: the reference
implementation's sequential order, at stage granularity. Calibration runs only the nodes the requested tensors depend
on, so S stages cost about (S + 1) / 2 passes. SmolLM2 at 3 bits, group 128 (fp32 perplexity 24.22): with 8
calibration windows 35.65 with 1 stage, 34.87 with 6, 34.16 with 15, 34.14 with 30; with 128 windows 33.79 with 1,
32.66 with 8, 31.99 with 16. Errors compound more at 2 bits: group 64, 8 windows, 150.6 with 1 stage, 84.2 with 16.

Sequential refit (``sequential``). Stages still fit each layer to its *own* inputs. With ``sequential`` every layer
group is quantized in graph order from the inputs ``x̂`` that the already quantized groups give it, collected by
:class:`kiln.compiler.sequential.Sequential` side by side with the float model's ``x`` for the same rows, and the
target is the float model's output ``x W``. With ``G = E[x̂^T x̂]``, ``C = E[x̂^T x]`` and ``H = G + λ I``::

    E ||x W - x̂ W'||^2 + λ ||W - W'||^2 = tr((W* - W')^T H (W* - W')) + const,   W* = H^-1 (C W + λ W)

so GPTQ runs unchanged on the refit target ``W*`` with Hessian ``H`` (the asymmetric calibration of GPTAQ, Li et
al. 2025): each layer absorbs part of the error of the layers before it. With ``x̂ = x``, ``W* = W``. SmolLM2
(fp32 24.22): W4 g128 25.75 -> 25.10 with 128 windows; W3 g128 31.99 (16 stages, 128 windows) -> 30.13 (32
windows); W2 g64 on 8 windows 84.2 (16 stages) -> 89.1, too few tokens for the cross moments at 2 bits.

GPTQ (Frantar et al., "OPTQ"). ``H = G + lambda I`` with ``lambda = damp * mean(diag(G))``. Rows of ``W`` (input
features) are quantized in order; after row r, the rows not yet quantized absorb its error so that the output error
stays minimal (the Optimal Brain Surgeon update)::

    W[r+1:] -= Hinv_r[r+1:, r] (w_r - q_r) / Hinv_r[r, r]

where ``Hinv_r`` is the inverse of ``H`` restricted to rows r.. . With ``U`` the upper Cholesky factor of ``H^-1``
(``H^-1 = U^T U``), row r of U is ``Hinv_r[r, r:] / sqrt(Hinv_r[r, r])``, so the update is
``W[r+1:] -= U[r, r+1:]^T e_r`` with ``e_r = (w_r - q_r) / U[r, r]``. Lazy batches: within a block of
``block_size`` rows updates are applied row by row; the rows after the block receive the block's updates in one
matrix product ``W[b1:] -= U[b0:b1, b1:]^T E``. Rows are independent across output columns, so all weights sharing
an input (Q/K/V, gate/up) are quantized as one ``[K, sum N]`` problem.

Group scales. Without act-order, the (scale, zero point) of a group is computed from the group's rows as updated so
far, when its first row is reached (as in the reference implementation; the blocking is aligned so that those rows
are up to date). With ``act_order`` rows are processed by decreasing ``diag(H)``, and the group parameters are
"static": computed from the original weight before any update, per natural group along K. The codes stay in the
natural order, so the result is an ordinary grouped weight (no ``g_idx``): MatMulNBits' ``g_idx`` input would
leave the kernel's fast path, and ``DequantizeLinear`` has no equivalent. With ``clip`` (the default) a group's
range is not its min-max but the shrink ``r [lo, hi]``, ``r`` in ``{1, 0.95, ..., 0.55}``, that minimizes the
group's own output error ``d^T G_gg d`` (:func:`clip_search`, AWQ's clipping): on SmolLM2 at 4 bits, group 128,
this took perplexity from 27.99 to 26.47 (fp32: 24.22). With act-order the static ranges are chosen before the
sweep, so the error that counts is what each row's rounding costs once the rows after it have absorbed it:
``sum_k d_k^2 / [H^-1]_kk`` on the rows still open at k (``1 / U[k, k]^2``), not ``d^T G_gg d``. The two differ
where channels spike together on a few tokens (attention sinks): huge ``diag(G)``, but each predictable from the
others. On 12 SmolLM2 layer groups (blocks 0, 3, 29; 8 windows; groups of 128) the geometric-mean relative output
error fell 0.0030 -> 0.0028 at 3 bits and 0.0008 -> 0.0007 at 4. (Without act-order the range is fitted on rows
already compensated, and the block ``G_gg`` stays: the costs helped there on SmolLM2's layers, 0.0040 -> 0.0037,
but lost on a synthetic layer with such sinks, 0.107 -> 0.115.)

Deviation from the reference: an input channel that is 0 on all calibration rows (``diag(G) = 0``) gets ``H_ii = 1``
as there, but its weights are kept (the reference zeroes them); they cannot affect the calibration error either way,
and keeping them is safer for inputs the calibration never showed.

Bias correction (``bias_correction``): the layer's output is shifted by ``E[x] D``, its mean error on the calibration
data, folded into MatMulNBits' bias input or added with an ``Add``; the quantized layer's mean output then equals the
float one on the calibration data.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, ChannelMean, Gram, Reducer
from kiln.compiler.registry import register
from kiln.compiler.sequential import Sequential, refit_error, refit_target
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes.quantize import grid, pack
from kiln.passes.quantize.rtn import RTNOptions, WeightOnlyRTN, WeightSite
from kiln.passes.quantize.value_gram import value_grams

#: Column chunks keep temporaries of the [K, N] error products near 64 MB of float32.
_CHUNK_ELEMENTS = 1 << 24
#: Range shrinks tried by GPTQ's ``clip`` (AWQ's default grid: 20 steps, less than half the range).
CLIP_RATIOS = [1 - i / 20 for i in range(10)]
#: Rows updated one by one inside a lazy batch, at most (a smaller inner batch is cheaper; results are the same).
_INNER_ROWS = 32

#: A weight used by the matmuls of this pass, as the RTN base keys it: (weight value, stored transposed).
MemberKey = tuple[ir.Value, bool]


class BatchGram(Gram):
    """:class:`Gram` with each batch's product ``X^T X`` in float32 (sums across batches stay float64).

    Twice as fast as the float64 product; a batch's sum over a few thousand rows keeps a relative error near 1e-6,
    far below what quantization needs from the Hessian.
    """

    def update(self, array: np.ndarray) -> None:
        rows = array.reshape(-1, array.shape[-1]).astype(np.float32, copy=False)
        batch = (rows.T @ rows).astype(np.float64)
        self.sum = batch if self.sum is None else self.sum + batch
        self.count += rows.shape[0]


class Statistics:
    """Per-tensor calibration statistics, collected in memory-bounded chunks and kept on disk until used."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._index: dict[str, int] = {}

    def collect(
        self,
        calibration: CalibrationData,
        model: ir.Model,
        dims: dict[str, int],
        vectors: dict[str, Callable[[], Reducer]],
        memory_bytes: int,
    ) -> int:
        """Collect the Gram and the ``vectors`` statistics of each tensor in ``dims`` (name -> channels).

        Returns the number of passes over the calibration data. Each chunk's Grams (float64 while accumulating)
        fit in ``memory_bytes``; a tensor larger than that gets a chunk of its own.
        """
        chunks: list[list[str]] = []
        used = memory_bytes
        for name, k in dims.items():
            size = 8 * k * k
            if used + size > memory_bytes:
                chunks.append([])
                used = 0
            chunks[-1].append(name)
            used += size
        for chunk in chunks:
            reducers: dict[str, dict[str, Reducer]] = {
                name: {"gram": BatchGram()} | {kind: make() for kind, make in vectors.items()} for name in chunk
            }
            calibration.collect(model, {name: list(r.values()) for name, r in reducers.items()})
            for name, by_kind in reducers.items():
                index = self._index.setdefault(name, len(self._index))
                for kind, reducer in by_kind.items():
                    value = reducer.value  # type: ignore[attr-defined]
                    stored = value.astype(np.float32) if kind == "gram" else value
                    np.save(self.directory / f"{index}.{kind}.npy", stored)
            del reducers
        return len(chunks)

    def get(self, name: str, kind: str) -> np.ndarray:
        """A statistic as float64 (``"gram"`` [K, K], or a vector kind [K])."""
        array = np.load(self.directory / f"{self._index[name]}.{kind}.npy", mmap_mode="r")
        return np.array(array, dtype=np.float64)


@dataclasses.dataclass
class Group:
    """Weights whose matmuls read the same input tensors: one Hessian, searched or quantized together."""

    inputs: tuple[str, ...]
    members: list[MemberKey]
    k: int


@dataclasses.dataclass
class MemberResult:
    """What quantizing one member produced.

    ``q`` is what gets packed; ``dequantized`` is the [K, N] weight the layer effectively computes with, in the
    original weight's space (AWQ divides its input scale back out); ``column_scale`` multiplies the layer's output
    columns (AWQ folding a consumer's input scale into this layer), or None.
    """

    q: grid.QuantizedWeight
    dequantized: np.ndarray
    column_scale: np.ndarray | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CalibratedOptions(RTNOptions):
    """Options of the calibrated weight-only passes, on top of ``quantize.rtn``'s.

    * ``bias_correction``: add ``E[x] (W - W')`` to each layer's output (module docstring).
    * ``stats_memory_mb``: memory for Grams while collecting; more tensors than fit take extra calibration passes.
    """

    bias_correction: bool = False
    stats_memory_mb: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats_memory_mb <= 0:
            raise ValueError(f"stats_memory_mb must be positive, got {self.stats_memory_mb}")


class CalibratedWeightOnly(WeightOnlyRTN):
    """Base of the weight-only passes that use activation statistics; the graph rewriting is quantize.rtn's.

    Subclasses implement :meth:`quantize_group` and may override :meth:`prepare` (runs after statistics are
    collected, before any weight is rewritten) and :meth:`vector_statistics`. Matmuls inside If/Loop/Scan bodies
    cannot be observed by ONNX Runtime; they are rounded to nearest and reported with ``"calibrated": false``.
    """

    Options = CalibratedOptions
    needs_calibration = True

    def vector_statistics(self) -> dict[str, Callable[[], Reducer]]:
        """Per-channel statistics to collect for every input tensor besides the Gram, by kind."""
        return {"mean": ChannelMean} if self.options.bias_correction else {}

    def dq_opset(self) -> int:
        """The default-domain opset format 'dq' needs for the bit widths this pass may emit."""
        return pack.dq_min_opset(self.options.bits)

    def prepare(self, model: ir.Model, groups: list[Group]) -> None:
        """Hook run once statistics are available and before weights are rewritten."""

    def stages(self) -> int:
        """Calibration stages (``GPTQOptions.stages``). A pass whose :meth:`prepare` needs every layer's statistics
        at once (AWQ, mixed precision) keeps 1."""
        return 1

    def sequential(self) -> bool:
        """Refit each group to the original outputs from the quantized model's inputs (``GPTQOptions.sequential``);
        a pass whose :meth:`prepare` needs every layer's statistics (mixed precision) keeps False."""
        return False

    @abc.abstractmethod
    def quantize_group(self, group: Group, weights: list[np.ndarray]) -> list[MemberResult]:
        """Quantize the [K, N] weights of a group's members (in ``group.members`` order)."""

    # -- the run -------------------------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = None
        sites = self._find_sites(model)
        if sites and self.options.format == "dq" and self._ensure_opset(model, self.dq_opset()):
            opset = self.details.get("opset")
            sites = self._find_sites(model)  # the converter may have rebuilt nodes
        if not sites:
            return super().call(model)
        self._main = model.graph
        calibrated = [site for site in sites if site.node.graph is model.graph]
        self.sites = sites
        # Rewriting detaches the old nodes: remember, per calibrated site, its input and output tensor names.
        self.calibrated = {site.label: (_input_name(site), site.node.outputs[0].name) for site in calibrated}
        self._groups = self._make_groups(calibrated)
        self._group_of = {key: group for group in self._groups for key in group.members}
        self._pending = {}
        self._results = {}
        self._corrections = {}
        self._walk = None
        self._refits = {}
        stages = split_stages(self._groups, self.stages())
        self._stage_of = {group.inputs: stage for stage in stages for group in stage}
        self._model = model
        self._collected: set[str] = set()
        self._passes = 0
        self._stats_seconds = 0.0
        try:
            with tempfile.TemporaryDirectory(prefix="kiln-stats-") as tmp:
                self.stats = Statistics(Path(tmp))
                if self.sequential():
                    assert self.context.calibration is not None  # checked by requires()
                    self._walk = Sequential(self.context.calibration, model, model.clone())
                else:
                    self._collect_stage(stages[0])
                self.prepare(model, self._groups)
                prepared = self.details
                result = super().call(model)
                self.details = prepared | self.details
            if opset is not None:
                self.details["opset"] = opset
            self.details["calibration"] = {
                "tensors": len(self._collected),
                "passes": self._passes,
                "stages": len(stages),
                "seconds": round(self._stats_seconds, 3),
            }
            if self._walk is not None:
                self.details["calibration"]["sequential_steps"] = self._walk.steps
            self._finish(model)
        finally:
            self.release()
        return result

    def _collect_stage(self, groups: list[Group]) -> None:
        """Collect the statistics of ``groups``' inputs on the model as it is now (earlier stages quantized)."""
        start = time.perf_counter()
        dims = {name: group.k for group in groups for name in group.inputs if name not in self._collected}
        assert self.context.calibration is not None  # checked by requires()
        self._passes += self.stats.collect(
            self.context.calibration, self._model, dims, self.vector_statistics(), self.options.stats_memory_mb << 20
        )
        self._collected.update(dims)
        self._stats_seconds += time.perf_counter() - start

    def release(self) -> None:
        """Drop the state of a run: it references the model's weights, which must not outlive their graph."""
        self._model: ir.Model | None = None
        self._stage_of: dict[tuple[str, ...], list[Group]] = {}
        self.sites: list[WeightSite] = []
        self.calibrated: dict[str, tuple[str, str]] = {}
        self._groups: list[Group] = []
        self._group_of: dict[MemberKey, Group] = {}
        self._pending: dict[MemberKey, grid.QuantizedWeight] = {}
        self._results: dict[MemberKey, dict[str, Any]] = {}
        self._corrections: dict[tuple[MemberKey, str], np.ndarray] = {}
        self._walk: Sequential | None = None
        self.originals: dict[MemberKey, np.ndarray] = {}
        #: Per group (by its inputs), with ``sequential``: (E[x̂^T x̂], E[x̂^T x], E[x^T x]) of its input.
        self._refits: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _make_groups(self, sites: list[WeightSite]) -> list[Group]:
        inputs: dict[MemberKey, set[str]] = {}
        dims: dict[MemberKey, int] = {}
        for site in sites:
            key = (site.weight, site.transposed)
            inputs.setdefault(key, set()).add(_input_name(site))
            dims[key] = site.k
        groups: dict[tuple[str, ...], Group] = {}
        for key, names in inputs.items():
            tensors = tuple(sorted(names))
            group = groups.setdefault(tensors, Group(tensors, [], dims[key]))
            group.members.append(key)
        return list(groups.values())

    def hessian(self, group: Group) -> np.ndarray:
        """The group's Gram ``E[x^T x]`` (summed over its input tensors when a weight reads several); with
        ``sequential``, ``E[x̂^T x̂]`` of the inputs the quantized layers before it give."""
        if group.inputs in self._refits:
            return self._refits[group.inputs][0]
        return sum((self.stats.get(name, "gram") for name in group.inputs), start=np.zeros((group.k, group.k)))

    def _walk_to(self, group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance the sequential walk to ``group``'s inputs; their summed (gram, cross, reference) moments."""
        assert self._walk is not None
        start = time.perf_counter()
        moments = self._walk.cross_moments(group.inputs)
        self._collected.update(group.inputs)
        self._stats_seconds += time.perf_counter() - start
        self._refits[group.inputs] = moments
        return moments

    def _refit(self, w: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
        """The refit target ``(G + λ I)^-1 (C W + λ W)`` (module docstring), λ as in :func:`gptq`'s damping."""
        _, lam = damping(gram, self.options.damp)
        return refit_target(w, gram, cross, lam).astype(np.float32)

    def quantize_weight(self, weight: np.ndarray, site: WeightSite) -> grid.QuantizedWeight:
        key = (site.weight, site.transposed)
        group = self._group_of.get(key)
        if group is None or site.node.graph is not self._main:
            return super().quantize_weight(weight, site)
        if key not in self._pending:
            arrays = [weight if member == key else load_weight(member) for member in group.members]
            refit = None
            if self._walk is not None:
                refit = self._walk_to(group)
                targets = [self._refit(w, refit[0], refit[1]) for w in arrays]
            else:
                if not self._collected.issuperset(group.inputs):
                    self._collect_stage(self._stage_of[group.inputs])
                targets = arrays
            hessian = self.hessian(group)
            #: The group's unmodified weights while it is quantized (``quantize_group`` gets the refit targets).
            self.originals = dict(zip(group.members, arrays))
            means = {}
            if self.options.bias_correction:
                means = {name: self.stats.get(name, "mean") for name in group.inputs}
            for member, w, result in zip(group.members, arrays, self.quantize_group(group, targets)):
                self._pending[member] = result.q
                self._results[member] = self._describe(w, result, hessian, refit) | result.info
                for name, mean in means.items():
                    correction = mean @ (w.astype(np.float64) - result.dequantized)
                    if result.column_scale is not None:
                        correction = correction * result.column_scale
                    self._corrections[member, name] = correction
            del arrays
            self.originals = {}
        return self._pending.pop(key)

    @staticmethod
    def _describe(
        w: np.ndarray,
        result: MemberResult,
        hessian: np.ndarray,
        refit: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Weight and output errors; with ``refit`` the output error is against the original layer's outputs on
        the original inputs (:func:`kiln.compiler.sequential.refit_error`)."""
        w32 = np.asarray(w, dtype=np.float32)
        diff = w32 - result.dequantized
        norm = float(np.sqrt(np.square(w32, dtype=np.float64).sum()))
        info: dict[str, Any] = {
            "calibrated": True,
            "weight_rel_error": float(np.linalg.norm(diff) / norm) if norm else 0.0,
        }
        if refit is None:
            signal = quadratic(hessian, w32)
            error = quadratic(hessian, diff)
        else:
            error, signal = refit_error(w32, result.dequantized, refit)
            info["refit"] = True
        info["output_rel_error"] = math.sqrt(max(error, 0.0) / signal) if signal > 0 else 0.0
        return info

    def _finish(self, model: ir.Model) -> None:
        layers: dict[str, dict[str, Any]] = self.details["layers"]
        values = {v.name: v for node in model.graph for v in node.outputs if v.name}
        names = _weights.NameScope(model)
        errors = []
        for site in self.sites:
            layer = layers.get(site.label)
            if layer is None:
                continue
            if site.label not in self.calibrated:
                layer["calibrated"] = False
                continue
            result = self._results[site.weight, site.transposed]
            layer.update(result)
            errors.append(result["output_rel_error"])
            if self.options.bias_correction:
                input_name, output_name = self.calibrated[site.label]
                correction = self._corrections[(site.weight, site.transposed), input_name]
                self._add_bias(model.graph, values[output_name], correction, names)
                layer["bias_correction_norm"] = float(np.linalg.norm(correction))
        if errors:
            self.details["output_rel_error_mean"] = float(np.mean(errors))
            self.details["output_rel_error_max"] = float(np.max(errors))

    @staticmethod
    def _add_bias(graph: ir.Graph, output: ir.Value, correction: np.ndarray, names: _weights.NameScope) -> None:
        """Add the constant ``correction`` [N] to ``output``: into MatMulNBits' bias, else with an Add node."""
        producer = output.producer()
        dtype = np.float16 if output.dtype == ir.DataType.FLOAT16 else np.float32
        base = f"{output.name}_bias_correction"
        if producer is not None and producer.op_type == "MatMulNBits" and producer.domain == "com.microsoft":
            bias = producer.inputs[5] if len(producer.inputs) > 5 else None
            existing = None if bias is None else _weights.constant_array(bias)
            if bias is None or existing is not None:
                total = correction if existing is None else existing.astype(np.float64) + correction
                value = _weights.add_initializer(graph, names.fresh(base), total.astype(dtype))
                if len(producer.inputs) < 6:
                    producer.resize_inputs(6)
                producer.replace_input_with(5, value)
                if bias is not None:
                    _weights.remove_if_unused(bias)
                return
        value = _weights.add_initializer(graph, names.fresh(base), correction.astype(dtype))
        uses = list(output.uses())
        add = ir.node("Add", [output, value], name=names.fresh(f"{output.name}_bias_correction_add"))
        assert producer is not None  # a matmul's output
        graph.insert_after(producer, [add])
        corrected = add.outputs[0]
        corrected.type, corrected.shape = output.type, output.shape
        for use in uses:
            use.node.replace_input_with(use.idx, corrected)
        if output.is_graph_output():
            graph.outputs[graph.outputs.index(output)] = corrected
        name = output.name
        output.name = names.fresh(f"{name}_uncorrected")
        corrected.name = name


def split_stages(groups: list[Group], count: int) -> list[list[Group]]:
    """``groups`` (in graph order) cut into ``count`` consecutive stages of near-equal size, none empty."""
    count = max(1, min(count, len(groups)))
    return [groups[i * len(groups) // count : (i + 1) * len(groups) // count] for i in range(count)]


def _input_name(site: WeightSite) -> str:
    a = site.node.inputs[0]
    assert a is not None and a.name  # checked by the RTN base and by calibration
    return a.name


def load_weight(key: MemberKey) -> np.ndarray:
    """A member's weight in MatMul orientation [K, N], copied so that the memory-mapped file can be released."""
    value, transposed = key
    tensor = _weights.constant_tensor(value)
    assert tensor is not None  # the RTN base checked it
    array = tensor.numpy()
    copy = np.array(array.T if transposed else array)
    del array
    _weights.release(tensor)
    return copy


def column_chunks(k: int, n: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def damping(gram: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """The Gram's diagonal with dead channels (0 on every row) set to 1, and ``λ = damp * mean`` of it."""
    diagonal = np.diag(gram).copy()
    diagonal[diagonal == 0] = 1.0
    return diagonal, damp * float(diagonal.mean())


def quadratic(hessian: np.ndarray, d: np.ndarray) -> float:
    """``tr(D^T H D)`` for ``D`` [K, N], in float32 products accumulated in float64, a column chunk at a time."""
    h32 = hessian.astype(np.float32)
    total = 0.0
    for cols in column_chunks(*d.shape):
        chunk = np.asarray(d[:, cols], dtype=np.float32)
        total += float(np.einsum("kn,kn->", chunk, h32 @ chunk, dtype=np.float64))
    return total


def scale_dtype_of(w: np.ndarray) -> np.dtype:
    """Scales are stored in the weight's float type (float16 weights, float16 scales)."""
    return np.dtype(np.float16 if w.dtype == np.float16 else np.float32)


def split_columns(q: grid.QuantizedWeight, widths: list[int]) -> list[grid.QuantizedWeight]:
    """Cut a jointly quantized ``[K, sum N]`` weight back into its members' ``[K, N]`` weights."""
    parts = []
    start = 0
    for width in widths:
        cols = slice(start, start + width)
        zero_points = None if q.zero_points is None else q.zero_points[:, cols].copy()
        parts.append(grid.QuantizedWeight(q.codes[:, cols].copy(), q.scales[:, cols].copy(), zero_points, q.spec))
        start += width
    return parts


def clip_search(
    w: np.ndarray,
    gram: np.ndarray,
    spec: grid.GridSpec,
    ratios: list[float],
    scale_dtype: np.dtype,
    independent_ends: bool = False,
) -> grid.QuantizedWeight:
    """Quantize ``w`` [K, N] with, per (group, column), the range shrink minimizing that group's output error.

    The grid's range ``[lo, hi]`` becomes ``r [lo, hi]`` for each ``r`` in ``ratios``, or, with
    ``independent_ends`` on an asymmetric grid, ``[a lo, b hi]`` for every pair ``(a, b)`` of ratios (a group
    whose values lean to one side wants that side clipped more). The error of a group is ``d^T G_gg d`` with
    ``G_gg`` the group's diagonal block of ``gram`` (terms across groups are ignored, as AWQ does), or
    ``sum_k c_k d_k^2`` when ``gram`` is a vector ``c`` [K] of row costs (GPTQ's, see :func:`gptq`). Codes outside
    the shrunk range saturate.
    """
    if independent_ends and not spec.symmetric:
        shrinks = [(a, b) for a in ratios for b in ratios]
    else:
        shrinks = [(r, r) for r in ratios]
    k, n = w.shape
    g = spec.group_len(k)
    n_groups = spec.n_groups(k)
    if gram.ndim == 1:
        costs = np.zeros(n_groups * g, dtype=np.float32)
        costs[:k] = gram
        blocks = costs.reshape(n_groups, g, 1)
    else:
        padded = np.zeros((n_groups * g, n_groups * g), dtype=np.float32)
        padded[:k, :k] = gram
        blocks = np.stack([padded[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n_groups)])
        del padded
    scales = np.empty((n_groups, n), dtype=scale_dtype)
    zero_points = None if spec.symmetric else np.empty((n_groups, n), dtype=np.uint8)
    for cols in column_chunks(k, n):
        grouped = np.zeros((n_groups * g, cols.stop - cols.start), dtype=np.float32)
        grouped[:k] = w[:, cols]
        grouped = grouped.reshape(n_groups, g, -1)  # the padding rows round-trip to 0: no error there
        best = np.full((n_groups, grouped.shape[2]), np.inf)
        lo, hi = grouped.min(axis=1), grouped.max(axis=1)  # once per chunk: only the shrink changes below
        for a, b in shrinks:
            s, z = grid.scales_for_range(lo * np.float32(a), hi * np.float32(b), spec, scale_dtype)
            diff = grouped - grid.round_trip(grouped, s, z, spec)
            error = np.einsum("gin,gin->gn", diff, blocks * diff if gram.ndim == 1 else blocks @ diff)
            better = error < best
            best[better] = error[better]
            scales[:, cols][better] = s[better]
            if zero_points is not None and z is not None:
                zero_points[:, cols][better] = z[better]
    return grid.QuantizedWeight(grid.quantize_codes(w, scales, zero_points, spec), scales, zero_points, spec)


# -- GPTQ ----------------------------------------------------------------------------------------------------------


def _inverse_lower(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix by halves: ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``.

    Mostly matrix products (about n^3 / 3 flops), where a general inverse costs 2 n^3.
    """
    n = lower.shape[0]
    if n <= 128:
        return np.linalg.inv(lower)
    m = n // 2
    a = _inverse_lower(lower[:m, :m])
    d = _inverse_lower(lower[m:, m:])
    inverse = np.zeros_like(lower)
    inverse[:m, :m] = a
    inverse[m:, m:] = d
    inverse[m:, :m] = -d @ (lower[m:, :m] @ a)
    return inverse


def compensated_costs(u: np.ndarray, order: np.ndarray) -> np.ndarray:
    """What each row's rounding error costs once the rows after it in ``order`` have absorbed what they can:
    ``1 / [H^-1]_kk`` on the rows still open at k, ``= 1 / U[k, k]^2`` with ``U`` the upper Cholesky factor of the
    permuted ``H^-1`` (:func:`upper_inverse_cholesky`). Indexed by original row."""
    costs = np.empty(len(order), dtype=np.float64)
    costs[order] = 1.0 / np.square(np.diag(u).astype(np.float64))
    return costs


def upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper triangular ``U`` with ``H^-1 = U^T U``.

    With ``J`` the order reversal, ``J H J = L L^T`` gives ``H^-1 = (J L^-1 J)^T (J L^-1 J)``, and ``J L^-1 J`` is
    upper triangular: one Cholesky factorization and one triangular inverse.
    """
    reverse = np.arange(h.shape[0])[::-1]
    try:
        lower = np.linalg.cholesky(h[np.ix_(reverse, reverse)])
    except np.linalg.LinAlgError:
        raise KilnError("GPTQ: the damped Hessian is not positive definite (non-finite activations?)") from None
    return _inverse_lower(lower)[np.ix_(reverse, reverse)]


class _RowGrid:
    """One group's (scale, zero point) applied to single rows, exactly as :func:`grid.quantize_codes` does.

    GPTQ quantizes one row at a time; going through ``quantize_codes`` for each costs more than the arithmetic.
    """

    def __init__(self, scales: np.ndarray, zero_points: np.ndarray | None, spec: grid.GridSpec) -> None:
        self.scale = scales.astype(np.float32)
        with np.errstate(divide="ignore", over="ignore"):
            self.reciprocal = np.float32(1) / self.scale
        self.reciprocal[~np.isfinite(self.reciprocal)] = 0
        self.offset = np.float32(-spec.qmin) if zero_points is None else zero_points.astype(np.float32)
        self.top = spec.qmax - spec.qmin
        self.shift = spec.qmin if zero_points is None else 0

    def quantize(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unsigned codes shifted to the grid's range, dequantized row), both float32."""
        # The grid's own rounding (round half up, computed as MLAS does), so codes match quantize_codes exactly.
        q = np.clip(grid._round_half_up(row * self.reciprocal + self.offset), 0, self.top)
        return q + self.shift, (q - self.offset) * self.scale


def _blocking(k: int, group: int, block_size: int, dynamic_groups: bool) -> tuple[int, int]:
    """(lazy batch, inner batch) such that each group starts where the rows it reads are up to date.

    A group's first row must begin an inner batch, and a group reaching past its lazy batch must begin that batch.
    """
    if not dynamic_groups or group >= k or group % block_size == 0:
        block = block_size
    elif block_size % group == 0:
        return block_size, math.gcd(group, _INNER_ROWS)
    else:
        block = group
    return block, math.gcd(block, _INNER_ROWS)


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    spec: grid.GridSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_ratios: list[float] | None = None,
    scale_dtype: np.dtype | type | None = None,
    independent_ends: bool = False,
) -> grid.QuantizedWeight:
    """GPTQ of ``w`` [K, N] given the Gram ``hessian`` [K, K] of its input (module docstring).

    With ``clip_ratios``, each group's range is chosen by :func:`clip_search` (on the group's rows when they are
    reached, or on the original weight for act-order's static groups; ``independent_ends`` as there) instead of
    plain min-max. Works in float32 on the weight and float64 on the Hessian. ``scale_dtype`` defaults to the
    weight's float type.
    """
    k, n = w.shape
    scale_dtype = np.dtype(scale_dtype if scale_dtype is not None else scale_dtype_of(w))
    h = np.array(hessian, dtype=np.float64)
    diagonal, lam = damping(h, damp)
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(k)
    h[np.diag_indices(k)] = diagonal + lam
    u = upper_inverse_cholesky(h[np.ix_(order, order)]).astype(np.float32)
    del h

    work = np.asarray(w, dtype=np.float32)[order]
    codes = np.empty((k, n), dtype=spec.code_dtype)
    if act_order and clip_ratios:
        costs = compensated_costs(u, order)
        static = clip_search(np.asarray(w, dtype=np.float32), costs, spec, clip_ratios, scale_dtype, independent_ends)
        scales, zero_points = static.scales, static.zero_points
    elif act_order:
        scales, zero_points = grid.compute_scales(w, spec, scale_dtype)
    else:
        scales = np.empty((spec.n_groups(k), n), dtype=scale_dtype)
        zero_points = None if spec.symmetric else np.empty((spec.n_groups(k), n), dtype=np.uint8)
    row_spec = grid.GridSpec(spec.bits, 0, spec.symmetric)
    group = spec.group_len(k)
    grids: dict[int, _RowGrid] = {}
    if act_order:
        for g in range(spec.n_groups(k)):
            grids[g] = _RowGrid(scales[g], None if zero_points is None else zero_points[g], spec)
    block, inner = _blocking(k, group, block_size, not act_order)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        errors = np.empty((b1 - b0, n), dtype=np.float32)
        for i0 in range(b0, b1, inner):
            i1 = min(i0 + inner, b1)
            for r in range(i0, i1):
                source = int(order[r])
                g = source // group
                if not act_order and r % group == 0:
                    rows = slice(r, min(r + group, k))
                    if clip_ratios:
                        found = clip_search(
                            work[rows], hessian[rows, rows], row_spec, clip_ratios, scale_dtype, independent_ends
                        )
                        s, z = found.scales, found.zero_points
                    else:
                        s, z = grid.compute_scales(work[rows], row_spec, scale_dtype)
                    scales[g] = s[0]
                    if zero_points is not None:
                        zero_points[g] = z[0]
                    grids[g] = _RowGrid(scales[g], None if zero_points is None else zero_points[g], spec)
                q, dequantized = grids[g].quantize(work[r])
                codes[source] = q
                error = (work[r] - dequantized) / u[r, r]
                work[r + 1 : i1] -= u[r, r + 1 : i1, None] * error
                errors[r - b0] = error
            work[i1:b1] -= u[i0:i1, i1:b1].T @ errors[i0 - b0 : i1 - b0]
        work[b1:] -= u[b0:b1, b1:].T @ errors
    return grid.QuantizedWeight(codes, scales, zero_points, spec)


@dataclasses.dataclass
class GPTQOptions(CalibratedOptions):
    """Options of ``quantize.gptq``, on top of ``quantize.rtn``'s.

    * ``damp``: Hessian damping as a fraction of its mean diagonal.
    * ``block_size``: rows per lazy batch update.
    * ``act_order``: quantize input features by decreasing activation energy, with static group scales.
    * ``clip``: choose each group's range by its output error among shrinks ``1, 0.95, ..., 0.55`` (AWQ-style
      clipping, :func:`clip_search`) rather than the full min-max range.
    * ``clip_ends``: "joint" shrinks both ends of an asymmetric range by one ratio; "independent" searches the
      low and high ends separately (100 pairs instead of 10 ratios: about 9x the clipping time). SmolLM2 at 4
      bits, group 128 (fp32 24.22): GPTQ 26.19 joint, 26.07 independent on 32 calibration windows; 25.98 and
      25.75 on 128. At 3 bits (the gptq-w3 recipe, 16 stages, 128 windows) it was worse: 31.99 joint, 32.39
      independent; hence "joint" stays the default here.
    * ``stages``: split the layers, in graph order, into this many stages; each stage's statistics are collected
      with the stages before it already quantized (module docstring). Each stage costs a pass over the calibration
      data.
    * ``sequential``: instead of stages, quantize every layer group from the inputs the groups before it really
      give, with the original outputs as the target (module docstring, "Sequential refit"); about two passes over
      the calibration data in all (:mod:`kiln.compiler.sequential`).
    * ``value_hessian``: "input" prices every weight's error by its input's Gram; "attention" prices a value
      projection's error per KV head by the Gram of its attention-averaged inputs, what attention passes on
      (:mod:`kiln.passes.quantize.value_gram`; one more pass over the calibration data). Models without a
      recognized transformer structure keep "input", and the report says why. It pays with one pass of
      statistics (SmolLM2 at 3 bits: perplexity 35.36 -> 31.02), not with ``sequential`` (29.47 -> 29.62).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip: bool = True
    clip_ends: Literal["joint", "independent"] = "joint"
    stages: int = 1
    sequential: bool = False
    value_hessian: Literal["input", "attention"] = "input"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise ValueError(f"damp must be positive (it keeps the Hessian invertible), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.sequential and self.stages > 1:
            raise ValueError("sequential=True takes every layer group in order: leave stages at 1")
        if self.sequential and self.bias_correction:
            raise ValueError("sequential=True already refits each layer to the original outputs: no bias_correction")


@register("quantize.gptq")
class GPTQ(CalibratedWeightOnly):
    """Weight-only GPTQ: rounding errors compensated through the calibration Hessian, then packed like RTN.

    Needs calibration data. Weights sharing an input (Q/K/V, gate/up) share one Gram and are solved together.
    """

    Options = GPTQOptions

    def stages(self) -> int:
        return self.options.stages

    def sequential(self) -> bool:
        return self.options.sequential

    def prepare(self, model: ir.Model, groups: list[Group]) -> None:
        #: Value projections' per-KV-head Grams, by weight name (``value_hessian = "attention"``).
        self._value_grams: dict[str, list[np.ndarray]] = {}
        if self.options.value_hessian == "attention":
            assert self.context.calibration is not None  # checked by requires()
            start = time.perf_counter()
            self._value_grams, why = value_grams(model, self.context.calibration)
            self.details["value_hessian"] = {
                "layers": len(self._value_grams),
                "seconds": round(time.perf_counter() - start, 3),
            } | ({"skipped": why} if why else {})

    def quantize_group(self, group: Group, weights: list[np.ndarray]) -> list[MemberResult]:
        """Members quantized jointly against the group's Gram; a value projection with attention Grams
        (``value_hessian``) alone, one KV head's columns at a time against that head's Gram."""
        spec = self.options.spec
        values = [self._value_grams.get(str(value.name)) for value, _ in group.members]
        rest = [w for w, grams in zip(weights, values) if grams is None]
        joint = iter(self.joint(rest, self.hessian(group), spec) if rest else [])
        results = []
        for w, grams in zip(weights, values):
            if grams is None:
                q = next(joint)
                results.append(MemberResult(q, grid.dequantize(q)))
            else:
                blocks = np.split(w, len(grams), axis=1)
                q = grid.concatenate_columns([self.joint([b], h, spec)[0] for b, h in zip(blocks, grams)])
                results.append(MemberResult(q, grid.dequantize(q), info={"hessian": "attention"}))
        return results

    def joint(self, weights: list[np.ndarray], hessian: np.ndarray, spec: grid.GridSpec) -> list[grid.QuantizedWeight]:
        """GPTQ of weights sharing ``hessian``, as one problem over their concatenated columns."""
        opts = self.options
        joined = np.concatenate(weights, axis=1) if len(weights) > 1 else weights[0]
        q = gptq(
            joined,
            hessian,
            spec,
            damp=opts.damp,
            block_size=opts.block_size,
            act_order=opts.act_order,
            clip_ratios=CLIP_RATIOS if opts.clip else None,
            scale_dtype=scale_dtype_of(weights[0]),
            independent_ends=opts.clip_ends == "independent",
        )
        return split_columns(q, [w.shape[1] for w in weights])
