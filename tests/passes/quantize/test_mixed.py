"""quantize.mixed: the knapsack against brute force, the budget, and bias correction (a CalibratedOptions option)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.testing
from kiln.compiler import registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError, RecipeError
from kiln.passes import KilnPass, PassContext, create
from kiln.passes.quantize import grid, mixed


def _brute_force(sizes: list[int], bits: list[int], errors: np.ndarray, budget: float) -> float:
    best = np.inf
    for picks in itertools.product(range(len(bits)), repeat=len(sizes)):
        if sum(s * bits[c] for s, c in zip(sizes, picks)) <= budget:
            best = min(best, sum(errors[i, c] for i, c in enumerate(picks)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    items = int(rng.integers(2, 7))
    bits = sorted(rng.choice([2, 3, 4, 6, 8], size=int(rng.integers(2, 4)), replace=False).tolist())
    sizes = (rng.integers(1, 9, items) * 64).tolist()
    errors = np.sort(rng.uniform(0, 1, (items, len(bits))), axis=1)[:, ::-1]  # more bits, less error
    budget = float(rng.uniform(min(bits), max(bits)) * sum(sizes))
    picks, exact = mixed.allocate(sizes, bits, errors, budget)
    assert exact
    assert sum(s * bits[c] for s, c in zip(sizes, picks)) <= budget
    assert sum(errors[i, c] for i, c in enumerate(picks)) == pytest.approx(_brute_force(sizes, bits, errors, budget))


def test_coarse_knapsack_still_respects_the_budget() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1000, 5000, 6).tolist()  # no common unit: the budget axis is rounded
    bits = [2, 4, 8]
    errors = np.sort(rng.uniform(0, 1, (6, 3)), axis=1)[:, ::-1]
    budget = 3.5 * sum(sizes)
    picks, exact = mixed.allocate(sizes, bits, errors, budget, max_states=50)
    assert not exact
    assert sum(s * bits[c] for s, c in zip(sizes, picks)) <= budget
    optimum = _brute_force(sizes, bits, errors, budget)
    assert optimum <= sum(errors[i, c] for i, c in enumerate(picks)) <= optimum + 0.5


def test_budget_below_the_smallest_width_is_an_error() -> None:
    with pytest.raises(KilnError, match="below the smallest candidate width"):
        mixed.allocate([64, 64], [2, 4], np.zeros((2, 2)), 1.5 * 128)


# -- the pass ------------------------------------------------------------------------------------------------------


def _feeds(k: int, count: int = 3, offset: float = 0.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": (rng.standard_normal((64, k)) + offset).astype(np.float32)} for _ in range(count)]


def _quantize(model: ir.Model, name: str, feeds: list[dict[str, np.ndarray]], **options: object) -> KilnPass:
    pass_ = create(name, {"min_elements": 0, **options}, PassContext(calibration=CalibrationData(feeds)))
    kiln.Pipeline([pass_])(model)
    return pass_


def _run(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_pass_respects_the_budget_and_runs(fmt: str) -> None:
    sizes = [128, 256, 128, 64, 64]
    feeds = _feeds(128)
    model = kiln.testing.mlp(sizes, seed=2)
    details = _quantize(model, "quantize.mixed", feeds, group_size=32, average_bits=3.0, format=fmt).details
    layers = details["layers"]
    elements = {f"matmul{i}": k * n for i, (k, n) in enumerate(itertools.pairwise(sizes))}
    used = sum(layers[name]["bits"] * count for name, count in elements.items())
    assert used <= 3.0 * sum(elements.values())
    assert details["allocation"]["average_bits"] == pytest.approx(used / sum(elements.values()))
    assert details["allocation"]["exact"] is True
    assert {layers[name]["bits"] for name in elements} <= {2, 4, 8}
    assert all(set(layer["sensitivity"]) == {"2", "4", "8"} for layer in layers.values())
    if fmt == "dq":
        assert model.opset_imports[""] >= 25  # INT2 needs opset 25
    reference = _run(kiln.testing.mlp(sizes, seed=2), feeds[:1])[0]
    (y,) = _run(model, feeds[:1])
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 0.5


def test_model_sensitivity_is_the_models_output_error_with_that_layer_alone_quantized() -> None:
    sizes = [64, 128, 64, 32]
    feeds = _feeds(64)
    model = kiln.testing.mlp(sizes, seed=5)
    options = {"candidate_bits": [2, 4], "average_bits": 3.0, "method": "rtn", "clip": False, "group_size": 32}
    details = _quantize(model, "quantize.mixed", feeds, sensitivity_batches=2, **options).details
    assert details["allocation"]["sensitivity"] == "model"
    reference = kiln.testing.mlp(sizes, seed=5)
    expected = np.concatenate(_run(reference, feeds[:2]))
    for i in range(len(sizes) - 1):
        alone = kiln.testing.mlp(sizes, seed=5)
        weight = alone.graph.initializers[f"w{i}"]
        w = weight.const_value.numpy()
        dequantized = grid.dequantize(grid.quantize(w, grid.GridSpec(2, 32, False)))
        weight.const_value = ir.tensor(dequantized, name=f"w{i}")
        y = np.concatenate(_run(alone, feeds[:2]))
        error = float(np.square(y - expected, dtype=np.float64).sum() / np.square(expected, dtype=np.float64).sum())
        assert details["layers"][f"matmul{i}"]["sensitivity"]["2"] == pytest.approx(error, rel=1e-4)
        assert details["layers"][f"matmul{i}"]["sensitivity"]["4"] < error


def test_layer_sensitivity_needs_no_model_runs() -> None:
    model = kiln.testing.mlp([64, 128, 32], seed=5)
    details = _quantize(model, "quantize.mixed", _feeds(64), sensitivity="layer", group_size=32).details
    assert details["allocation"]["sensitivity"] == "layer"
    assert all(0 < layer["sensitivity"]["2"] < 1 for layer in details["layers"].values())


def test_more_budget_never_hurts() -> None:
    feeds = _feeds(128)
    totals = []
    for average in (2.0, 3.0, 4.0, 8.0):
        model = kiln.testing.mlp([128, 256, 128, 64], seed=2)
        details = _quantize(model, "quantize.mixed", feeds, group_size=32, average_bits=average, method="rtn").details
        totals.append(details["allocation"]["sum_error"])
    assert totals == sorted(totals, reverse=True)
    assert totals[-1] < 1e-3  # everything at 8 bits


def _linear(k: int, n: int, gemm: bool) -> ir.Model:
    rng = np.random.default_rng(4)
    inits = {"W": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)}
    if gemm:
        inits["C"] = rng.standard_normal(n).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc")
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    graph = helper.make_graph(
        [node],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("name", ["quantize.mixed", "quantize.gptq", "quantize.awq"])
@pytest.mark.parametrize(("fmt", "gemm"), [("matmulnbits", False), ("matmulnbits", True), ("dq", False), ("dq", True)])
def test_bias_correction_removes_the_mean_output_error(name: str, fmt: str, gemm: bool) -> None:
    k, n = 128, 48
    feeds = _feeds(k, offset=1.0)  # inputs with a mean: quantization errors then shift the output's mean
    options = {"group_size": 32, "format": fmt, "bits": 2}
    if name == "quantize.mixed":
        options |= {"candidate_bits": [2], "average_bits": 2.0, "method": "rtn"}
    reference = np.concatenate(_run(_linear(k, n, gemm), feeds))
    mean_errors = []
    for correct in (False, True):
        model = _linear(k, n, gemm)
        _quantize(model, name, feeds, bias_correction=correct, **options)
        error = np.concatenate(_run(model, feeds)) - reference
        mean_errors.append(np.abs(error.mean(axis=0)).max() / np.abs(reference).mean())
    assert mean_errors[0] > 0.01
    assert mean_errors[1] < 1e-4
    ops = [node.op_type for node in model.graph]
    assert ops.count("Add") == (0 if fmt == "matmulnbits" else 1 + gemm)  # MatMulNBits takes it as its bias


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"candidate_bits": [3, 4]}, "a 3-bit grid is stored in 4 bits"),
        ({"candidate_bits": [4, 6], "format": "dq"}, "a 6-bit grid is stored in 8 bits"),
        ({"candidate_bits": []}, "at least one width"),
        ({"average_bits": 1.5}, "below the smallest candidate"),
        ({"group_size": 0}, "2-bit MatMulNBits needs block_size <= 256"),
        ({"sensitivity_batches": 0}, "sensitivity_batches must be >= 1"),
        ({"stages": 2}, "stages must be 1 here, got 2"),
        ({"sequential": True}, "sequential=True is not available here"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        registry.make_options("quantize.mixed", options)


def test_accuracy_level_4_runs_every_width_with_int8_activations() -> None:
    """The mixed-3.5 recipe's setting: 2- and 8-bit layers at level 4 (ONNX Runtime's fast path for those widths at
    any shape) compute what level 0 computes, up to the int8 rounding of the activations."""
    sizes = [128, 256, 128, 64, 64]
    feeds = _feeds(128)
    model = kiln.testing.mlp(sizes, seed=2)
    options = {"candidate_bits": [2, 8], "average_bits": 5.0, "group_size": 32, "accuracy_level": 4}
    layers = _quantize(model, "quantize.mixed", feeds, **options).details["layers"]
    assert {layer["bits"] for layer in layers.values()} == {2, 8}
    nodes = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert len(nodes) == 4 and all(node.attributes.get_int("accuracy_level") == 4 for node in nodes)
    (level4,) = _run(model, feeds[:1])
    for node in nodes:
        node.attributes.pop("accuracy_level")
    (level0,) = _run(model, feeds[:1])
    assert np.linalg.norm(level4 - level0) / np.linalg.norm(level0) < 0.02
