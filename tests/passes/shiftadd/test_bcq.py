"""The shiftadd.bcq pass on tiny graphs, run in ONNX Runtime (through the op's function form) against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln import testing
from kiln.compiler import recipes, registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError, RecipeError
from kiln.passes import PassContext
from kiln.passes.quantize import int8
from kiln.passes.quantize.value_gram import value_grams
from kiln.passes.shiftadd.bcq import ShiftAddBCQ
from kiln.passes.shiftadd.fit import BCQWeight, bcq_gptq
from kiln.runtime_ops import shiftadd

RNG = np.random.default_rng(0)


def _calibration(k: int, batches: int = 3) -> CalibrationData:
    return CalibrationData([{"x": RNG.standard_normal((32, k)).astype(np.float32)} for _ in range(batches)])


def _run_pass(model: ir.Model, k: int, **options: object) -> ShiftAddBCQ:
    pass_ = registry.create("shiftadd.bcq", {"min_elements": 0} | options, PassContext(calibration=_calibration(k)))
    assert isinstance(pass_, ShiftAddBCQ)
    assert pass_(model).modified
    return pass_


def _session(model: ir.Model | onnx.ModelProto) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _packed_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Each ShiftAddMatMul node's weight [K, N] by the op's numpy reference, keyed by the node's A input."""
    weights = {}
    for node in model.graph:
        if node.op_type == shiftadd.OP_TYPE:
            attrs = node.attributes
            packed = shiftadd.PackedWeight(
                node.inputs[1].const_value.numpy(),
                node.inputs[2].const_value.numpy(),
                attrs.get_int("K"),
                attrs.get_int("N"),
                attrs.get_int("bits"),
                attrs.get_int("group_size"),
            )
            weights[node.name] = shiftadd.dequantize(packed)
    return weights


def test_mlp_is_rewritten_and_runs_as_the_reference() -> None:
    model = testing.mlp([64, 96, 48, 32])
    original = ir.to_proto(model)
    pass_ = _run_pass(model, 64, bits=3, group_size=32)
    assert [n.op_type for n in model.graph if n.op_type in ("MatMul", shiftadd.OP_TYPE)] == [shiftadd.OP_TYPE] * 3
    assert model.opset_imports[shiftadd.DOMAIN] == 1 and (shiftadd.DOMAIN, shiftadd.OP_TYPE, "") in model.functions
    assert not {"w0", "w1", "w2"} & set(model.graph.initializers)  # float weights removed
    layers = pass_.details["layers"]
    assert [layer["bits"] for layer in layers.values()] == [3, 3, 3]
    assert layers["matmul0"]["bytes_after"] == 96 * 3 * 8 + 96 * 3 * 2  # planes [96, 3, 8], exponents [96, 3, 2]
    assert pass_.details["bytes_after"] < pass_.details["bytes_before"] / 8

    x = RNG.standard_normal((16, 64)).astype(np.float32)
    y = _session(model).run(None, {"x": x})[0]
    # numpy forward with the op reference's weights and the original biases
    weights = list(_packed_weights(model).values())
    biases = [numpy_helper.to_array(t) for t in original.graph.initializer if t.name.startswith("b")]
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w + b
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(y, h, rtol=0, atol=1e-4 * np.abs(h).max())
    # and close to the float model
    y_float = _session(original).run(None, {"x": x})[0]
    assert np.linalg.norm(y - y_float) / np.linalg.norm(y_float) < 0.45  # measured 0.32


