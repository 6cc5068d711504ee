"""``prune.blocks``: drop whole transformer blocks, or only their attention or only their MLP sublayers.

Math. A sublayer maps the residual stream ``h`` to ``h' = h + f(h)`` (pre-norm) or ``h' = LN(h + f(h))``
(post-norm). Dropping it sets ``h' = h``: every reader of ``h'`` reads ``h`` instead, and the branch ``f`` (with
its norm, projections and weights) is left dead and removed. A block is its attention and MLP sublayers together.

Which units go (``importance``):

* ``"block_influence"`` (ShortGPT): ``BI = 1 - cos(h, h')``, the mean over calibration tokens of how much the unit
  turns the residual stream; the ``count`` units of lowest BI are dropped. Needs calibration data.
* ``"stand_in_influence"``: Block Influence with the unit's stand-in (``compensation``) in place,
  ``1 - cos(h + f(h), h + s(h))`` per token: the turn of the residual stream the stand-in would miss. Every
  unit's stand-in is fitted first (one pass), scored (a second), and the dropped units keep theirs. On SmolLM2,
  dropping 15 of 30 attention sublayers with linear stand-ins, it gives perplexity 33.4 against 34.0 by plain Block
  Influence (128 calibration windows; 34.3 against 36.3 with 32).
* ``"output_error"``: the measured effect on the model's outputs of dropping each unit alone,
  ``sum_outputs ||y - y_0||^2 / ||y_0||^2`` averaged over the first ``error_feeds`` calibration batches; the units
  whose removal changes the outputs least go. Each unit gets a gate in a temporary copy of the graph,
  ``h' = h + g (f(h) - h)`` with ``g`` a scalar input, and ONNX Runtime runs once per unit and batch with that
  unit's gate at 0.
* ``"last"``: the last ``count`` units; ``"random"``: ``count`` units drawn with ``seed`` (the baselines).

What a dropped sublayer leaves behind (``compensation``):

* ``"none"``: nothing, as above.
* ``"mean"``: its mean output (FLAP's bias compensation, applied to a whole sublayer): the residual Add reads the
  constant ``E[f(h)]``, averaged over the calibration tokens, in place of the branch, so ``h' = h + E[f(h)]``
  (``LN(h + E[f(h)])`` post-norm).
* ``"linear"``: a least-squares linear map of the branch's input ``x`` (its projections' input: the normalized
  stream in pre-norm models), ``h' = h + x W + b``, fitted on the calibration tokens, optionally of low ``rank``
  (:mod:`kiln.passes.prune._linear`). It keeps what attention computes from the token itself and costs one
  d x d MatMul (or two thin ones) instead of the sublayer. ``fitted_from`` takes the stand-ins from a model this
  pass pruned before with the same units (a decode graph gets the maps fitted on its full graph: its calibration
  feeds hold one token per row, far too few for a d x d fit).

With ``sequential`` the linear stand-ins are fitted one after another in graph order, each on the pruned model as
it stands (earlier units already replaced), by :class:`kiln.compiler.sequential.Sequential` with the original
model side by side. The target is no longer the dropped branch but what puts the residual stream back where the
original model has it: ``h'_orig - ĥ``, the original sum after the Add minus the pruned model's residual input,
regressed on the pruned model's branch input ``x̂``. Each stand-in thus also absorbs the drift the units dropped
before it left in the stream. SmolLM2, 32 calibration windows: 6 of 30 blocks, perplexity 34.24 -> 33.14; 15 of 30
attention sublayers (stand-in influence), 34.3 -> 34.47, no gain: what those stand-ins miss is token mixing, which
no per-token map restores.

In a decode graph, an attention sublayer's KV cache goes with it: its ``past`` inputs and ``present`` outputs are
removed from the graph's signature (shape reads of a removed ``past`` input, e.g. for the past length, are moved to
a kept one of the same layout). Details record every unit's score, what was dropped and why, and the parameter
counts before and after.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Feed, Reducer
from kiln.compiler.io import load
from kiln.compiler.registry import register
from kiln.compiler.sequential import Sequential
from kiln.errors import CalibrationError, KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.prune import _edit, _gates, _linear, budget
from kiln.passes.prune._stats import CosineGap, channel_moments
from kiln.passes.prune.structure import Projection, Structure, Sublayer, find_structure, parameter_count

_CALIBRATED = ("block_influence", "stand_in_influence", "output_error")


@dataclasses.dataclass
class BlocksOptions:
    """Options of ``prune.blocks``.

    * ``unit``: "block" (attention + MLP), "attention" or "mlp" sublayers.
    * ``indices``: drop exactly these units (0-based; e.g. chosen on the full graph and applied to its decode graph);
      else ``count`` units when it is > 0; else ``fraction`` of them, rounded to the nearest count.
    * ``target``: "units" (the above), or "params" / "flops" / "latency": drop units in importance order until
      ``fraction`` of the model's parameters, multiply-adds (their projections' weights) or measured run time is
      gone; see :mod:`kiln.passes.prune.budget`.
    * ``importance``: "block_influence", "stand_in_influence" (sublayer units with a stand-in) or "output_error"
      (these need calibration), "last" or "random"; not used with ``indices``.
    * ``seed``: for ``importance = "random"``.
    * ``error_feeds``: calibration batches used by ``importance = "output_error"``.
    * ``compensation``: what a dropped sublayer leaves behind: "none", "mean" (its mean output) or "linear" (a
      fitted linear map of its input; a block gets one per sublayer); both need calibration unless ``fitted_from``
      is given.
    * ``rank``: with "linear", the stand-in's rank (0: full).
    * ``fitted_from``: with "linear", a model file pruned by this pass with the same units, whose stand-ins are
      reused instead of fitted.
    * ``sequential``: with "linear", fit the stand-ins in graph order on the pruned model, each to restore the
      original residual stream (module docstring); about two more passes over the calibration data.
    """

    unit: Literal["block", "attention", "mlp"] = "block"
    count: int = 0
    fraction: float = 0.25
    importance: Literal["block_influence", "stand_in_influence", "output_error", "last", "random"] = "block_influence"
    seed: int = 0
    error_feeds: int = 2
    compensation: Literal["none", "mean", "linear"] = "none"
    rank: int = 0
    fitted_from: str = ""
    indices: list[int] = dataclasses.field(default_factory=list)
    target: budget.Target = "units"
    sequential: bool = False

    def __post_init__(self) -> None:
        if self.unit not in ("block", "attention", "mlp"):
            raise ValueError(f"unit must be 'block', 'attention' or 'mlp', got {self.unit!r}")
        if self.importance not in (*_CALIBRATED, "last", "random"):
            raise ValueError(
                "importance must be 'block_influence', 'stand_in_influence', 'output_error', 'last' or 'random', "
                f"got {self.importance!r}"
            )
        if self.importance == "stand_in_influence" and (self.compensation == "none" or self.unit == "block"):
            raise ValueError(
                "importance 'stand_in_influence' scores the stand-in a dropped sublayer leaves: it needs compensation "
                "'mean' or 'linear' and unit 'attention' or 'mlp'"
            )
        if self.compensation not in ("none", "mean", "linear"):
            raise ValueError(f"compensation must be 'none', 'mean' or 'linear', got {self.compensation!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.compensation != "linear" and (self.rank or self.fitted_from or self.sequential):
            raise ValueError("rank, fitted_from and sequential shape linear stand-ins: they need compensation='linear'")
        if self.sequential and self.fitted_from:
            raise ValueError("sequential fits the stand-ins; fitted_from reads them: give one")
        if self.fitted_from and (self.count or self.target != "units"):
            raise ValueError(
                "fitted_from drops the units that model has stand-ins for (or indices): give no count or target"
            )
        if self.error_feeds < 1:
            raise ValueError(f"error_feeds must be >= 1, got {self.error_feeds}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")
        if self.count and self.indices:
            raise ValueError("give count or indices, not both")
        if len(set(self.indices)) != len(self.indices) or any(i < 0 for i in self.indices):
            raise ValueError(f"indices must be distinct and >= 0, got {self.indices}")
        budget.check_options(self.target, "global")
        if self.target != "units" and (self.count or self.indices):
            raise ValueError(f"target={self.target!r} drops units until 'fraction' is met: give no count or indices")


@register("prune.blocks")
class PruneBlocks(KilnPass):
    """Drop transformer blocks, or attention or MLP sublayers, by Block Influence or output error (or baselines)."""

    Options = BlocksOptions
    needs_calibration = True

    def requires(self, model: ir.Model) -> None:
        opts = self.options
        scored = opts.importance in _CALIBRATED and not (opts.indices or opts.fitted_from)
        fitted = opts.compensation == "mean" or (opts.compensation == "linear" and not opts.fitted_from)
        if scored or fitted:
            super().requires(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        if opts.target == "latency":
            return budget.meet_latency(self, model, field="fraction")
        structure = find_structure(model)
        units = _units(structure, opts.unit)
        fitted = _fitted_stand_ins(opts.fitted_from, opts.unit) if opts.fitted_from else None
        indices = opts.indices or sorted({int(re.search(r"\d+", key)[0]) for key in fitted or []})
        if any(i >= len(units) for i in indices):
            raise KilnError(f"prune.blocks: indices {indices} out of range for {len(units)} {opts.unit} units")
        spent = None
        if opts.target == "units":
            count = opts.count or len(indices) or round(opts.fraction * len(units))
            if count == 0:
                self.details = {"dropped": [], "reason": f"fraction {opts.fraction} of {len(units)} units rounds to 0"}
                return ir.passes.PassResult(model, modified=False)
            if count >= len(units):
                raise KilnError(f"prune.blocks: cannot drop {count} of the model's {len(units)} {opts.unit} units")
        scored_with_stand_ins = opts.importance == "stand_in_influence" and not indices
        fits = (
            self._fit(model, {_key(opts.unit, i, unit[0]): unit[0] for i, unit in enumerate(units)})
            if scored_with_stand_ins
            else None
        )
        scores = None if indices else self._scores(model, units, fits)
        if opts.target != "units":
            order = self._order(units, scores)
            count, spent = _count_for_budget(model, units, order, opts)
            drop = sorted(order[:count])
        else:
            drop = sorted(indices) if indices else sorted(self._order(units, scores)[:count])
        before = parameter_count(model)
        dropped_sublayers = [sub for i in drop for sub in units[i]]
        stand_ins = None
        if opts.compensation == "mean":
            _compensate(model, dropped_sublayers, self._branch_means(model, drop, units, fits))
        elif opts.compensation == "linear":
            stand_ins = self._stand_ins(model, {_key(opts.unit, i, s): s for i in drop for s in units[i]}, fitted, fits)
        else:  # last first: a dropped sublayer's output may be the residual input of the next dropped one
            for sublayer in reversed(dropped_sublayers):
                _bypass(model.graph, sublayer)
        removed: tuple[list[str], list[str]] = ([], [])
        if any(s.kind == "attention" and s.attention.past for s in dropped_sublayers):
            removed = _drop_cache(model, structure, [s for s in dropped_sublayers if s.kind == "attention"])
        _edit.finish(model)
        self.details = {
            "unit": opts.unit,
            "importance": opts.importance,
            "units": len(units),
            "dropped": [
                {"index": i, "score": scores[i] if scores else None, "outputs": [s.output.name for s in units[i]]}
                for i in drop
            ],
            "reason": _reason(opts),
            "compensation": opts.compensation,
            "stand_ins": stand_ins,
            "budget": spent,
            "scores": scores,
            "parameters_before": before,
            "parameters_after": parameter_count(model),
            # The KV cache of dropped attention sublayers leaves the graph's signature; verification expects it.
            "removed_inputs": removed[0],
            "removed_outputs": removed[1],
        }
        return ir.passes.PassResult(model, modified=True)

    def _scores(
        self, model: ir.Model, units: list[tuple[Sublayer, ...]], fits: dict[str, _linear.StandIn] | None
    ) -> list[float] | None:
        if fits is not None:  # stand_in_influence
            return self._stand_in_gaps(model, units, fits)
        if self.options.importance == "output_error":
            assert self.context.calibration is not None  # checked by requires()
            feeds = list(CalibrationData(lambda: iter(self.context.calibration), limit=self.options.error_feeds))
            return _output_errors(model, units, feeds)
        if self.options.importance != "block_influence":
            return None
        assert self.context.calibration is not None  # checked by requires()
        gaps = [CosineGap() for _ in units]
        reducers: dict[str, list[Reducer]] = {}
        for gap, unit in zip(gaps, units, strict=True):
            reducers.setdefault(unit[0].residual.name, []).append(gap.side("a"))
            reducers.setdefault(unit[-1].output.name, []).append(gap.side("b"))
        self.context.calibration.collect(model, reducers)
        return [gap.value for gap in gaps]

    def _stand_ins(
        self,
        model: ir.Model,
        dropped: dict[str, Sublayer],
        fitted: dict[str, list[np.ndarray]] | None,
        fits: dict[str, _linear.StandIn] | None,
    ) -> list[dict[str, object]] | None:
        """Put a linear stand-in in place of each dropped sublayer (``fits`` made while scoring, or fitted here, or
        ``fitted``: read from option ``fitted_from``); return each fit's record (None when read)."""
        opts = self.options
        names = _weights.NameScope(model)
        if fitted is not None:
            for key, sublayer in dropped.items():
                if key not in fitted:
                    raise KilnError(
                        f"prune.blocks: {opts.fitted_from} has no linear stand-in for {key} (it has "
                        f"{sorted(fitted)}); prune that model with compensation='linear' and the same units"
                    )
                _insert_stand_in(model, names, sublayer, _stand_in_name(key), fitted[key])
            return None
        if opts.sequential:
            return self._sequential_stand_ins(model, dropped, names)
        fits = fits or self._fit(model, dropped)
        return [_place_stand_in(model, names, key, sublayer, fits[key]) for key, sublayer in dropped.items()]

    def _sequential_stand_ins(
        self, model: ir.Model, dropped: dict[str, Sublayer], names: _weights.NameScope
    ) -> list[dict[str, object]]:
        """Fit and insert each stand-in in graph order, on the model pruned so far (option ``sequential``)."""
        assert self.context.calibration is not None  # checked by requires()
        opts = self.options
        walk = Sequential(self.context.calibration, model, model.clone())
        position = {node: i for i, node in enumerate(model.graph)}
        records = []
        for key, sublayer in sorted(dropped.items(), key=lambda item: position[item[1].add]):
            x = _first_projection(sublayer).input.name
            residual, after = sublayer.residual.name, sublayer.add.outputs[0].name
            moments = _linear.CrossMoments()
            for ref, cur in walk.step([x, residual], [after]):
                target = ref[after] - cur[residual]
                moments.combine(_rows(cur[x]), _rows(target))
            try:
                stand_in = _linear.fit(moments, opts.rank, linear=True)
            except CalibrationError as error:
                raise KilnError(f"prune.blocks: {key}: {error}") from error
            records.append(_place_stand_in(model, names, key, sublayer, stand_in) | {"sequential": True})
        return records

    def _branch_means(
        self,
        model: ir.Model,
        drop: list[int],
        units: list[tuple[Sublayer, ...]],
        fits: dict[str, _linear.StandIn] | None,
    ) -> dict[ir.Value, np.ndarray]:
        """The mean output of each dropped sublayer's branch: the mean stand-ins fitted while scoring, if any, else
        from one pass over the calibration data."""
        if fits is not None:
            return {s.branch: fits[_key(self.options.unit, i, s)].bias for i in drop for s in units[i]}
        assert self.context.calibration is not None  # checked by requires()
        branches = [s.branch for i in drop for s in units[i]]
        moments = channel_moments(self.context.calibration, model, branches)
        return {branch: moments[branch].mean for branch in branches}

    def _fit(self, model: ir.Model, sublayers: dict[str, Sublayer]) -> dict[str, _linear.StandIn]:
        """The stand-in (option ``compensation``) of each sublayer, fitted in one pass over the calibration data."""
        assert self.context.calibration is not None  # checked by requires()
        opts = self.options
        moments = {key: _linear.CrossMoments() for key in sublayers}
        reducers: dict[str, list[Reducer]] = {}
        for key, sublayer in sublayers.items():
            reducers.setdefault(_first_projection(sublayer).input.name, []).append(moments[key].side("x"))
            reducers.setdefault(sublayer.branch.name, []).append(moments[key].side("y"))
        self.context.calibration.collect(model, reducers)
        fits = {}
        for key in sublayers:
            try:
                fits[key] = _linear.fit(moments[key], opts.rank, linear=opts.compensation == "linear")
            except CalibrationError as error:
                raise KilnError(
                    f"prune.blocks: {key}: {error} (a decode graph's feeds hold one token per row: "
                    "prune its full graph first and pass that model as fitted_from)"
                ) from error
        return fits

    def _stand_in_gaps(
        self, model: ir.Model, units: list[tuple[Sublayer, ...]], fits: dict[str, _linear.StandIn]
    ) -> list[float]:
        """Each unit's Block Influence with its stand-in in place: the turn of the residual stream it would miss."""
        assert self.context.calibration is not None  # checked by requires()
        gaps = {i: _linear.StandInGap(fits[_key(self.options.unit, i, unit[0])]) for i, unit in enumerate(units)}
        reducers: dict[str, list[Reducer]] = {}
        for i, (sublayer,) in enumerate(units):
            reducers.setdefault(_first_projection(sublayer).input.name, []).append(gaps[i].side("x"))
            reducers.setdefault(sublayer.branch.name, []).append(gaps[i].side("y"))
            reducers.setdefault(sublayer.residual.name, []).append(gaps[i].side("h"))
        self.context.calibration.collect(model, reducers)
        return [gaps[i].value for i in range(len(units))]

    def _order(self, units: list[tuple[Sublayer, ...]], scores: list[float] | None) -> list[int]:
        """Unit indices, the first to drop first."""
        if scores is not None:
            return sorted(range(len(units)), key=lambda i: scores[i])
        if self.options.importance == "last":
            return list(range(len(units)))[::-1]
        return [int(i) for i in np.random.default_rng(self.options.seed).permutation(len(units))]


