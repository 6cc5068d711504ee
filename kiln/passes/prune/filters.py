"""``prune.filters``: remove CNN filters inside conv chains, through BatchNorm, activations and depthwise convs.

What is a prunable chain: ``A -> [BN] -> act* -> [D -> [BN] -> act*] -> P``, where ``A`` is a Conv with
``group = 1`` producing ``C`` channels, ``D`` an optional depthwise Conv (``group = C``, one filter per channel),
``act`` channel-wise unary ops (Relu, Clip, Sigmoid, HardSwish, ...), and ``P`` a Conv with ``group = 1``
reading the ``C`` channels; each value in between is read by the next node only. This is the expansion of an
inverted residual (MobileNetV2 / EfficientNet MBConv) or the inside of a bottleneck; channels that reach residual
Adds or Concats are never touched, so those stay consistent without tracking.

Math. Channel ``j`` of the chain is filter ``j`` of ``A`` (with its bias and BN entries), filter ``j`` of ``D`` (and
its BN entries; ``D``'s ``group`` becomes the new channel count) and input channel ``j`` of ``P``. Removing it
deletes those; nothing else changes.

Importance (``activation``): ``s_j = E[a_j^2] ||W_P[:, j]||^2`` with ``a`` the input of ``P`` over calibration images
(all positions), the expected squared size of the channel's contribution to ``P``'s output; ``l1`` / ``l2``: the
norm of ``A``'s filter ``j`` (no data). Allocation: ``uniform`` removes ``ratio`` of every chain's channels;
``global`` ranks channels of all chains by ``s_j / E||y_P||^2`` (relative to the chain's output, so by how much the
chain's output moves: per-layer ratios follow sensitivity), in groups of ``multiple_of``, and removes ``ratio`` of
all channels, or of the model's parameters, multiply-adds or run time (``target``,
:mod:`kiln.passes.prune.budget`), keeping at least ``min_ratio`` of each chain. Kept counts are multiples of
``multiple_of`` where the chain is that wide.

Bias compensation (``activation`` only, ``P`` 1x1): the removed channels' mean ``E[a_j] W_P[:, j]`` is added to
``P``'s bias (an Add is inserted when it has none).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.registry import register
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.prune import _edit, budget
from kiln.passes.prune._stats import ChannelMoments, channel_moments
from kiln.passes.prune.structure import parameter_count

_UNARY = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "LeakyRelu", "Selu", "Softplus")


@dataclasses.dataclass
class Chain:
    """``A -> ... -> [D -> ...] -> P`` with the BatchNormalization nodes met on the way."""

    first: ir.Node
    depthwise: ir.Node | None
    last: ir.Node
    norms: list[ir.Node]

    @property
    def channels(self) -> int:
        return int(_weights.constant_tensor(self.first.inputs[1]).shape[0])


@dataclasses.dataclass
class FiltersOptions:
    """Options of ``prune.filters``.

    * ``ratio``: fraction of the chains' channels to remove.
    * ``importance``: "activation" (needs calibration), "l1" or "l2" (filter norms of the first conv).
    * ``allocation``: "uniform" or "global" (see the module doc; "global" needs ``importance = "activation"``).
    * ``min_ratio``: with "global", the fraction of each chain's channels that stays at least.
    * ``multiple_of``: kept channel counts are rounded to a multiple of this ("global" removes channels in groups
      of it).
    * ``target``: what ``ratio`` is a share of with "global": "units" (channels), "params" or "flops" (of the whole
      model), or "latency" (of its measured run time); see :mod:`kiln.passes.prune.budget`.
    * ``bias_compensation``: fold the removed channels' mean into the last conv's bias ("activation" only).
    """

    ratio: float = 0.25
    importance: Literal["activation", "l1", "l2"] = "activation"
    allocation: Literal["uniform", "global"] = "uniform"
    min_ratio: float = 0.25
    multiple_of: int = 8
    target: budget.Target = "units"
    bias_compensation: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in ("activation", "l1", "l2"):
            raise ValueError(f"importance must be 'activation', 'l1' or 'l2', got {self.importance!r}")
        if self.allocation not in ("uniform", "global"):
            raise ValueError(f"allocation must be 'uniform' or 'global', got {self.allocation!r}")
        if self.allocation == "global" and self.importance != "activation":
            raise ValueError("allocation='global' needs importance='activation'")
        if not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")
        budget.check_options(self.target, self.allocation)


@register("prune.filters")
class PruneFilters(KilnPass):
    """Remove CNN filters of conv chains (through BN, activations, depthwise convs) by activation or filter norm."""

    Options = FiltersOptions
    needs_calibration = True

    def requires(self, model: ir.Model) -> None:
        if self.options.importance == "activation":
            super().requires(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        if opts.target == "latency":
            return budget.meet_latency(self, model)
        chains = find_chains(model.graph)
        if not chains:
            raise KilnError(
                "prune.filters: no prunable conv chain (Conv -> [BN] -> activations -> [depthwise Conv] -> Conv, "
                "each value read only by the next node) in the main graph"
            )
        inputs, outputs = self._statistics(model, chains)
        scores = [self._score(chain, inputs) for chain in chains]
        counts, spent = self._counts(model, chains, scores, outputs)
        before = parameter_count(model)
        names = _weights.NameScope(model)
        layers = []
        for chain, score, count in zip(chains, scores, counts, strict=True):
            drop = {int(j) for j in np.argsort(score, kind="stable")[:count]}
            layers.append({"first": chain.first.name, "last": chain.last.name, "channels": chain.channels})
            layers[-1]["kept"] = chain.channels - len(drop)
            if drop:
                _remove_channels(chain, drop, inputs.get(chain.last.inputs[0]), opts.bias_compensation, names)
        _edit.finish(model)
        self.details = {
            "importance": opts.importance,
            "allocation": opts.allocation,
            "budget": spent,
            "chains": len(chains),
            "channels_before": sum(layer["channels"] for layer in layers),
            "channels_after": sum(layer["kept"] for layer in layers),
            "layers": layers,
            "parameters_before": before,
            "parameters_after": parameter_count(model),
        }
        return ir.passes.PassResult(model, modified=any(counts))

    def _statistics(
        self, model: ir.Model, chains: list[Chain]
    ) -> tuple[dict[ir.Value, ChannelMoments], dict[ir.Value, ChannelMoments]]:
        if self.options.importance != "activation":
            return {}, {}
        assert self.context.calibration is not None  # checked by requires()
        inputs = [c.last.inputs[0] for c in chains]
        outputs = [c.last.outputs[0] for c in chains]
        moments = channel_moments(self.context.calibration, model, [*inputs, *outputs], axis=1)
        return {v: moments[v] for v in inputs}, {v: moments[v] for v in outputs}

    def _score(self, chain: Chain, inputs: dict[ir.Value, ChannelMoments]) -> np.ndarray:
        if self.options.importance == "activation":
            w_p = _edit.weight_array(chain.last.inputs[1]).astype(np.float64)
            return inputs[chain.last.inputs[0]].mean_square * (w_p * w_p).sum(axis=(0, *range(2, w_p.ndim)))
        w_a = np.abs(_edit.weight_array(chain.first.inputs[1]).astype(np.float64)).reshape(chain.channels, -1)
        return w_a.sum(axis=1) if self.options.importance == "l1" else (w_a * w_a).sum(axis=1)

    def _counts(
        self,
        model: ir.Model,
        chains: list[Chain],
        scores: list[np.ndarray],
        outputs: dict[ir.Value, ChannelMoments],
    ) -> tuple[list[int], dict[str, object] | None]:
        """Channels to remove from each chain (its lowest-scored), and the global budget's record (None with
        "uniform")."""
        opts = self.options
        if opts.allocation == "uniform":
            return [c.channels - self._width(c.channels, c.channels * (1 - opts.ratio)) for c in chains], None
        budget.prepare(model, opts.target)
        layers = []
        for chain, score in zip(chains, scores, strict=True):
            relative = np.sort(score / outputs[chain.last.outputs[0]].mean_square.sum())
            size = opts.multiple_of if chain.channels >= opts.multiple_of else 1
            starts = range(0, chain.channels, size)
            layers.append(
                budget.Layer(
                    steps=[tuple(range(i, min(i + size, chain.channels))) for i in starts],
                    scores=[float(relative[i : i + size].sum()) for i in starts],
                    units=chain.channels,
                    floor=int(np.ceil(opts.min_ratio * chain.channels)),
                    cost=_channel_cost(chain, opts.target),
                )
            )
        taken, spent = budget.spend(model, layers, opts.target, opts.ratio, "prune.filters")
        counts = [sum(len(step) for step in layer.steps[:n]) for layer, n in zip(layers, taken, strict=True)]
        return counts, spent

    def _width(self, width: int, wanted: float) -> int:
        step = self.options.multiple_of if width >= self.options.multiple_of else 1
        return int(min(width, max(step, step * round(wanted / step))))


def _channel_cost(chain: Chain, target: budget.Target) -> float:
    """What one channel of a chain takes: a filter of the first conv (and of the depthwise one) with its bias and
    BatchNorm entries (scale, bias, mean, variance), and an input channel of the last conv."""
    shape = _weights.constant_tensor(chain.last.inputs[1]).shape.numpy()
    total = budget.cost(chain.last, int(shape[0]) * math.prod(int(d) for d in shape[2:]), 4 * len(chain.norms), target)
    for conv in (chain.first, chain.depthwise):
        if conv is not None:
            per_filter = math.prod(int(d) for d in _weights.constant_tensor(conv.inputs[1]).shape.numpy()[1:])
            biased = len(conv.inputs) > 2 and conv.inputs[2] is not None
            total += budget.cost(conv, per_filter, 1 if biased else 0, target)
    return total


def _conv(node: ir.Node | None, *, depthwise: bool = False) -> bool:
    if node is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = _weights.constant_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    if weight is None or len(weight.shape) < 3 or (len(node.inputs) > 2 and not _is_const(node.inputs[2])):
        return False
    group = node.attributes.get_int("group", 1)
    return group == weight.shape[0] and weight.shape[1] == 1 and group > 1 if depthwise else group == 1


def _is_const(value: ir.Value | None) -> bool:
    return value is None or _weights.constant_tensor(value) is not None


def _single_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0:
        return None
    return uses[0].node


def _walk(value: ir.Value, norms: list[ir.Node]) -> tuple[ir.Node | None, ir.Value]:
    """Follow channel-wise nodes (BN, unary activations) from ``value``; the next other node and the value it reads."""
    while True:
        node = _single_consumer(value)
        if node is None:
            return None, value
        if node.op_type == "BatchNormalization" and all(_is_const(v) for v in node.inputs[1:]):
            norms.append(node)
        elif node.op_type not in _UNARY or not all(_is_const(v) for v in node.inputs[1:]):
            return node, value
        value = node.outputs[0]


def find_chains(graph: ir.Graph) -> list[Chain]:
    """Every prunable conv chain of ``graph`` (see the module doc)."""
    chains = []
    for first in graph:
        if not _conv(first):
            continue
        norms: list[ir.Node] = []
        node, _ = _walk(first.outputs[0], norms)
        depthwise = None
        if _conv(node, depthwise=True):
            depthwise = node
            node, _ = _walk(depthwise.outputs[0], norms)
        if not _conv(node):
            continue
        channels = _weights.constant_tensor(first.inputs[1]).shape[0]
        if _weights.constant_tensor(node.inputs[1]).shape[1] != channels:
            continue
        if depthwise is not None and depthwise.attributes.get_int("group", 1) != channels:
            continue
        shared = [n.inputs[1] for n in (first, depthwise, node) if n is not None]
        if any(len(w.uses()) > 1 or w.is_graph_input() for w in shared):
            continue
        chains.append(Chain(first, depthwise, node, norms))
    return chains


def _remove_channels(
    chain: Chain, drop: set[int], moments: ChannelMoments | None, compensate: bool, names: _weights.NameScope
) -> None:
    keep = _edit.keep_indices(chain.channels, drop)
    last = chain.last
    w_p = _edit.weight_array(last.inputs[1])
    if compensate and moments is not None and w_p.shape[2:] == (1,) * (w_p.ndim - 2):
        dropped = np.array(sorted(drop))
        delta = np.einsum(
            "oi,i->o", w_p[:, dropped].reshape(w_p.shape[0], -1).astype(np.float64), moments.mean[dropped]
        )
        if len(last.inputs) > 2 and last.inputs[2] is not None:
            _edit.replace_constant(last, 2, _edit.weight_array(last.inputs[2]) + delta.astype(w_p.dtype), names)
        else:
            name = names.fresh(f"{last.name or 'conv'}.bias")
            last.resize_inputs(3)
            last.replace_input_with(2, _weights.add_initializer(last.graph, name, delta.astype(w_p.dtype)))
    for conv in (chain.first, chain.depthwise):
        if conv is None:
            continue
        _edit.replace_constant(conv, 1, np.ascontiguousarray(_edit.weight_array(conv.inputs[1])[keep]), names)
        if len(conv.inputs) > 2 and conv.inputs[2] is not None:
            _edit.replace_constant(conv, 2, np.ascontiguousarray(_edit.weight_array(conv.inputs[2])[keep]), names)
    if chain.depthwise is not None:
        chain.depthwise.attributes["group"] = ir.AttrInt64("group", len(keep))
    for norm in chain.norms:
        for index in range(1, 5):
            _edit.replace_constant(
                norm, index, np.ascontiguousarray(_edit.weight_array(norm.inputs[index])[keep]), names
            )
    _edit.replace_constant(last, 1, np.ascontiguousarray(w_p[:, keep]), names)