@pytest.mark.parametrize("stages", [1, 2])
def test_stages_fit_later_layers_on_the_fitted_model(stages: int) -> None:
    """With 2 stages the second layer's Gram comes from the hidden activations the fitted first layer makes, so its
    reported output error is the one measured on them; with 1 stage it is not."""
    model = testing.mlp([64, 64, 32], seed=5)
    w1 = model.graph.initializers["w1"].const_value.numpy().astype(np.float64)
    feeds = [{"x": RNG.standard_normal((32, 64)).astype(np.float32)} for _ in range(3)]
    options = {"min_elements": 0, "bits": 2, "group_size": 32, "stages": stages}
    pass_ = registry.create("shiftadd.bcq", options, PassContext(calibration=CalibrationData(feeds)))
    assert pass_(model).modified
    calibration = pass_.details["calibration"]
    assert (calibration["stages"], calibration["passes"], calibration["tensors"]) == (stages, stages, 2)

    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in ("h2", "h3"):  # input and output of the second matmul
        values[name].type = ir.TensorType(ir.DataType.FLOAT)
        values[name].shape = ir.Shape(["batch", 64 if name == "h2" else 32])
        model.graph.outputs.append(values[name])
    session = _session(model)
    outs = [session.run(["h2", "h3"], feed) for feed in feeds]
    expected = np.concatenate([h2.astype(np.float64) @ w1 for h2, _ in outs])
    measured = int8.relative_error(expected, np.concatenate([h3 for _, h3 in outs]))
    reported = pass_.details["layers"]["matmul1"]["output_rel_error"]
    if stages == 2:
        assert reported == pytest.approx(measured, rel=1e-3)
    else:
        assert abs(reported - measured) > 0.02 * measured


def test_sequential_fits_later_layers_to_the_float_outputs() -> None:
    """With ``sequential`` the second layer is fitted from the hidden activations the fitted first layer makes,
    toward the float model's outputs: its reported error is the one measured against the float model, and the
    model's output error is lower than with 2 stages (each layer fitted toward its own inputs' image)."""
    feeds = [{"x": RNG.standard_normal((32, 64)).astype(np.float32)} for _ in range(3)]
    float_model = testing.mlp([64, 64, 32], seed=5)
    bias = float_model.graph.initializers["b1"].const_value.numpy()
    expected = np.concatenate([_session(float_model).run(None, feed)[0] for feed in feeds]).astype(np.float64)
    errors = {}
    for options in ({"stages": 2}, {"sequential": True}):
        model = testing.mlp([64, 64, 32], seed=5)
        options |= {"min_elements": 0, "bits": 2, "group_size": 32}
        pass_ = registry.create("shiftadd.bcq", options, PassContext(calibration=CalibrationData(feeds)))
        assert pass_(model).modified
        got = np.concatenate([_session(model).run(None, feed)[0] for feed in feeds])
        errors[bool(options.get("sequential"))] = int8.relative_error(expected, got)
        if options.get("sequential"):
            assert pass_.details["calibration"]["sequential_steps"] == 2
            # The bias is added after the fitted matmul: the same error, measured against the matmul's output.
            measured = np.linalg.norm(got - expected) / np.linalg.norm(expected - bias)
            assert pass_.details["layers"]["matmul1"]["output_rel_error"] == pytest.approx(measured, rel=1e-3)
    # Measured: 0.361 with 2 stages, 0.286 sequential.
    assert errors[True] < 0.9 * errors[False]


def test_gemm_with_bias_and_transposed_weight() -> None:
    k, n = 48, 20
    w = RNG.standard_normal((n, k)).astype(np.float32)
    c = RNG.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, name="gemm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    _run_pass(model, k, bits=4, group_size=16)
    assert [node.op_type for node in model.graph] == [shiftadd.OP_TYPE, "Add"]
    x = RNG.standard_normal((5, k)).astype(np.float32)
    y = _session(model).run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ next(iter(_packed_weights(model).values())) + c
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert np.linalg.norm(y - (x @ w.T + c)) / np.linalg.norm(x @ w.T + c) < 0.2  # 4 planes: measured 0.09


@pytest.mark.parametrize("sensitivity", ["model", "layer"])
def test_bits_are_allocated_under_the_average(sensitivity: str) -> None:
    model = testing.mlp([64, 128, 64, 32])
    pass_ = _run_pass(model, 64, average_bits=2.5, candidate_bits=[2, 3], group_size=32, sensitivity=sensitivity)
    allocation = pass_.details["allocation"]
    layers = pass_.details["layers"].values()
    sizes = [layer["K"] * layer["N"] for layer in layers]
    used = sum(size * layer["bits"] for size, layer in zip(sizes, layers)) / sum(sizes)
    assert used <= 2.5 and allocation["average_bits"] == pytest.approx(used)
    assert {layer["bits"] for layer in layers} == {2, 3}  # 8192, 8192, 2048 elements: one 3-bit layer does not fit
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    assert np.isfinite(_session(model).run(None, {"x": x})[0]).all()