def _count_for_budget(
    model: ir.Model, units: list[tuple[Sublayer, ...]], order: list[int], opts: BlocksOptions
) -> tuple[int, dict[str, object]]:
    """How many units of ``order`` to drop for ``opts.fraction`` of the model's parameters or multiply-adds (net of
    linear stand-ins), and the budget's record."""
    target = opts.target
    budget.prepare(model, target)
    total = budget.model_total(model, target, [])
    goal, saved = opts.fraction * total, 0.0
    for count, index in enumerate(order[:-1], start=1):  # one unit always stays
        saved += sum(_unit_cost(sublayer, target) for sublayer in units[index])
        if opts.compensation == "linear":
            saved -= sum(_stand_in_cost(sublayer, target, opts.rank) for sublayer in units[index])
        if saved >= goal:
            return count, budget.record(target, opts.fraction, total, saved)
    raise KilnError(
        f"prune.blocks: dropping {opts.fraction:.0%} of the model's {budget.MEASURES[target]} is out of reach: all "
        f"but one unit hold {saved / total:.1%}"
    )


def _unit_cost(sublayer: Sublayer, target: budget.Target) -> float:
    """Parameters (weights and biases) or multiply-adds of a sublayer's projections; its normalization's few
    weights are not counted."""
    projections = (
        [sublayer.attention.q, sublayer.attention.k, sublayer.attention.v, sublayer.attention.o]
        if sublayer.attention is not None
        else [*sublayer.mlp.inner, sublayer.mlp.down]
    )
    total = 0.0
    for projection in projections:
        k, n = projection.shape
        total += budget.cost(projection.matmul, k * n, n if projection.bias else 0, target)
    return total


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, array.shape[-1]).astype(np.float64)


