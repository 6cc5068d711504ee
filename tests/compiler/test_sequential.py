"""Sequential calibration: segment by segment, the same tensors as a full run, and rewrites reach later steps."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from kiln import CalibrationData, testing
from kiln.compiler.sequential import PairReducer, Sequential
from kiln.errors import CalibrationError


class Keep(PairReducer):
    """Every (reference, current) batch, kept for the test."""

    def __init__(self) -> None:
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, reference: np.ndarray, current: np.ndarray) -> None:
        self.pairs.append((reference, current))


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def _hidden(w: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of matmul1 (h2) and matmul2 (h5) of ``testing.mlp([8, 16, 16, 4])``, by numpy."""
    h2 = np.maximum(x @ w["w0"] + w["b0"], 0)
    h5 = np.maximum(h2 @ w["w1"] + w["b1"], 0)
    return {"h2": h2, "h5": h5}


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]


def test_steps_give_the_tensors_of_a_full_run() -> None:
    model = testing.mlp([8, 16, 16, 4])
    feeds = _feeds()
    walk = Sequential(CalibrationData(feeds), model, model.clone())
    kept = {"h2": Keep(), "h5": Keep()}
    walk.collect({"h2": [kept["h2"]]})
    walk.collect({"h5": [kept["h5"]]})
    for name, keep in kept.items():
        assert len(keep.pairs) == len(feeds)
        for feed, (reference, current) in zip(feeds, keep.pairs):
            expected = _hidden(_weights(model), feed["x"])[name]
            np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(reference, current)
    # After the last step only the cut's frontier is cached: h5 (read by matmul2), not x or h2.
    assert set(walk.current.frontiers[0]) == {"h5"}


def test_a_rewrite_between_steps_changes_later_tensors_of_the_current_model_only() -> None:
    model = testing.mlp([8, 16, 16, 4])
    original = _weights(model)
    feeds = _feeds()
    walk = Sequential(CalibrationData(feeds), model, model.clone())
    walk.collect({"h2": [Keep()]})
    # The caller rewrites the layer after the cut: matmul1's weight doubled.
    w1 = model.graph.initializers["w1"]
    w1.const_value = ir.tensor(2 * original["w1"], name="w1")
    keep = Keep()
    walk.collect({"h5": [keep]})
    changed = dict(original, w1=2 * original["w1"])
    for feed, (reference, current) in zip(feeds, keep.pairs):
        np.testing.assert_allclose(reference, _hidden(original, feed["x"])["h5"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(current, _hidden(changed, feed["x"])["h5"], rtol=1e-5, atol=1e-6)
        assert not np.allclose(reference, current)


def test_revise_follows_a_rewrite_before_the_cut() -> None:
    """A caller that rescales a tensor already computed (cached at the cut) revises the cache, so later steps see
    what the rewritten model computes; the reference is untouched, and a tensor not cached is refused."""
    model = testing.mlp([8, 16, 16, 4])
    original = _weights(model)
    feeds = _feeds()
    walk = Sequential(CalibrationData(feeds), model, model.clone())
    walk.collect({"h2": [Keep()]})
    # Fold a factor 3 into the producer of h2 (a ReLU layer: scaling its weight and bias scales h2) ...
    for name in ("w0", "b0"):
        model.graph.initializers[name].const_value = ir.tensor(3 * original[name], name=name)
    walk.revise("h2", lambda h: 3 * h)
    keep = Keep()
    walk.collect({"h5": [keep]})
    changed = dict(original, w0=3 * original["w0"], b0=3 * original["b0"])
    for feed, (reference, current) in zip(feeds, keep.pairs):
        np.testing.assert_allclose(reference, _hidden(original, feed["x"])["h5"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(current, _hidden(changed, feed["x"])["h5"], rtol=1e-5, atol=1e-5)
    with pytest.raises(CalibrationError, match="tensor 'h2' is not cached at the walk's cut"):
        walk.revise("h2", lambda h: h)


def test_a_skip_connection_stays_in_the_frontier() -> None:
    """y = relu(x W0) W1 + x: x must be cached across the cut after relu, since the Add reads it later."""
    rng = np.random.default_rng(1)
    x = testing.value("x", ["b", 6])
    w0 = testing.initializer("w0", rng.standard_normal((6, 6)).astype(np.float32))
    w1 = testing.initializer("w1", rng.standard_normal((6, 6)).astype(np.float32))
    mm0 = ir.node("MatMul", [x, w0], name="mm0")
    relu = ir.node("Relu", [mm0.outputs[0]], name="relu")
    mm1 = ir.node("MatMul", [relu.outputs[0], w1], name="mm1")
    add = ir.node("Add", [mm1.outputs[0], x], name="add")
    for node, name in ((mm0, "a"), (relu, "h"), (mm1, "m"), (add, "y")):
        node.outputs[0].name = name
    add.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    add.outputs[0].shape = ir.Shape(["b", 6])
    model = testing.model([x], [add.outputs[0]], [mm0, relu, mm1, add], [w0, w1])
    feeds = [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(2)]
    walk = Sequential(CalibrationData(feeds), model)
    walk.collect({"h": [Keep()]})
    assert set(walk.current.frontiers[0]) == {"h", "x"}
    keep = Keep()
    walk.collect({"m": [keep]})
    expected = np.maximum(feeds[1]["x"] @ w0.const_value.numpy(), 0) @ w1.const_value.numpy()
    np.testing.assert_allclose(keep.pairs[1][1], expected, rtol=1e-5, atol=1e-5)
    # x was produced before both cuts; the Add still reads it, so a later step can still ask for it.
    skip = Keep()
    walk.collect({"x": [skip]})
    np.testing.assert_array_equal(skip.pairs[1][1], feeds[1]["x"])


def test_unknown_tensor_and_empty_data_are_refused() -> None:
    model = testing.mlp([8, 16, 4])
    walk = Sequential(CalibrationData(_feeds()), model)
    with pytest.raises(CalibrationError, match="no tensor named 'nope'"):
        walk.collect({"nope": [Keep()]})
    with pytest.raises(CalibrationError, match="is empty"):
        Sequential(CalibrationData([]), model)
