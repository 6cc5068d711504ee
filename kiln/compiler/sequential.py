"""Sequential calibration: statistics of a model's layers in graph order, each taken after the layers before it
were rewritten, for about the cost of one pass over the calibration data.

A pass that rewrites a model one layer at a time (low-rank factoring, quantizing) does best when layer ``s`` is fitted
to the inputs it will really see: those computed by the already rewritten layers before it, not the float model's.
Running the model from its inputs again for every layer costs a pass per layer (GPTQ's ``stages`` pay that, at a
coarse granularity). Here each calibration feed keeps its *frontier* between steps: the tensors computed before a
cut in the graph's node order and read at or after it (in a transformer: the residual stream, the rotary tables
and the attention mask; in a CNN: the current feature map and any skip connection). A step extracts only the nodes
between the previous cut and the next one (``onnx_ir.convenience.extract``), runs them in ONNX Runtime on the
cached frontier, and keeps the new frontier. The rewrites a caller makes between steps lie after the cut, so they
are in the segments still to run.

With a ``reference`` (the model before any rewrite, cut at the same tensors) the same segments of the unmodified
model run side by side, and every reducer receives pairs of batches: the reference's and the rewritten model's
values of its tensor for the same feed. That is what a least-squares refit needs to map the rewritten model's
inputs back to the original layer's outputs.

Memory: one frontier per feed and model, held in memory (SmolLM2, 512 tokens: a few MB per feed). Constant-folded
values (outputs of ``Constant`` nodes) are never cached; their nodes are re-run inside each segment that needs them.
"""

from __future__ import annotations

import abc
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort

from kiln.compiler.calibration import CalibrationData, Feed
from kiln.errors import CalibrationError
from kiln.targets.ort.runner import make_session


class PairReducer(abc.ABC):
    """Running statistic of one tensor over calibration batches, seen in the reference and the rewritten model."""

    @abc.abstractmethod
    def update(self, reference: np.ndarray, current: np.ndarray) -> None:
        """Fold one batch: the tensor's value in the reference model and in the rewritten one, for the same feed."""