def _first_projection(sublayer: Sublayer) -> Projection:
    """The projection whose input is the branch's input (the linear stand-in's input)."""
    return sublayer.attention.q if sublayer.attention is not None else sublayer.mlp.up


def _stand_in_cost(sublayer: Sublayer, target: budget.Target, rank: int) -> float:
    first = _first_projection(sublayer)
    d_in = first.shape[0]
    d_out = int(sublayer.branch.shape[-1]) if sublayer.branch.shape is not None else d_in
    weights = rank * (d_in + d_out) if rank > 0 and rank * (d_in + d_out) < d_in * d_out else d_in * d_out
    return budget.cost(first.matmul, weights, d_out, target)


def _units(structure: Structure, unit: str) -> list[tuple[Sublayer, ...]]:
    if unit == "block":
        return [block.sublayers() for block in structure.blocks]
    return [(s,) for s in (structure.attentions() if unit == "attention" else structure.mlps())]


def _reason(opts: BlocksOptions) -> str:
    importance = opts.importance
    if opts.indices:
        return "given by option 'indices'"
    if opts.fitted_from:
        return f"the units {opts.fitted_from} has linear stand-ins for (option 'fitted_from')"
    if importance == "block_influence":
        return "lowest Block Influence (1 - cosine of the residual stream before and after, on calibration data)"
    if importance == "stand_in_influence":
        return (
            f"lowest Block Influence with the {opts.compensation} stand-in in place (1 - cosine of the residual stream "
            "with the sublayer and with its stand-in, on calibration data)"
        )
    if importance == "output_error":
        return "smallest change of the model's outputs when dropped alone (relative squared error, calibration data)"
    if importance == "last":
        return "the last units (baseline)"
    return f"drawn at random with seed {opts.seed} (baseline)"


