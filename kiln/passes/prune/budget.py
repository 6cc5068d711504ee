"""Global pruning targets: remove a share of the units, of the parameters, of the multiply-adds or of the run time.

A pruning pass describes what it may remove as one :class:`Layer` per prunable place (an attention sublayer, an
MLP, a conv chain): the removal ``steps`` in the order they would go (lowest importance first), each step's
importance relative to the stream the layer writes to, how many units must stay, and what one unit saves in the
target's measure (:func:`cost`). :func:`allocate` then removes steps across all layers in order of importance per
unit (the next step of every layer competes; the lowest goes first) until the saving reaches ``ratio`` of the
model's total in that measure: the measure decides how much goes, the importance which.

Ranking by importance per unit of *budget* instead (a knapsack's density: importance divided by parameters or
multiply-adds saved) was measured and rejected: on EfficientNet-Lite0 it spends a FLOP budget on the expensive
high-resolution chains, whose channels the per-layer importance underrates, and top-1 agreement with fp32 fell to
0.41 at 14.5% fewer multiply-adds, against 0.76 at 16% when ranking by importance
(``tools/prune_measure.py efficientnet``).

* ``target = "units"``: every unit costs 1 and the total is the units of all layers (heads, channels, filters); the
  saving never goes past the count asked for (``round(ratio * total)``).
* ``target = "params"``: the total is every constant element of the model (:func:`parameter_count`); removal stops
  at the first step reaching the target, so it overshoots by at most one step.
* ``target = "flops"``: the total is :func:`weighted_macs`, the multiply-adds of the weighted layers per run; same
  stopping rule. A MatMul or Gemm with a constant weight [K, N] does ``K * N`` per output row, a Conv
  ``C_out * C_in / group * prod(kernel)`` per output position, and a dimension that is not static counts 1, so a
  transformer's count is per token. Attention's own products (``Q K^T``, ``P V``) depend on no weight and are not
  counted.
* ``target = "latency"``: ``ratio`` is the share of measured run time to remove (0.2: 1.25x faster). Time is no
  linear function of multiply-adds (memory traffic, kernel shapes, fixed costs per node), so :func:`meet_latency`
  searches for it: a bisection over the share of multiply-adds removed, each step pruning a clone of the model with
  ``target = "flops"`` and timing it against the original in ONNX Runtime (round-robin, median, on the first
  calibration batch, 2 threads). The model is then pruned at the smallest share that met the time, and the details
  record every step of the search.

A parameter, FLOP or time target that the layers cannot reach without crossing their floors is an error naming
what was possible.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from kiln.compiler import io, pipeline, timing
from kiln.errors import KilnError
from kiln.passes import _weights
from kiln.passes._base import KilnPass
from kiln.passes.prune.structure import parameter_count

Target = Literal["units", "params", "flops", "latency"]
TARGETS = ("units", "params", "flops", "latency")
MEASURES = {"units": "units", "params": "parameters", "flops": "multiply-adds", "latency": "run time"}
#: Bisection steps of the latency search, and timed rounds per step.
LATENCY_STEPS, LATENCY_REPEATS = 6, 40


@dataclasses.dataclass
class Layer:
    """One prunable place: its removal steps (unit indices, in order) and what each unit saves."""

    #: Unit indices removed by each step, the first step first.
    steps: list[tuple[int, ...]]
    #: Each step's importance, summed over its units, on a scale shared by all layers; rising along the steps.
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
        raise ValueError(f"target must be 'units', 'params', 'flops' or 'latency', got {target!r}")
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
        (score / len(step), i) for i, layer in enumerate(layers) for step, score in zip(layer.steps, layer.scores)
    )
    for _, i in candidates:
        if target != "units" and saved >= goal:
            break
        step = layers[i].steps[taken[i]]  # the layer's next step: importance rises along a layer's steps
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


def spend(
    model: ir.Model, layers: list[Layer], target: Target, ratio: float, what: str
) -> tuple[list[int], dict[str, object]]:
    """:func:`allocate` against the model's total in ``target``: the steps taken per layer and the budget's record
    for the pass's details."""
    total = model_total(model, target, layers)
    taken, saved = allocate(layers, target, ratio, total, what)
    return taken, record(target, ratio, total, saved)


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


def meet_latency(pass_: KilnPass, model: ir.Model, field: str = "ratio") -> ir.passes.PassResult:
    """Run ``pass_`` (options with ``target = "latency"``) as its "flops" form at the share of multiply-adds that
    removes the share of measured run time in option ``field`` (module doc); ``pass_.details`` gets that run's
    details plus the search."""
    opts = pass_.options
    wanted = getattr(opts, field)
    name = pipeline.pass_name(pass_)
    if pass_.context.calibration is None:
        raise KilnError(f"{name}: target='latency' times the model on calibration data, and none was given")
    feed = next(iter(pass_.context.calibration))
    goal = 1.0 - wanted

    def flops_pass(share: float) -> KilnPass:
        return type(pass_)(dataclasses.replace(opts, target="flops", **{field: share}), pass_.context)

    steps: list[dict[str, float | str]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-latency-") as tmp:
        original = io.save(model, Path(tmp) / "original.onnx")

        def time_ratio(share: float) -> float | None:
            clone = model.clone()
            try:
                flops_pass(share)(clone)
            except KilnError as e:  # the share is out of the pass's reach
                steps.append({"flops_removed": share, "error": str(e)})
                return None
            path = io.save(clone, Path(tmp) / f"step{len(steps)}.onnx")
            times = timing.compare_latency({"original": original, "pruned": path}, feed, repeats=LATENCY_REPEATS)
            ratio = times["pruned"].median_ms / times["original"].median_ms
            steps.append({"flops_removed": share, "time_ratio": ratio})
            return ratio

        # Shares below ``low`` were too slow; from ``ceiling`` up they met the goal or were refused.
        low, ceiling, best = 0.0, 1.0, None
        share = wanted
        for _ in range(LATENCY_STEPS):
            ratio = time_ratio(share)
            if ratio is None or ratio <= goal:
                ceiling = share
                best = share if ratio is not None else best
            else:
                low = share
            share = (low + ceiling) / 2
    if best is None:
        tried = "; ".join(
            f"{step['flops_removed']:.0%} of the multiply-adds: "
            + (f"{step['time_ratio']:.2f}x the time" if "time_ratio" in step else f"refused ({step['error']})")
            for step in steps
        )
        raise KilnError(f"{name}: a {wanted:.0%} shorter run time is out of reach: {tried}")
    final = flops_pass(best)
    result = final(model)
    pass_.details = dict(final.details)
    pass_.details["latency_search"] = {"goal_time_ratio": goal, "chosen_flops_removed": best, "steps": steps}
    return result


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