class CrossGram(PairReducer):
    """Second moments of a tensor's rows in the rewritten model (``x̂``) and the reference (``x``), row by row:
    ``E[x̂^T x̂]``, ``E[x̂^T x]`` and ``E[x^T x]``, what a least-squares refit of the layer reading it needs.

    Rows are the last axis, or what ``rows`` makes of a batch (a Conv's input patches).
    """

    def __init__(self, rows: Callable[[np.ndarray], Iterable[np.ndarray]] | None = None) -> None:
        self.rows = rows
        self.sums: list[np.ndarray] | None = None
        self.count = 0

    def _rows(self, array: np.ndarray) -> Iterable[np.ndarray]:
        return [array.reshape(-1, array.shape[-1])] if self.rows is None else self.rows(array)

    def update(self, reference: np.ndarray, current: np.ndarray) -> None:
        for x, y in zip(self._rows(reference), self._rows(current)):
            x32 = x.astype(np.float32, copy=False)
            y32 = y.astype(np.float32, copy=False)
            batch = [(a.T @ b).astype(np.float64) for a, b in ((y32, y32), (y32, x32), (x32, x32))]
            self.sums = batch if self.sums is None else [a + b for a, b in zip(self.sums, batch)]
            self.count += x.shape[0]

    @property
    def value(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(E[x̂^T x̂], E[x̂^T x], E[x^T x])``."""
        if self.sums is None or self.count == 0:
            raise CalibrationError("no calibration rows reached this tensor")
        gram, cross, reference = (total / self.count for total in self.sums)
        return gram, cross, reference


def refit_target(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, lam: float) -> np.ndarray:
    """``(G + λ I)^-1 (C W + λ W)``: the weight [K, N] that best maps a rewritten model's inputs (Gram ``G``) to the
    original outputs (``C = E[x̂^T x]``), damped toward ``W``; in float64."""
    w64 = np.asarray(w, dtype=np.float64)
    return np.linalg.solve(gram + lam * np.eye(len(gram)), cross @ w64 + lam * w64)


def refit_error(
    w: np.ndarray, new: np.ndarray, moments: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """``(E||x W - x̂ W'||^2, E||x W||^2)`` from :class:`CrossGram`'s ``(G, C, G_x)``:
    ``tr(W^T G_x W) - 2 tr(W^T C^T W') + tr(W'^T G W')``, the error against the original layer's outputs."""
    gram, cross, reference = moments
    w64 = np.asarray(w, dtype=np.float64)
    new64 = np.asarray(new, dtype=np.float64)
    signal = float(np.einsum("kn,kn->", w64, reference @ w64))
    error = signal - 2 * float(np.einsum("kn,kn->", w64, cross.T @ new64))
    error += float(np.einsum("kn,kn->", new64, gram @ new64))
    return max(error, 0.0), signal


class _Model:
    """One model's side of the walk: its graph and the frontier of every feed."""

    def __init__(self, model: ir.Model, feeds: list[Feed]) -> None:
        self.model = model
        self.frontiers: list[Feed] = [dict(feed) for feed in feeds]
        #: The tensors of the last step: the cut lies after their producers.
        self.previous: list[str] = []

    def advance(self, tensors: Sequence[str], directory: Path) -> list[Feed]:
        """Run every feed up to the cut after the last producer of ``tensors``; the tensors' values per feed."""
        graph = self.model.graph
        order = list(graph)
        position = {node: i for i, node in enumerate(order)}
        values = _values(graph)
        missing = [name for name in tensors if name not in values]
        if missing:
            raise CalibrationError(f"no tensor named {missing[0]!r} in the model")
        # The cut never moves back: a tensor produced before the previous cut (a skip connection) is still cached.
        after = [*tensors, *self.previous]
        cut = max((position[values[name].producer()] + 1 for name in after if _computed(values[name])), default=0)
        self.previous = list(tensors)
        known = set(self.frontiers[0])
        frontier = _frontier(order, position, cut, graph)
        wanted = list(dict.fromkeys([*frontier, *tensors]))
        outputs = [name for name in wanted if name not in known]
        if outputs:
            session, inputs = self._segment(values, self.frontiers[0], outputs, directory)
            for cache in self.frontiers:
                results = session.run(outputs, {name: cache[name] for name in inputs})
                cache.update(zip(outputs, results))
        taps = [{name: cache[name] for name in tensors} for cache in self.frontiers]
        for cache in self.frontiers:
            for name in list(cache):
                if name not in frontier:
                    del cache[name]
        return taps

    def _segment(
        self, values: Mapping[str, ir.Value], cached: Feed, outputs: list[str], directory: Path
    ) -> tuple[ort.InferenceSession, list[str]]:
        """A session for the nodes computing ``outputs`` from the ``cached`` tensors, and its input names
        (``values``: the graph's values by name).

        Inputs are typed from the cached arrays (intermediate values often carry no type), outputs by shape
        inference on the segment where the graph left them untyped.
        """
        from kiln.compiler.io import save

        needed = _needed_inputs(values, outputs, set(cached))
        segment = ir.convenience.extract(self.model.graph, inputs=needed, outputs=outputs)
        for value in segment.inputs:
            array = cached[value.name]
            value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
            value.shape = ir.Shape([None] * array.ndim)
        model = ir.Model(segment, ir_version=self.model.ir_version, functions=self.model.functions.values())
        if any(value.type is None for value in segment.outputs):
            common.ShapeInferencePass(strict_mode=False)(model)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            path = save(model, Path(tmp) / "segment.onnx")
            session = make_session(path)
        return session, needed


class Sequential:
    """Walk the calibration feeds through ``model`` in graph order (module docstring).

    ``model`` is the object the caller rewrites between steps; ``reference``, when given, is a copy taken before any
    rewrite (``model.clone()``), run side by side. Steps go forward in graph order: a step asking for a tensor
    produced before the previous cut gets it only while it is still cached (read after that cut).
    """

    def __init__(self, calibration: CalibrationData, model: ir.Model, reference: ir.Model | None = None) -> None:
        feeds = list(calibration)
        if not feeds:
            raise CalibrationError(f"calibration data {calibration.name!r} is empty")
        calibration.validate(model)
        self.current = _Model(model, feeds)
        self.reference = None if reference is None else _Model(reference, feeds)
        self.steps = 0

    def collect(self, reducers: Mapping[str, Sequence[PairReducer]]) -> None:
        """Advance to the cut after the last producer of ``reducers``' tensors and feed each reducer its tensor's
        (reference, current) batches; without a reference both are the current model's."""
        tensors = list(reducers)
        for ref, cur in self.step(tensors, tensors if self.reference is not None else ()):
            ref = ref if self.reference is not None else cur
            for name in tensors:
                for reducer in reducers[name]:
                    reducer.update(ref[name], cur[name])

    def cross_moments(self, tensors: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance to ``tensors`` and return :class:`CrossGram`'s ``(E[x̂^T x̂], E[x̂^T x], E[x^T x])`` of their
        last-axis rows, summed over the tensors (a weight read from several inputs)."""
        reducers = {name: CrossGram() for name in tensors}
        self.collect({name: [reducer] for name, reducer in reducers.items()})
        gram, cross, reference = (sum(parts) for parts in zip(*(reducer.value for reducer in reducers.values())))
        return gram, cross, reference

    def cached(self, name: str) -> bool:
        """Whether the rewritten model's values of ``name`` are cached at the walk's cut (read further on)."""
        return all(name in cache for cache in self.current.frontiers)

    def revise(self, name: str, function: Callable[[np.ndarray], np.ndarray]) -> None:
        """Apply ``function`` to the rewritten model's cached values of ``name``, in every feed.

        For a caller that changed how an already computed tensor is produced (a scale folded into a producer that
        lies before the cut): the nodes that made the cached values will not run again, so the cache must follow.
        """
        frontiers = self.current.frontiers
        if any(name not in cache for cache in frontiers):
            raise CalibrationError(f"tensor {name!r} is not cached at the walk's cut: nothing to revise")
        for cache in frontiers:
            cache[name] = function(cache[name])

    def step(self, current: Sequence[str], reference: Sequence[str] = ()) -> list[tuple[Feed, Feed]]:
        """Advance the rewritten model past the producers of ``current`` and the reference past those of
        ``reference`` (each walk's cut moves on its own); per feed, the reference's values of ``reference`` and the
        rewritten model's values of ``current``. All feeds' values are returned at once: they are held in the
        frontier cache anyway."""
        if reference and self.reference is None:
            raise CalibrationError("reference tensors asked of a sequential walk without a reference model")
        with tempfile.TemporaryDirectory(prefix="kiln-sequential-") as tmp:
            cur = self.current.advance(list(current), Path(tmp))
            ref = self.reference.advance(list(reference), Path(tmp)) if reference else [{} for _ in cur]
        self.steps += 1
        return list(zip(ref, cur))


_T = TypeVar("_T")


def walk_order(graph: ir.Graph, items: Iterable[_T], tensors: Callable[[_T], Iterable[str]]) -> list[_T]:
    """``items`` sorted (stably) by where the last of their ``tensors`` is computed in ``graph``'s node order: the
    order a walk must take them in (graph inputs first)."""
    position = {node: i for i, node in enumerate(graph)}
    values = _values(graph)

    def produced_at(item: _T) -> int:
        producers = (values[name].producer() for name in tensors(item))
        return max((-1 if node is None else position[node] for node in producers), default=-1)

    return sorted(items, key=produced_at)


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    return ir.convenience.create_value_mapping(graph, include_subgraphs=False)


def _computed(value: ir.Value) -> bool:
    """Computed by a node of the graph (not an input or initializer)."""
    return value.producer() is not None


def _reads(node: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """The main-graph values ``node`` reads, through its subgraphs' outer-scope references too."""
    reads = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            bodies = [attr.as_graph()]
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies = list(attr.as_graphs())
        else:
            continue
        for body in bodies:
            for inner in ir.traversal.RecursiveGraphIterator(body):
                reads += [v for v in inner.inputs if v is not None and v.graph is graph]
    return reads


def _frontier(order: list[ir.Node], position: dict[ir.Node, int], cut: int, graph: ir.Graph) -> set[str]:
    """Names of the values computed (or fed) before ``cut`` and read at or after it, constants excepted."""
    frontier: set[str] = set()
    for node in order[cut:]:
        for value in _reads(node, graph):
            producer = value.producer()
            if value.is_initializer() or not value.name:
                continue
            if producer is None:
                if value in graph.inputs:
                    frontier.add(value.name)
            elif producer.op_type != "Constant" and position[producer] < cut:
                frontier.add(value.name)
    return frontier


def _needed_inputs(values: Mapping[str, ir.Value], outputs: Sequence[str], known: set[str]) -> list[str]:
    """The cached tensors the nodes computing ``outputs`` read, walking back until a cached tensor stops the walk."""
    needed: list[str] = []
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        value = values[name]
        if name in known:
            needed.append(name)
            continue
        producer = value.producer()
        if producer is None:
            if not value.is_initializer():
                raise CalibrationError(f"tensor {name!r} is neither cached nor computable in this segment")
            continue
        for read in _reads(producer, value.graph):
            if read.name:
                stack.append(read.name)
    return sorted(needed)