def _key(unit: str, index: int, sublayer: Sublayer) -> str:
    """A dropped sublayer's name in details and in its stand-in's initializers: "attention3", or "block3.mlp"."""
    return f"{unit}{index}" if unit != "block" else f"block{index}.{sublayer.kind}"


def _stand_in_name(key: str) -> str:
    return f"kiln_prune.{key}.stand_in"


def _fitted_stand_ins(path: str, unit: str) -> dict[str, list[np.ndarray]]:
    """The linear stand-ins in the model at ``path`` by key (:func:`_key`): their arrays in the order a, (b,) bias."""
    pattern = re.compile(rf"kiln_prune\.({unit}\d+(?:\.attention|\.mlp)?)\.stand_in\.(a|b|bias)")
    found: dict[str, dict[str, np.ndarray]] = {}
    for value in load(path).graph.initializers.values():
        match = pattern.fullmatch(value.name or "")
        if match and value.const_value is not None:
            found.setdefault(match[1], {})[match[2]] = value.const_value.numpy()
    if not found:
        raise KilnError(f"prune.blocks: {path} has no linear stand-ins for {unit} units (fitted_from)")
    return {key: [arrays[r] for r in ("a", "b", "bias") if r in arrays] for key, arrays in found.items()}


def _insert_stand_in(
    model: ir.Model, names: _weights.NameScope, sublayer: Sublayer, base: str, arrays: list[np.ndarray]
) -> None:
    """The sublayer's residual Add reads ``x @ arrays[0] (@ arrays[1]) + arrays[-1]`` instead of its branch."""
    graph = model.graph
    dtype = _gates.NUMPY.get(sublayer.branch.dtype, np.float32)
    x = _first_projection(sublayer).input
    *matrices, bias = arrays
    value, nodes = x, []
    for role, matrix in zip("ab", matrices, strict=False):
        weight = _weights.add_initializer(graph, names.fresh(f"{base}.{role}"), matrix.astype(dtype))
        nodes.append(ir.node("MatMul", [value, weight], name=names.fresh(f"{base}.matmul_{role}")))
        value = nodes[-1].outputs[0]
    constant = _weights.add_initializer(graph, names.fresh(f"{base}.bias"), bias.astype(dtype))
    nodes.append(ir.node("Add", [value, constant], name=names.fresh(f"{base}.add")))
    for node in nodes:
        node.outputs[0].name = names.fresh(f"{node.name}.out")
    nodes[-1].outputs[0].type, nodes[-1].outputs[0].shape = sublayer.branch.type, sublayer.branch.shape
    graph.insert_before(sublayer.add, nodes)
    index = next(i for i, v in enumerate(sublayer.add.inputs) if v is sublayer.branch)
    sublayer.add.replace_input_with(index, nodes[-1].outputs[0])


