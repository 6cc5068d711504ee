"""Global pruning targets: remove a fraction of the units, of the parameters, or of the multiply-adds.

A pruning pass describes what it may remove as one :class:`Layer` per prunable place (an attention sublayer, an
MLP, a conv chain): the removal ``steps`` in the order they would go (lowest importance first), each step's
importance relative to the stream the layer writes to, how many units must stay, and what one unit saves in the
target's measure (:func:`cost`). :func:`allocate` then removes steps across all layers by *importance per unit of
budget*: the next step of every layer competes, and the one whose importance divided by its saving in the chosen
measure is lowest goes first, until the saving reaches ``ratio`` of the model's total in that measure. Layers whose
units cost more give them up sooner for the same importance, which is what a parameter or FLOP budget asks for.

* ``target = "units"``: every unit costs 1 and the total is the units of all layers (heads, channels, filters); the
  saving never goes past the count asked for (``round(ratio * total)``).
* ``target = "params"``: the total is every constant element of the model (:func:`parameter_count`); removal stops
  at the first step reaching the target, so it overshoots by at most one step.
* ``target = "flops"``: the total is :func:`weighted_macs`, the multiply-adds of the weighted layers per run; same
  stopping rule. A MatMul or Gemm with a constant weight [K, N] does ``K * N`` per output row, a Conv
  ``C_out * C_in / group * prod(kernel)`` per output position, and a dimension that is not static counts 1, so a
  transformer's count is per token. Attention's own products (``Q K^T``, ``P V``) depend on no weight and are not
  counted.

With ``"params"`` or ``"flops"``, a target that the layers cannot reach without crossing their floors is an error
naming the largest saving possible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import onnx_ir as ir

from kiln.compiler import pipeline
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes.prune.structure import parameter_count

Target = Literal["units", "params", "flops"]
TARGETS = ("units", "params", "flops")
MEASURES = {"units": "units", "params": "parameters", "flops": "multiply-adds"}


@dataclasses.dataclass
class Layer:
    """One prunable place: its removal steps (unit indices, in order) and what each unit saves."""

    #: Unit indices removed by each step, the first step first.
    steps: list[tuple[int, ...]]
    #: Each step's importance (summed over its units, relative to the layer's stream); rising along the steps.
    scores: list[float]
    #: Units of the layer.
    units: int
    #: Units that must stay.
    floor: int
    #: What removing one unit saves in the target's measure (:func:`cost`; units count 1 whatever this is).
    cost: float


def check_options(target: str, allocation: str) -> None:
    """The checks every pruning pass's options share (raise ValueError, like the dataclasses' own checks)."""
    if target not in TARGETS:
        raise ValueError(f"target must be 'units', 'params' or 'flops', got {target!r}")
    if target != "units" and allocation != "global":
        raise ValueError(f"target={target!r} is a budget over the whole model: it needs allocation='global'")


def prepare(model: ir.Model, target: Target) -> None:
    """Infer the shapes a FLOP count reads (a model loaded from disk may not record them); call before costing."""
    if target == "flops":
        pipeline.infer_types(model)


def model_total(model: ir.Model, target: Target, layers: list[Layer]) -> float:
    """What ``ratio`` is a fraction of."""
    if target == "units":
        return float(sum(layer.units for layer in layers))
    if target == "params":
        return float(parameter_count(model))
    return float(sum(weighted_macs(node) for node in model.graph))


def allocate(layers: list[Layer], target: Target, ratio: float, total: float, what: str) -> tuple[list[int], float]:
    """Steps taken in each layer and the saving in the target's measure (see the module doc); ``what`` names the
    pass in errors."""
    cost = [1.0 if target == "units" else layer.cost for layer in layers]
    goal = round(ratio * total) if target == "units" else ratio * total
    taken = [0] * len(layers)
    left = [layer.units for layer in layers]
    saved = 0.0
    candidates = sorted(
        (score / max(len(step) * cost[i], 1e-30), i)
        for i, layer in enumerate(layers)
        for step, score in zip(layer.steps, layer.scores, strict=True)
    )
    for _, i in candidates:
        if target != "units" and saved >= goal:
            break
        step = layers[i].steps[taken[i]]  # the layer's next step: a layer's density rises along its steps
        gain = len(step) * cost[i]
        if (target == "units" and saved + gain > goal) or left[i] - len(step) < layers[i].floor:
            continue
        taken[i] += 1
        left[i] -= len(step)
        saved += gain
    if target != "units" and saved < goal:
        raise KilnError(
            f"{what}: removing {ratio:.0%} of the model's {MEASURES[target]} is out of reach: down to each "
            f"layer's floor, pruning saves {saved / total:.1%}"
        )
    return taken, saved


def record(target: Target, ratio: float, total: float, saved: float) -> dict[str, object]:
    """The budget's entry in a pass's details."""
    return {"target": target, "ratio": ratio, "total": total, "removed": saved, "removed_fraction": saved / total}


def cost(node: ir.Node, weights: float, biases: float, target: Target) -> float:
    """What ``weights`` elements of ``node``'s weight and ``biases`` bias entries count for: their number
    ("params"), or their multiply-adds per run ("flops"); 1 for "units"."""
    if target == "params":
        return weights + biases
    if target == "flops":
        return weights * positions(node)
    return 1.0


def weighted_macs(node: ir.Node) -> float:
    """Multiply-adds of a MatMul, Gemm or Conv with a constant weight, per run (module doc); 0 for other nodes."""
    if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return 0.0
    weight = _weights.constant_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    if weight is None:
        return 0.0
    return float(math.prod(int(d) for d in weight.shape.numpy())) * positions(node)


def positions(node: ir.Node) -> int:
    """Applications of a weighted node's weight per run: output rows (MatMul, Gemm) or positions (Conv)."""
    shape = node.outputs[0].shape
    if node.op_type != "Conv":
        dims = [] if shape is None else list(shape)[:-1]
        return math.prod(d if isinstance(d, int) else 1 for d in dims)
    spatial = None if shape is None else list(shape)[2:]
    if not spatial or not all(isinstance(d, int) for d in spatial):
        raise KilnError(
            f"target='flops': the output size of Conv node {node.name!r} is not static, so its multiply-adds are "
            "unknown; use target='params'"
        )
    batch = shape[0] if isinstance(shape[0], int) else 1
    return batch * math.prod(spatial)
