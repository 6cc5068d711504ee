"""quantize.awq: scales by the formula, folds that keep the float model exact, and errors below RTN's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.compiler import registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import RecipeError
from kiln.passes import KilnPass, PassContext, _weights, create
from kiln.passes.quantize import awq

D, FF = 64, 128


def _block(norm: str = "mul") -> ir.Model:
    """A Llama-like block with every fold case; the same model on every call.

    x -> RMSNorm-like Mul(gamma) or LayerNormalization -> Q, K, V (one input); gate/up -> silu(gate) * up -> down;
    o reads Relu(x), which is also a graph output (no exact fold: an inserted Mul).
    """
    rng = np.random.default_rng(11)
    inits = {"gamma": rng.uniform(0.5, 2.0, D).astype(np.float32)}
    shapes = {
        "Wq": (D, D),
        "Wk": (D, 32),
        "Wv": (D, 32),
        "Wgate": (D, FF),
        "Wup": (D, FF),
        "Wdown": (FF, D),
        "Wo": (D, D),
    }
    for name, shape in shapes.items():
        inits[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    if norm == "mul":
        nodes = [helper.make_node("Mul", ["x", "gamma"], ["a"], name="norm")]
    else:
        inits["beta"] = rng.uniform(-0.5, 0.5, D).astype(np.float32)
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["a"], name="norm", axis=-1)]
    nodes += [
        helper.make_node("MatMul", ["a", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["a", "Wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["a", "Wv"], ["v"], name="v_proj"),
        helper.make_node("MatMul", ["a", "Wgate"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["a", "Wup"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "Wdown"], ["down"], name="down_proj"),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "Wo"], ["o"], name="o_proj"),
    ]
    outputs = {"q": D, "k": 32, "v": 32, "down": D, "o": D, "r": D}
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", n]) for name, n in outputs.items()],
        [numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    """Activations with a few outlier channels (what AWQ protects)."""
    rng = np.random.default_rng(5)
    scale = np.ones(D, np.float32)
    scale[[3, 17, 40]] = 12.0
    return [{"x": (rng.standard_normal((96, D)) * scale + 0.3).astype(np.float32)} for _ in range(count)]


def _run_all(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs by name for each feed; DequantizeLinear + MatMul keep float activations (exact comparisons)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, feed))) for feed in feeds]


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _run_all(model, [feed])[0]


def _quantize(model: ir.Model, name: str, feeds: list[dict[str, np.ndarray]], **options: object) -> KilnPass:
    pass_ = create(
        name, {"min_elements": 0, "group_size": 32, **options}, PassContext(calibration=CalibrationData(feeds))
    )
    kiln.Pipeline([pass_])(model)
    return pass_


def _errors(model: ir.Model, feeds: list[dict[str, np.ndarray]], norm: str = "mul") -> dict[str, float]:
    reference = _block(norm)
    noise: dict[str, float] = {}
    signal: dict[str, float] = {}
    for expected, actual in zip(_run_all(reference, feeds), _run_all(model, feeds)):
        for name, y in actual.items():
            noise[name] = noise.get(name, 0.0) + float(np.square(y - expected[name], dtype=np.float64).sum())
            signal[name] = signal.get(name, 0.0) + float(np.square(expected[name], dtype=np.float64).sum())
    return {name: float(np.sqrt(noise[name] / signal[name])) if signal[name] else 0.0 for name in noise}


def test_scales_follow_the_formula() -> None:
    m = np.array([0.0, 0.5, 2.0, 8.0])
    s = awq.awq_scales(m, 0.5)
    raw = np.maximum(m**0.5, 1e-4)
    np.testing.assert_allclose(s, raw / np.sqrt(raw.max() * raw.min()))
    np.testing.assert_array_equal(awq.awq_scales(m, 0.0), np.ones(4))


def test_duo_scales_follow_the_formula() -> None:
    w = np.array([[1.0, -4.0], [2.0, 2.0], [-3.0, 1.0], [1.0, 1.0]])
    # Groups of 2 rows: column maxima 2, 4 (rows 0-1) and 3, 1 (rows 2-3).
    expected = np.array([(1 / 2 + 4 / 4) / 2, (2 / 2 + 2 / 4) / 2, (3 / 3 + 1 / 1) / 2, (1 / 3 + 1 / 1) / 2])
    np.testing.assert_allclose(awq.relative_weight_mean(w, 2), expected)
    np.testing.assert_allclose(awq.relative_weight_mean(w, 0), (np.abs(w) / [3, 4]).mean(axis=1))  # per channel
    m = np.array([0.5, 2.0, 8.0, 1.0])
    raw = m**0.25 / (expected**0.75 + 1e-4)
    np.testing.assert_allclose(awq.awq_scales(m, 0.25, expected), raw / np.sqrt(raw.max() * raw.min()))


def _nodes_by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {node.name: node for node in model.graph}


@pytest.mark.parametrize("norm", ["mul", "layernorm"])
def test_plans_and_float_exactness(norm: str) -> None:
    """Folding random scales, with the weights scaled by hand, leaves every output as it was."""
    model = _block(norm)
    feed = _feeds(1)[0]
    expected = _run(model, feed)
    nodes = _nodes_by_name(model)
    graph = model.graph
    weights = {name: graph.initializers[name] for name in ("Wq", "Wk", "Wv", "Wgate", "Wup", "Wdown", "Wo")}
    groups = {"a": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "hidden": ["down_proj"], "r": ["o_proj"]}
    names = _weights.NameScope(model)
    rng = np.random.default_rng(0)
    kinds = {}
    scaled_rows: dict[str, np.ndarray] = {}
    scaled_columns: dict[str, np.ndarray] = {}
    for tensor, members in groups.items():
        consumers = [nodes[m] for m in members]
        a = consumers[0].inputs[0]
        k = weights[consumers[0].inputs[1].name].shape[0]
        fold = awq.plan_fold(a, consumers, k, set(weights.values()), insert_mul=True)
        kinds[tensor] = fold.kind
        s = rng.uniform(0.25, 4.0, k)
        awq.apply_fold(graph, fold, a, consumers, s, names)
        for node in consumers:
            scaled_rows[node.inputs[1].name] = s
        if fold.owner is not None:
            scaled_columns[fold.owner.name] = 1 / s
    assert kinds == {"a": "constant" if norm == "mul" else "norm", "hidden": "columns", "r": "mul"}
    for name, value in weights.items():
        array = value.const_value.numpy().astype(np.float64)
        array = array * scaled_rows[name][:, None] * scaled_columns.get(name, np.ones(array.shape[1]))[None, :]
        value.const_value = ir.tensor(array.astype(np.float32), name=name)
    for name, y in _run(model, feed).items():
        np.testing.assert_allclose(y, expected[name], rtol=1e-4, atol=1e-4 * np.abs(expected[name]).max())


@pytest.mark.parametrize("magnitude", ["rms", "mean_abs"])
def test_pass_folds_the_searched_scale_as_the_formula_says(magnitude: str) -> None:
    def channel_magnitude(x: np.ndarray) -> np.ndarray:
        return np.sqrt(np.square(x).mean(axis=0)) if magnitude == "rms" else np.abs(x).mean(axis=0)

    feeds = _feeds()
    model = _block()
    details = _quantize(model, "quantize.awq", feeds, bits=4, magnitude=magnitude).details
    layers = details["layers"]
    a = np.concatenate([f["x"] for f in feeds]) * _block().graph.initializers["gamma"].const_value.numpy()
    alpha = layers["q_proj"]["alpha"]
    assert {layers[n]["alpha"] for n in ("k_proj", "v_proj", "gate_proj", "up_proj")} == {alpha}
    s = awq.awq_scales(channel_magnitude(a), alpha)
    norm = _nodes_by_name(model)["norm"]
    gamma = _block().graph.initializers["gamma"].const_value.numpy()
    np.testing.assert_allclose(norm.inputs[1].const_value.numpy(), gamma / s, rtol=1e-5)
    assert layers["q_proj"]["fold"] == "constant of Mul node 'norm'"
    assert layers["down_proj"]["fold"] == "output columns of weight 'Wup'"
    assert layers["up_proj"]["output_columns_scaled"] is True
    assert layers["o_proj"]["fold"] == "inserted Mul"
    inserted = next(node for node in model.graph if node.op_type == "Mul" and node.inputs[0].name == "r")
    r = np.maximum(np.concatenate([f["x"] for f in feeds]), 0)
    expected = 1 / awq.awq_scales(channel_magnitude(r), layers["o_proj"]["alpha"])
    np.testing.assert_allclose(inserted.inputs[1].const_value.numpy(), expected, rtol=1e-5)
    # The reported output errors are what ONNX Runtime measures on the calibration data (for the layers reading
    # float inputs: down_proj's input carries the errors of gate and up).
    measured = _errors(model, feeds)
    for layer, output in (("q_proj", "q"), ("k_proj", "k"), ("o_proj", "o")):
        assert layers[layer]["output_rel_error"] == pytest.approx(measured[output], rel=1e-3)


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_output_error_below_rtn(fmt: str) -> None:
    feeds = _feeds()
    runs = {"rtn": ("quantize.rtn", {}), "scaled": ("quantize.awq", {"clip": False}), "clipped": ("quantize.awq", {})}
    errors = {}
    for label, (name, options) in runs.items():
        model = _block()
        _quantize(model, name, feeds, bits=4, format=fmt, **options)
        errors[label] = _errors(model, feeds)
    for output in ("q", "k", "v", "down", "o"):
        assert errors["scaled"][output] <= errors["rtn"][output]
        # Clipping minimizes each group's own error; the terms across groups it ignores may differ a little.
        assert errors["clipped"][output] <= 1.02 * errors["scaled"][output]
    assert errors["clipped"]["r"] == 0.0  # the output beside the inserted Mul is untouched


def test_gptq_on_the_scaled_weights() -> None:
    feeds = _feeds()
    errors = {}
    for method in ("rtn", "gptq"):
        model = _block()
        layers = _quantize(model, "quantize.awq", feeds, method=method).details["layers"]
        errors[method] = sum(layers[name]["output_rel_error"] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        measured = _errors(model, feeds)
        assert layers["o_proj"]["output_rel_error"] == pytest.approx(measured["o"], rel=1e-3)
    assert errors["gptq"] < errors["rtn"]


def test_duo_scaling_beats_rtn() -> None:
    feeds = _feeds()
    rtn = _block()
    _quantize(rtn, "quantize.rtn", feeds, bits=3)
    duo = _block()
    layers = _quantize(duo, "quantize.awq", feeds, bits=3, clip=False, duo_scaling=True).details["layers"]
    assert 0 <= layers["q_proj"]["alpha"] < 1
    assert layers["q_proj"]["search_error_vs_rtn"] < 1
    errors = {"rtn": _errors(rtn, feeds), "duo": _errors(duo, feeds)}
    for output in ("q", "k", "v", "o"):
        assert errors["duo"][output] < errors["rtn"][output]


def test_nothing_folded_when_rtn_wins() -> None:
    """With one grid point and no duo scaling the only candidate is alpha 0, RTN itself: the graph keeps its scales."""
    model = _block()
    layers = _quantize(model, "quantize.awq", _feeds(2), grid_points=1).details["layers"]
    assert {layers[name]["fold"] for name in ("q_proj", "down_proj", "o_proj")} == {
        "not scaled (no scale beat RTN's on the calibration data)"
    }
    gamma = _block().graph.initializers["gamma"].const_value.numpy()
    np.testing.assert_array_equal(_nodes_by_name(model)["norm"].inputs[1].const_value.numpy(), gamma)
    assert not any(node.op_type == "Mul" and node.inputs[0].name == "r" for node in model.graph)


def test_without_insert_mul_unfoldable_inputs_keep_scale_one() -> None:
    model = _block()
    layers = _quantize(model, "quantize.awq", _feeds(2), insert_mul=False).details["layers"]
    assert layers["o_proj"]["fold"] == "not scaled (no exact fold)"
    assert "alpha" not in layers["o_proj"]
    assert not any(node.op_type == "Mul" and node.inputs[0].name == "r" for node in model.graph)


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_sequential_reports_the_measured_error_and_refits_the_down_projection(fmt: str) -> None:
    """Every fold kind during the walk (norm constant, an inserted Mul, the up projection's emitted columns): each
    layer's reported error is its measured error against the float model, and the down projection, fitted to the
    inputs the quantized gate/up give it, lands closer to the float output than the one-pass fit."""
    feeds = _feeds()
    errors = {}
    for sequential in (False, True):
        model = _block()
        layers = _quantize(model, "quantize.awq", feeds, bits=3, format=fmt, sequential=sequential).details["layers"]
        measured = _errors(model, feeds)
        if sequential:
            assert layers["down_proj"]["fold"] == "output columns of weight 'Wup'"
            assert layers["o_proj"]["fold"] == "inserted Mul"
            for layer, output in (("q_proj", "q"), ("k_proj", "k"), ("down_proj", "down"), ("o_proj", "o")):
                assert layers[layer]["refit"] is True
                assert "alpha" in layers[layer]
                assert layers[layer]["output_rel_error"] == pytest.approx(measured[output], rel=1e-3)
            assert measured["r"] == 0.0
        errors[sequential] = measured
    assert errors[True]["down"] < errors[False]["down"]
    for output in ("q", "k", "v", "o"):  # inputs no earlier quantized layer changes: the one-pass fit exactly
        assert errors[True][output] == pytest.approx(errors[False][output], rel=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grid_points": 0}, "grid_points must be >= 1"),
        ({"method": "svd"}, "must be one of 'rtn', 'gptq'"),
        ({"stages": 4}, "stages must be 1 here, got 4: use sequential=True"),
        ({"sequential": True, "magnitude": "mean_abs"}, "sequential=True measures channels by their RMS"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        registry.make_options("quantize.awq", options)