def _place_stand_in(
    model: ir.Model, names: _weights.NameScope, key: str, sublayer: Sublayer, stand_in: _linear.StandIn
) -> dict[str, object]:
    """Insert a fitted stand-in in place of ``sublayer``'s branch; its record for ``details["stand_ins"]``."""
    arrays = [stand_in.a, *([] if stand_in.b is None else [stand_in.b]), stand_in.bias]
    _insert_stand_in(model, names, sublayer, _stand_in_name(key), arrays)
    return {
        "unit": key,
        "error": stand_in.error,
        "mean_error": stand_in.mean_error,
        "parameters": stand_in.parameters,
        "tokens": stand_in.tokens,
    }


def _compensate(model: ir.Model, sublayers: list[Sublayer], means: dict[ir.Value, np.ndarray]) -> None:
    """Each sublayer's residual Add reads its branch's mean over the calibration tokens (``means``, by branch)
    instead of the branch."""
    names = _weights.NameScope(model)
    for sublayer in sublayers:
        branch = sublayer.branch
        mean = means[branch].astype(_gates.NUMPY.get(branch.dtype, np.float32))
        constant = _weights.add_initializer(model.graph, names.fresh(f"{sublayer.add.name}.mean_branch"), mean)
        index = next(i for i, v in enumerate(sublayer.add.inputs) if v is branch)
        sublayer.add.replace_input_with(index, constant)


