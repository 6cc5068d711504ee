"""Cleanup passes: constant folding, dead-code and identity removal, shape inference, the onnxscript optimizer.

These wrap the passes ``onnx_ir`` and ``onnxscript`` already implement, giving them registry names and option
dataclasses so recipes can use them; none of the graph logic is re-implemented here.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import optimizer
from onnxscript.optimizer import _constant_folding

from kiln.compiler.registry import register
from kiln.passes._base import KilnPass


def _run(model: ir.Model, *passes: ir.passes.PassBase) -> ir.passes.PassResult:
    result = ir.passes.Sequential(*passes)(model)
    return ir.passes.PassResult(model, modified=result.modified)


@dataclasses.dataclass
class FoldOptions:
    #: Nodes with an input larger than this many elements are not folded (Shape/Size excepted).
    input_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
    #: A folded result larger than this many elements is not materialised.
    output_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT


@register("cleanup.fold-constants")
class FoldConstants(KilnPass):
    """Evaluate subgraphs whose inputs are all constant and replace them by their value, then drop dead nodes.

    Folding shape arithmetic (Shape -> Gather -> Concat -> Reshape) is what lets later passes see static shapes.
    """

    Options = FoldOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _run(
            model,
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=self.options.input_size_limit,
                output_size_limit=self.options.output_size_limit,
            ),
            common.RemoveUnusedNodesPass(),
        )


@register("cleanup.remove-unused")
class RemoveUnused(KilnPass):
    """Remove nodes whose outputs nobody reads, unused functions and unused opset imports."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _run(
            model,
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        )


@register("cleanup.identity")
class RemoveIdentity(KilnPass):
    """Remove Identity nodes, rewiring their consumers (and graph outputs) to the Identity's input."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _run(model, common.IdentityEliminationPass())


@register("cleanup.shape-inference")
class InferShapes(KilnPass):
    """Annotate every value with the dtype and shape ONNX shape inference derives (weights are not serialized)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _run(model, common.ShapeInferencePass())


@dataclasses.dataclass
class OptimizeOptions:
    #: Rounds of folding and rewriting; stops early once a round changes nothing.
    iterations: int = 2
    input_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
    output_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")


@register("cleanup.optimize")
class Optimize(KilnPass):
    """The onnxscript optimizer: inline functions, fold constants, apply its default rewrite rules, lift
    constants to initializers, deduplicate initializers and eliminate common subexpressions."""

    Options = OptimizeOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _fingerprint(model)
        optimizer.optimize(
            model,
            num_iterations=self.options.iterations,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
        )
        return ir.passes.PassResult(model, modified=_fingerprint(model) != before)


def _fingerprint(model: ir.Model) -> tuple:
    """A cheap structural summary, to tell whether a pass that does not report it changed the graph."""
    graph = model.graph
    return (
        tuple((node.op_type, node.domain, len(node.inputs)) for node in graph),
        tuple(graph.initializers),
        len(model.functions),
    )
