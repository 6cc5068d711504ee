"""``prune.heads``: remove attention heads, slicing Q, K, V and O and rewriting the head counts.

Math. With ``d`` the head size, head ``h`` owns columns ``[h d, (h + 1) d)`` of ``W_q``, ``W_k``, ``W_v`` (and of
their biases) and the same rows of ``W_o``; the attention output is ``sum_h c_h W_o[h]`` over heads' contexts
``c_h`` [tokens, d]. Removing head ``h`` deletes those columns and rows, so Q, K, V and the merged context get
``d`` narrower and the Reshape splitting them into heads gets one head fewer (a constant head count in a Reshape's
shape, or in the Concat building it, is rewritten; ``-1`` needs nothing).

Importance (``activation``): the expected squared norm of the head's contribution to O's output, from calibration
statistics of O's input, ``s_h = sum_{c in h} E[x_c^2] ||W_o[c, :]||^2`` (cross terms dropped). Importance
(``output_error``): the measured change of the model's outputs, ``sum_outputs ||y - y_0||^2 / ||y_0||^2`` over the
first ``error_feeds`` calibration batches, with the head's channels of O's input set to 0 and every other head
intact (one ONNX Runtime run per head and batch, on a temporarily gated copy of the graph); it sees what the head's
signal does downstream, which the activation score cannot.
Allocation: ``uniform`` keeps the same number of heads in every layer (the ``heads`` option, or ``1 - ratio`` of
them); ``global`` ranks all heads of the model, by ``s_h / E||r||^2`` with ``activation`` (``r`` the residual
stream entering the sublayer, so a head's score is how much it moves the stream) or by the output error itself,
and removes ``ratio`` of them, or of the model's parameters, multiply-adds or run time (``target``,
:mod:`kiln.passes.prune.budget`); at least ``min_heads`` stay per layer.

Bias compensation (FLAP): a removed head's mean contribution ``E[c_h] W_o[h]`` over the calibration data is added
to O's bias (a bias Add is inserted when O has none), so the output keeps its mean. With ``refit``, O's kept rows
and bias are re-solved by least squares on the calibration contexts instead (:mod:`kiln.passes.prune._refit`).

Grouped-query attention (``r`` query heads per KV head, the KV heads repeated ``r`` times by an
Unsqueeze -> Expand -> Reshape as exporters write ``repeat_kv``): K and V stay whole, and every KV group loses the
same number of query heads, each group its lowest-scored ones, so the kept heads still come in contiguous groups and
the repeat count drops from ``r`` to ``r'`` (rewritten in the Expand's shape, and the head count in the Reshape after
it). Heads are therefore removed in steps of one per group: a layer's removal is a multiple of its KV head count,
and "global" ranks such steps by their heads' mean score. A GQA graph without that repeat pattern is refused.
Details record per layer the heads kept and removed with their scores, and the parameter counts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Gram
from kiln.compiler.registry import register
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.prune import _edit, _gates, _refit, budget
from kiln.passes.prune._stats import ChannelMoments, projection_statistics
from kiln.passes.prune.structure import Attention, Projection, Sublayer, find_structure, parameter_count


@dataclasses.dataclass
class HeadsOptions:
    """Options of ``prune.heads``.

    * ``heads``: heads to keep in every layer (uniform allocation); 0 to use ``ratio`` instead.
    * ``ratio``: fraction of the heads to remove (per layer with "uniform", over the model with "global").
    * ``allocation``: "uniform" or "global" (by importance relative to the residual stream, see the module doc).
    * ``min_heads``: heads every layer keeps at least, with "global".
    * ``importance``: "activation" (from calibration statistics) or "output_error" (measured: the model's outputs
      with each head masked alone, over ``error_feeds`` calibration batches; see the module doc).
    * ``error_feeds``: calibration batches used by ``importance = "output_error"``.
    * ``target``: what ``ratio`` is a share of with "global": "units" (heads), "params" or "flops" (of the whole
      model), or "latency" (of its measured run time); see :mod:`kiln.passes.prune.budget`.
    * ``bias_compensation``: fold the removed heads' mean output into O's bias.
    * ``refit``: re-solve O's kept rows and bias by least squares instead (needs many calibration tokens).
    """

    heads: int = 0
    ratio: float = 0.25
    allocation: Literal["uniform", "global"] = "uniform"
    min_heads: int = 1
    importance: Literal["activation", "output_error"] = "activation"
    error_feeds: int = 2
    target: budget.Target = "units"
    bias_compensation: bool = True
    refit: bool = False

    def __post_init__(self) -> None:
        if self.heads < 0:
            raise ValueError(f"heads must be >= 0, got {self.heads}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.allocation not in ("uniform", "global"):
            raise ValueError(f"allocation must be 'uniform' or 'global', got {self.allocation!r}")
        if self.heads and self.allocation == "global":
            raise ValueError("heads (a per-layer count) goes with allocation='uniform'; use ratio with 'global'")
        if self.min_heads < 1:
            raise ValueError(f"min_heads must be >= 1, got {self.min_heads}")
        if self.importance not in ("activation", "output_error"):
            raise ValueError(f"importance must be 'activation' or 'output_error', got {self.importance!r}")
        if self.error_feeds < 1:
            raise ValueError(f"error_feeds must be >= 1, got {self.error_feeds}")
        budget.check_options(self.target, self.allocation)
        if self.refit and not self.bias_compensation:
            raise ValueError("refit re-solves the bias too: it needs bias_compensation")


@register("prune.heads")
class PruneHeads(KilnPass):
    """Remove attention heads by activation-weighted importance, slicing Q/K/V/O, with FLAP bias compensation."""

    Options = HeadsOptions
    needs_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        if opts.target == "latency":
            return budget.meet_latency(self, model)
        sublayers = find_structure(model).attentions()
        if not sublayers:
            raise KilnError("prune.heads: the model has no attention sublayers left")
        repeats = {}
        for sublayer in sublayers:
            attention = sublayer.attention
            if attention.num_kv_heads != attention.num_heads:
                repeats[id(attention)] = _kv_repeats(attention)
            if attention.past:
                raise KilnError(
                    f"prune.heads: attention at Softmax {attention.softmax.name!r} reads a KV cache "
                    f"({attention.past[0].name!r}); prune the full graph instead"
                )
        contexts, streams, grams = self._statistics(model, sublayers)
        if opts.importance == "output_error":
            scores = self._output_errors(model, sublayers)
            relative = scores  # already on one scale: the model's outputs
        else:
            scores = [_scores(s.attention, contexts[s.attention.o.input]) for s in sublayers]
            relative = [score / streams[s.residual].mean_square.sum() for s, score in zip(sublayers, scores)]
        removed, spent = self._allocate(model, sublayers, scores, relative)
        before = parameter_count(model)
        shapes = _Shapes(_weights.NameScope(model))
        layers = []
        for index, (sublayer, score, drop) in enumerate(zip(sublayers, scores, removed, strict=True)):
            attention = sublayer.attention
            layers.append(
                {
                    "layer": index,
                    "softmax": attention.softmax.name,
                    "heads_before": attention.num_heads,
                    "heads_kept": attention.num_heads - len(drop),
                    "removed": sorted(drop),
                    "scores": [float(s) for s in score],
                }
            )
            if drop:
                errors = _remove_heads(
                    attention, sorted(drop), contexts[attention.o.input], grams.get(attention.o.input), opts, shapes
                )
                layers[-1] |= errors
                group = attention.num_heads // attention.num_kv_heads
                kept_group, kept = group - len(drop) // attention.num_kv_heads, attention.num_heads - len(drop)
                for expand, reshape in repeats.get(id(attention), []):
                    _rewrite_shape(expand, position=2, old=group, new=kept_group, names=shapes)
                    _rewrite_shape(reshape, position=1, old=attention.num_heads, new=kept, names=shapes)
        _edit.finish(model)
        self.details = {
            "importance": (
                "output_error: relative squared change of the model's outputs with the head masked"
                if opts.importance == "output_error"
                else "activation: sum over the head's channels of E[x^2] * ||W_o row||^2"
            ),
            "allocation": opts.allocation,
            "budget": spent,
            "bias_compensation": opts.bias_compensation,
            "refit": opts.refit,
            "heads_kept": [layer["heads_kept"] for layer in layers],
            "layers": layers,
            "parameters_before": before,
            "parameters_after": parameter_count(model),
        }
        return ir.passes.PassResult(model, modified=any(removed))

    def _statistics(
        self, model: ir.Model, sublayers: list[Sublayer]
    ) -> tuple[dict[ir.Value, ChannelMoments], dict[ir.Value, ChannelMoments], dict[ir.Value, Gram]]:
        assert self.context.calibration is not None  # checked by requires()
        inputs = [s.attention.o.input for s in sublayers]
        streams = [s.residual for s in sublayers]
        return projection_statistics(self.context.calibration, model, inputs, streams, self.options.refit)

    def _output_errors(self, model: ir.Model, sublayers: list[Sublayer]) -> list[np.ndarray]:
        """Per layer and head, the outputs' relative change with that head's context channels masked."""
        assert self.context.calibration is not None  # checked by requires()
        feeds = list(CalibrationData(lambda: iter(self.context.calibration), limit=self.options.error_feeds))
        masks = []
        for i, sublayer in enumerate(sublayers):
            d, heads = sublayer.attention.head_dim, sublayer.attention.num_heads
            for h in range(heads):
                mask = np.ones(heads * d)
                mask[h * d : (h + 1) * d] = 0
                masks.append((i, mask))
        errors = iter(_gates.masked_channel_errors(model, [s.attention.o.input for s in sublayers], masks, feeds))
        return [np.array([next(errors) for _ in range(s.attention.num_heads)]) for s in sublayers]

    def _allocate(
        self,
        model: ir.Model,
        sublayers: list[Sublayer],
        scores: list[np.ndarray],
        relative: list[np.ndarray],
    ) -> tuple[list[set[int]], dict[str, object] | None]:
        """The heads to remove, per layer (``relative``: scores comparable across layers, for "global"), and the
        global budget's record (None with "uniform")."""
        opts = self.options
        steps = [_steps(score, s.attention.num_kv_heads) for s, score in zip(sublayers, scores, strict=True)]
        if opts.allocation == "uniform":
            removed = []
            for score, layer_steps in zip(scores, steps, strict=True):
                n, size = len(score), len(layer_steps[0])
                keep = opts.heads if opts.heads else n - size * round(opts.ratio * n / size)
                if not 1 <= keep <= n or (n - keep) % size:
                    raise KilnError(
                        f"prune.heads: cannot keep {keep} of {n} heads per layer"
                        + (f" (grouped-query attention: remove a multiple of {size})" if size > 1 else "")
                    )
                removed.append({h for step in layer_steps[: (n - keep) // size] for h in step})
            return removed, None
        budget.prepare(model, opts.target)
        layers = []
        for sublayer, score, rel, layer_steps in zip(sublayers, scores, relative, steps, strict=True):
            layers.append(
                budget.Layer(
                    steps=layer_steps,
                    scores=[float(rel[list(step)].sum()) for step in layer_steps],
                    units=len(score),
                    floor=opts.min_heads,
                    cost=_head_cost(sublayer.attention, opts.target),
                )
            )
        taken, spent = budget.spend(model, layers, opts.target, opts.ratio, "prune.heads")
        removed = [{h for step in layer.steps[:n] for h in step} for layer, n in zip(layers, taken, strict=True)]
        return removed, spent


def _head_cost(attention: Attention, target: budget.Target) -> float:
    """What one query head takes: its columns of Q (and of K, V without grouped-query attention), their biases, and
    its rows of O."""
    d = attention.head_dim
    total = budget.cost(attention.o.matmul, d * attention.o.shape[1], 0, target)
    for projection in _sliced(attention):
        total += budget.cost(projection.matmul, projection.shape[0] * d, d if projection.bias else 0, target)
    return total


def _steps(score: np.ndarray, kv_heads: int) -> list[tuple[int, ...]]:
    """A layer's removal steps, cheapest first: one head each (MHA), or one head of every KV group (GQA), each
    group giving up its lowest-scored remaining head."""
    heads = len(score)
    if kv_heads == heads:
        return [(int(h),) for h in np.argsort(score, kind="stable")]
    group = heads // kv_heads
    order = [
        [g * group + int(h) for h in np.argsort(score[g * group : (g + 1) * group], kind="stable")]
        for g in range(kv_heads)
    ]
    return [tuple(order[g][j] for g in range(kv_heads)) for j in range(group)]


def _sliced(attention: Attention) -> tuple[Projection, ...]:
    """The projections whose columns a head owns: with grouped-query attention K and V keep every KV head, and
    only Q's heads (and O's rows) go."""
    if attention.num_kv_heads != attention.num_heads:
        return (attention.q,)
    return attention.q, attention.k, attention.v


def _kv_repeats(attention: Attention) -> list[tuple[ir.Node, ir.Node]]:
    """The (Expand, Reshape) pairs repeating K and V from KV heads to query heads, found along their dataflow."""
    pairs = []
    for projection in (attention.k, attention.v):
        found, frontier, seen = None, [projection.output], 0
        while frontier and found is None and seen < 64:
            value = frontier.pop(0)
            for use in value.uses():
                node, seen = use.node, seen + 1
                if node.op_type == "Expand" and use.idx == 0:
                    after = [u.node for u in node.outputs[0].uses()]
                    if len(after) == 1 and after[0].op_type == "Reshape":
                        found = (node, after[0])
                        break
                if node.op_type not in ("MatMul", "Softmax"):  # the repeat comes before attention's matmuls
                    frontier.extend(node.outputs)
        if found is None:
            raise KilnError(
                f"prune.heads: attention at Softmax {attention.softmax.name!r} uses grouped-query attention "
                f"({attention.num_heads} query heads share {attention.num_kv_heads} KV heads), but no "
                "Unsqueeze -> Expand -> Reshape repeats its K or V to the query heads: prune.heads cannot slice it"
            )
        pairs.append(found)
    return pairs


def _scores(attention: Attention, context: ChannelMoments) -> np.ndarray:
    w_o = _edit.weight_array(attention.o.weight).astype(np.float64)
    per_channel = context.mean_square * (w_o * w_o).sum(axis=1)
    return per_channel.reshape(attention.num_heads, attention.head_dim).sum(axis=1)


def _remove_heads(
    attention: Attention,
    drop: list[int],
    context: ChannelMoments,
    gram: Gram | None,
    opts: HeadsOptions,
    shapes: _Shapes,
) -> dict[str, float]:
    """Slice the heads out of Q/K/V/O and rewrite the head counts; compensate O as ``opts`` say; return the
    refit's residuals (empty without ``refit``)."""
    names = shapes.names
    d, heads = attention.head_dim, attention.num_heads
    kept_heads = heads - len(drop)
    dropped_channels = np.concatenate([np.arange(h * d, (h + 1) * d) for h in drop])
    keep = _edit.keep_indices(heads * d, set(dropped_channels.tolist()))
    sliced = _sliced(attention)
    # Head counts first: the Reshape nodes are found from the projections' outputs, which slicing keeps.
    for projection in sliced:
        for use in list(projection.output.uses()):
            if use.node.op_type == "Reshape" and use.idx == 0:
                _rewrite_shape(use.node, position=2, old=heads, new=kept_heads, names=shapes)
    merge = attention.o.input.producer()
    if merge is not None and merge.op_type == "Reshape":
        _rewrite_shape(merge, position=-1, old=heads * d, new=kept_heads * d, names=shapes)
    for projection in sliced:
        _edit.slice_projection(projection, keep, axis=1, names=names)
    errors = _refit.keep_rows(
        attention.o,
        keep,
        dropped_channels,
        context.mean,
        gram,
        opts.bias_compensation,
        names,
        f"prune.heads: attention at Softmax {attention.softmax.name!r}",
    )
    return errors


def _rewrite_shape(node: ir.Node, *, position: int, old: int, new: int, names: _Shapes) -> None:
    """Replace ``old`` by ``new`` at ``position`` of a Reshape's target shape (a constant, or a Concat of pieces)."""
    target = node.inputs[1]
    array = _weights.constant_array(target)
    if array is not None:
        array = np.array(array)
        if array[position] == old:
            array[position] = new
            node.replace_input_with(1, names.constant(target, array))
            _weights.remove_if_unused(target)
        elif array[position] not in (-1, new):
            raise KilnError(f"prune.heads: Reshape {node.name!r} has shape {array.tolist()}, expected {old} or -1")
        return
    concat = target.producer()
    if concat is None or concat.op_type != "Concat":
        raise KilnError(f"prune.heads: cannot read the target shape of Reshape {node.name!r}")
    pieces = list(concat.inputs)
    index = position % len(pieces) if all(_piece_size(p) == 1 for p in pieces) else None
    if index is None:
        raise KilnError(f"prune.heads: cannot locate the head count in the shape of Reshape {node.name!r}")
    piece = _weights.constant_array(pieces[index])
    if piece is None or piece.item() in (-1, new):
        return
    if piece.item() != old:
        raise KilnError(f"prune.heads: Reshape {node.name!r} shape piece is {piece.item()}, expected {old} or -1")
    # A new Concat (the old one may be shared with Reshapes of other widths), one per variant: those sharing the
    # old shape share the new one; the old goes once unused.
    replacement = names.constant(pieces[index], np.array([new], dtype=piece.dtype))
    node.replace_input_with(1, names.concat(concat, index, replacement))


class _Shapes:
    """Fresh names, and one new shape constant per (old constant, new content): shared shapes stay shared."""

    def __init__(self, names: _weights.NameScope) -> None:
        self.names = names
        self._made: dict[tuple[ir.Value, bytes], ir.Value] = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def concat(self, concat: ir.Node, index: int, piece: ir.Value) -> ir.Value:
        """``concat``'s output with input ``index`` replaced by ``piece``, one new Concat per such variant."""
        key = (concat.outputs[0], piece.name.encode())
        if key not in self._made:
            inputs = [piece if i == index else v for i, v in enumerate(concat.inputs)]
            copy = ir.node("Concat", inputs, attributes={"axis": 0}, name=self.names.fresh(f"{concat.name}.pruned"))
            copy.outputs[0].name = self.names.fresh(f"{concat.outputs[0].name}.pruned")
            concat.graph.insert_after(concat, copy)
            self._made[key] = copy.outputs[0]
        return self._made[key]

    def constant(self, old: ir.Value, array: np.ndarray) -> ir.Value:
        key = (old, array.tobytes())
        if key not in self._made:
            graph = _weights.defining_graph(old) or old.uses()[0].node.graph
            self._made[key] = _weights.add_initializer(graph, self.names.fresh(old.name or "shape"), array)
        return self._made[key]


def _piece_size(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) != 1 or not isinstance(value.shape[0], int):
        array = _weights.constant_array(value) if value is not None else None
        return None if array is None else int(array.size)
    return value.shape[0]