def _bypass(graph: ir.Graph, sublayer: Sublayer) -> None:
    """Every reader of the sublayer's output reads its residual input instead."""
    output, residual = sublayer.output, sublayer.residual
    if output.is_graph_output():
        identity = ir.node("Identity", [residual], name=f"{sublayer.add.name}.bypass")
        graph.insert_after(sublayer.output.producer(), identity)
        output.replace_all_uses_with(identity.outputs[0], replace_graph_outputs=True)
        name, output.name = output.name, None
        identity.outputs[0].name, identity.outputs[0].type, identity.outputs[0].shape = name, output.type, output.shape
    else:
        output.replace_all_uses_with(residual)


def _drop_cache(model: ir.Model, structure: Structure, dropped: list[Sublayer]) -> tuple[list[str], list[str]]:
    """Remove the KV-cache inputs and outputs of dropped attention sublayers from the graph's signature; return the
    names of the removed inputs and outputs."""
    graph = model.graph
    removed_inputs: list[str] = []
    removed_outputs: list[str] = []
    gone = {id(s) for s in dropped}
    kept = [s.attention for s in structure.attentions() if id(s) not in gone]
    if not kept:
        raise KilnError("prune.blocks: dropping every attention sublayer of a decode graph leaves no KV cache")
    for sublayer in dropped:
        attention = sublayer.attention
        for present in attention.present:
            graph.outputs.remove(present)
            removed_outputs.append(str(present.name))
        for role, past in enumerate(attention.past):
            substitute = kept[0].past[role] if role < len(kept[0].past) else kept[0].past[0]
            for use in list(past.uses()):
                if use.node.op_type == "Shape":
                    use.node.replace_input_with(use.idx, substitute)
    _edit.finish(model)  # the cache's Concat nodes are dead now
    for sublayer in dropped:
        for past in sublayer.attention.past:
            if past.uses():
                user = past.uses()[0].node
                raise KilnError(
                    f"prune.blocks: KV-cache input {past.name!r} is still read by {user.op_type} node {user.name!r}"
                )
            graph.inputs.remove(past)
            removed_inputs.append(str(past.name))
    return removed_inputs, removed_outputs