def test_old_opset_is_refused_with_the_reason() -> None:
    model = testing.mlp([32, 32], opset=17)
    with pytest.raises(KilnError, match=r"default opset is 17; ai.kiln.ShiftAddMatMul's function form needs >= 18"):
        _run_pass(model, 32)


def test_needs_calibration() -> None:
    with pytest.raises(ir.passes.PreconditionError, match="needs calibration data"):
        registry.create("shiftadd.bcq")(testing.mlp([32, 32]))


def test_value_projection_is_fitted_per_kv_head_against_its_attention_gram(tmp_path: Path) -> None:
    """``value_hessian = "attention"``: a Llama's V weight is fitted one KV head's columns at a time against that
    head's Gram of attention-averaged inputs (:mod:`kiln.passes.quantize.value_gram`); Q and K as before."""
    path = testing.write_llama(tmp_path, layers=2, hidden=48, intermediate=64, vocab=40, heads=6, kv_heads=2)
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 40, (2, 7), dtype=np.int64)} for _ in range(2)]
    model = ir.load(path)
    w = model.graph.initializers["layers.1.v_proj"].const_value.numpy().copy()
    grams, _ = value_grams(model, CalibrationData(feeds))
    options = {"min_elements": 0, "bits": 3, "group_size": 16, "value_hessian": "attention"}
    pass_ = registry.create("shiftadd.bcq", options, PassContext(calibration=CalibrationData(feeds)))
    pass_(model)
    assert pass_.details["value_hessian"] == {"layers": 2}
    layers = pass_.details["layers"]
    assert layers["layers.1.v"]["hessian"] == "attention" and "hessian" not in layers["layers.1.k"]
    blocks = [w[:, g * 8 : (g + 1) * 8] for g in range(2)]
    fits = [bcq_gptq(b, h, 3, 16, act_order=True, refits=1) for b, h in zip(blocks, grams["layers.1.v_proj"])]
    expected = np.linalg.norm(w - BCQWeight.concatenate(fits).dequantize()) / np.linalg.norm(w)
    assert layers["layers.1.v"]["weight_rel_error"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 5}, r"planes per weight must be 1\.\.4, got 5"),
        ({"candidate_bits": [0, 2]}, r"planes per weight must be 1\.\.4, got 0"),
        ({"group_size": 4}, r"group_size must be >= 8"),
        ({"average_bits": 1.5, "candidate_bits": [2, 3]}, r"average_bits=1.5 is below the smallest candidate"),
        ({"format": "dq"}, r"has no option .format."),
        ({"refits": -1}, r"refits must be >= 0, got -1"),
        ({"stages": 0}, r"stages must be >= 1, got 0"),
        ({"stages": 2, "average_bits": 2.5}, r"stages must be 1 with average_bits"),
        ({"sequential": True, "stages": 2}, r"sequential=True takes every layer group in order"),
        ({"mantissa_bits": 5}, r"mantissa_bits must be 0\.\.4, got 5"),
        ({"value_hessian": "attention", "average_bits": 2.5}, r"value_hessian='attention' takes fixed planes"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        registry.create("shiftadd.bcq", options)


@pytest.mark.parametrize(("name", "bits"), [("shiftadd-w3", 3), ("shiftadd-w2", 2), ("shiftadd-mixed", None)])
def test_builtin_recipes(name: str, bits: int | None) -> None:
    recipe = recipes.load(name)
    step = recipe.passes[-1]
    assert step.name == "shiftadd.bcq" and recipe.needs_calibration and step.options.mantissa_bits == 3
    if bits is None:
        assert step.options.average_bits == 2.5 and step.options.candidate_bits == [2, 3]
    else:
        assert step.options.bits == bits and step.options.average_bits is None
