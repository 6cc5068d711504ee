"""Cleanup passes on tiny graphs: what each removes or folds, and that outputs do not change."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln import Pipeline, testing
from kiln.passes import create


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def constant_subgraph_model() -> ir.Model:
    """y = x @ (W * 2 + 1) + Identity(b): a foldable weight expression, an Identity, and a dead branch."""
    rng = np.random.default_rng(0)
    x = testing.value("x", [2, 4])
    w = testing.initializer("w", rng.standard_normal((4, 3)).astype(np.float32))
    two = testing.initializer("two", np.array(2.0, np.float32))
    one = testing.initializer("one", np.array(1.0, np.float32))
    b = testing.initializer("b", rng.standard_normal(3).astype(np.float32))
    scaled = ir.node("Mul", [w, two], name="scale")
    shifted = ir.node("Add", [scaled.outputs[0], one], name="shift")
    mm = ir.node("MatMul", [x, shifted.outputs[0]], name="mm")
    ident = ir.node("Identity", [b], name="ident")
    add = ir.node("Add", [mm.outputs[0], ident.outputs[0]], name="add")
    dead = ir.node("Neg", [x], name="dead")
    for i, node in enumerate([scaled, shifted, mm, ident, add, dead]):
        node.outputs[0].name = f"v{i}"
    y = add.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(testing.FLOAT), ir.Shape([2, 3])
    return testing.model([x], [y], [scaled, shifted, mm, ident, add, dead], [w, two, one, b])


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_fold_constants_evaluates_the_weight_expression():
    model = constant_subgraph_model()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = run(model, x)
    Pipeline([create("cleanup.fold-constants")])(model)
    assert "Mul" not in ops(model) and "Neg" not in ops(model)
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-6)


def test_fold_constants_respects_size_limits():
    model = constant_subgraph_model()
    Pipeline([create("cleanup.fold-constants", {"input_size_limit": 4, "output_size_limit": 4})])(model)
    assert "Mul" in ops(model)  # the 4x3 weight is over the limit


def test_identity_and_unused_removal():
    model = constant_subgraph_model()
    Pipeline([create("cleanup.identity"), create("cleanup.remove-unused")])(model)
    assert ops(model) == ["Mul", "Add", "MatMul", "Add"]


def test_optimize_leaves_only_the_matmul_and_add():
    model = constant_subgraph_model()
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    expected = run(model, x)
    records = Pipeline([create("cleanup.optimize")])(model)
    assert records[0].modified
    assert ops(model) == ["MatMul", "Add"]
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-6)


def test_optimize_reports_unmodified_when_nothing_to_do():
    model = testing.mlp([4, 8, 2])
    records = Pipeline([create("cleanup.optimize")])(model)
    assert records[0].modified is False


def test_shape_inference_fills_intermediate_shapes():
    model = testing.mlp([4, 8, 2], batch=3)
    for node in model.graph:
        for value in node.outputs:
            if value.name != "y":
                value.shape = None
    Pipeline([create("cleanup.shape-inference")])(model)
    assert model.graph.node(0).outputs[0].shape == ir.Shape([3, 8])