def _output_errors(model: ir.Model, units: list[tuple[Sublayer, ...]], feeds: list[Feed]) -> list[float]:
    """Relative squared change of all float outputs when each unit alone is dropped, summed over ``feeds``."""
    graph = model.graph
    names = _weights.NameScope(model)
    gates: list[ir.Value] = []

    def edit() -> Callable[[], None]:
        inserted = []
        gated_values: dict[ir.Value, ir.Value] = {}
        for unit in units:
            residual, output = unit[0].residual, unit[-1].output
            residual = gated_values.get(residual, residual)  # the previous unit's gated output
            uses = list(output.uses())
            dtype = output.dtype or ir.DataType.FLOAT
            gate = ir.Value(name=names.fresh("kiln_prune_gate"), type=ir.TensorType(dtype), shape=ir.Shape([]))
            delta = ir.node("Sub", [output, residual], name=names.fresh("kiln_prune_gate.sub"))
            scaled = ir.node("Mul", [delta.outputs[0], gate], name=names.fresh("kiln_prune_gate.mul"))
            gated = ir.node("Add", [residual, scaled.outputs[0]], name=names.fresh("kiln_prune_gate.add"))
            for node in (delta, scaled, gated):
                node.outputs[0].name = names.fresh(f"{node.name}.out")
            graph.insert_after(output.producer(), [delta, scaled, gated])
            for use in uses:
                use.node.replace_input_with(use.idx, gated.outputs[0])
            graph.inputs.append(gate)
            gates.append(gate)
            gated_values[output] = gated.outputs[0]
            inserted.append((output, gated.outputs[0], [delta, scaled, gated]))

        def undo() -> None:
            for output, gated, nodes in reversed(inserted):
                gated.replace_all_uses_with(output)
                graph.remove(nodes, safe=True)
            for gate in gates:
                graph.inputs.remove(gate)

        return undo

    session = _gates.session_with_edit(model, edit)
    outputs = [o.name for o in session.get_outputs() if "float" in o.type]
    ones = {gate.name: np.ones((), _gates.NUMPY[gate.dtype]) for gate in gates}
    errors = np.zeros(len(units))
    for feed in feeds:
        reference = session.run(outputs, {**feed, **ones})
        for i, gate in enumerate(gates):
            closed = {gate.name: np.zeros((), _gates.NUMPY[gate.dtype])}
            errors[i] += _gates.relative_change(session.run(outputs, {**feed, **ones, **closed}), reference)
    return [float(e / len(feeds)) for e in errors]
