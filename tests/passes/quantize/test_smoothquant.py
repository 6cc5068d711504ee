"""quantize.smoothquant on a tiny transformer block: exact equivalence in float, the scale formula, folding rules."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort
import pytest

from kiln import testing
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.pipeline import Pipeline
from kiln.errors import CalibrationError
from kiln.passes import create
from kiln.passes._base import PassContext
from kiln.passes.quantize.smoothquant import SmoothQuant, SmoothQuantOptions

C, HIDDEN = 16, 32
RNG = np.random.default_rng(0)


def _const(name: str, array: np.ndarray) -> ir.Value:
    return testing.initializer(name, array.astype(np.float32))


def _block() -> ir.Model:
    """LayerNorm -> Q, K, V; Add(Q, K*V) -> O; residual; RMSNorm (decomposed) -> gate, up; silu(gate)*up -> down.

    LayerNorm's gamma has two outlier channels, so its output carries the activation outliers SmoothQuant moves.
    """
    gamma = np.ones(C)
    gamma[[3, 11]] = [25.0, -18.0]
    w = {name: RNG.standard_normal(shape) / np.sqrt(shape[0]) for name, shape in _SHAPES.items()}
    inits = [_const(name, array) for name, array in w.items()]
    inits += [_const("gamma", gamma), _const("beta", 0.1 * RNG.standard_normal(C))]
    inits += [_const("rms_w", 1.0 + 0.5 * RNG.standard_normal(C)), _const("eps", np.array(1e-6))]
    inits.append(testing.initializer("axes", np.array([-1], dtype=np.int64)))
    by_name = {v.name: v for v in inits}
    x = testing.value("x", ["b", "s", C])

    def node(op: str, inputs: list[ir.Value], name: str, **attributes: object) -> ir.Value:
        n = ir.node(op, inputs, attributes=attributes, name=name)
        nodes.append(n)
        n.outputs[0].name = name
        return n.outputs[0]

    nodes: list[ir.Node] = []
    ln = node("LayerNormalization", [x, by_name["gamma"], by_name["beta"]], "ln", axis=-1)
    q, k, v = (node("MatMul", [ln, by_name[f"w{p}"]], p) for p in "qkv")
    attn = node("Add", [q, node("Mul", [k, v], "kv")], "attn")
    h = node("Add", [x, node("MatMul", [attn, by_name["wo"]], "o")], "h")
    square = node("Mul", [h, h], "square")
    mean = node("ReduceMean", [square, by_name["axes"]], "mean", keepdims=1)
    inv = node("Reciprocal", [node("Sqrt", [node("Add", [mean, by_name["eps"]], "mean_eps")], "rms")], "inv_rms")
    normed = node("Mul", [node("Mul", [h, inv], "scaled"), by_name["rms_w"]], "rms_out")
    gate = node("MatMul", [normed, by_name["wg"]], "gate")
    up = node("MatMul", [normed, by_name["wu"]], "up")
    silu = node("Mul", [gate, node("Sigmoid", [gate], "sig")], "silu")
    down = node("MatMul", [node("Mul", [silu, up], "down_in"), by_name["wd"]], "down")
    y = node("Add", [h, down], "y")
    y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["b", "s", C])
    model = testing.model([x], [y], nodes, inits)
    common.ShapeInferencePass()(model)
    return model


_SHAPES = {
    "wq": (C, C),
    "wk": (C, C),
    "wv": (C, C),
    "wo": (C, C),
    "wg": (C, HIDDEN),
    "wu": (C, HIDDEN),
    "wd": (HIDDEN, C),
}


def _feeds(count: int = 3) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((2, 8, C)).astype(np.float32)} for _ in range(count)]


def _run(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def _smooth(model: ir.Model, feeds: list[dict[str, np.ndarray]], **options: object) -> SmoothQuant:
    pass_ = SmoothQuant(SmoothQuantOptions(**options), PassContext(calibration=CalibrationData(feeds)))
    pass_(model)
    return pass_


def _const_array(model: ir.Model, node_name: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return node.inputs[index].const_value.numpy()


def test_smoothed_float_model_computes_the_same() -> None:
    model, feeds = _block(), _feeds()
    before = _run(model, feeds)
    sq = _smooth(model, feeds)
    after = _run(model, feeds)
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    groups = sq.details["groups"]
    assert set(groups) == {"ln", "attn", "rms_out", "down_in"}
    assert groups["ln"]["fold"] == "folded into LayerNormalization 'ln'"
    assert groups["rms_out"]["fold"] == "folded into Mul 'rms_out'"
    assert groups["down_in"]["fold"] == "folded into Mul 'down_in'"  # into the up projection's columns
    assert groups["attn"]["fold"].startswith("Mul inserted")
    assert sq.details["skipped"] == {}
    # The inserted Mul is the only new node; every other change is to constants.
    assert sum(n.op_type == "Mul" for n in model.graph) == 7


def test_scales_follow_the_formula() -> None:
    model, feeds = _block(), _feeds()
    w = {name: model.graph.initializers[name].const_value.numpy().copy() for name in _SHAPES}
    gamma = model.graph.initializers["gamma"].const_value.numpy().copy()
    beta = model.graph.initializers["beta"].const_value.numpy().copy()
    rms_w = model.graph.initializers["rms_w"].const_value.numpy().copy()
    _smooth(model, feeds, alpha=0.5)

    x = np.concatenate([f["x"] for f in feeds]).reshape(-1, C).astype(np.float64)
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    w_max = np.max([np.abs(w[p]).max(axis=1) for p in ("wq", "wk", "wv")], axis=0)
    s = np.sqrt(np.abs(ln).max(axis=0)) / np.sqrt(w_max)
    np.testing.assert_allclose(_const_array(model, "ln", 1), gamma / s, rtol=1e-5)
    np.testing.assert_allclose(_const_array(model, "ln", 2), beta / s, rtol=1e-5)
    for p in "qkv":
        np.testing.assert_allclose(_const_array(model, p, 1), w[f"w{p}"] * s[:, None], rtol=1e-5)

    # The RMSNorm weight and the gate/up rows share the other scale, taken from the same formula.
    s_rms = rms_w / _const_array(model, "rms_out", 1)
    np.testing.assert_allclose(_const_array(model, "gate", 1), w["wg"] * s_rms[:, None], rtol=1e-5)
    # down's scale went into up's columns: up = rows scaled by s_rms, columns divided by s_down.
    s_down = _const_array(model, "down", 1)[:, 0] / w["wd"][:, 0]
    np.testing.assert_allclose(_const_array(model, "up", 1), w["wu"] * s_rms[:, None] / s_down[None, :], rtol=1e-5)
    w_max_down = np.abs(w["wd"]).max(axis=1)
    a_max_down = s_down**2 * w_max_down  # s = sqrt(a / w)  <=>  a = s^2 * w
    assert np.all(a_max_down > 0)


def test_alpha_search_lowers_the_estimated_error() -> None:
    model, feeds = _block(), _feeds()
    sq = _smooth(model, feeds)
    ln = sq.details["groups"]["ln"]
    assert ln["alpha"] in SmoothQuantOptions().alphas
    assert len(ln["search"]) == 13
    assert ln["est_rel_error"] == min(ln["search"].values())
    assert ln["est_rel_error"] < 0.5 * ln["est_rel_error_unsmoothed"]  # the outlier channels dominated before
    assert ln["range_after"][1] - ln["range_after"][0] < ln["range_before"][1] - ln["range_before"][0]


def test_foldable_scope_leaves_other_groups_alone() -> None:
    model, feeds = _block(), _feeds()
    sq = _smooth(model, feeds, alpha=0.5, scope="foldable")
    assert "attn" not in sq.details["groups"]
    assert sq.details["skipped"]["o"] == "input 'attn' not smoothed: producer Add 'attn' cannot absorb the scale" + (
        " (scope='foldable')"
    )
    assert sum(n.op_type == "Mul" for n in model.graph) == 6


def test_gemm_with_transposed_weight_and_shared_constant() -> None:
    k, n = 12, 6
    w = RNG.standard_normal((n, k)).astype(np.float32)
    scale = np.linspace(0.5, 8.0, k).astype(np.float32)
    x = testing.value("x", [4, k])
    inits = [_const("w", w), _const("bias", RNG.standard_normal(n)), _const("c", scale)]
    scaled = ir.node("Mul", [x, inits[2]], name="scale")
    scaled.outputs[0].name = "scaled"
    gemm = ir.node("Gemm", [scaled.outputs[0], inits[0], inits[1]], attributes={"transB": 1}, name="fc")
    other = ir.node("Mul", [x, inits[2]], name="other")  # reads the same constant: it must be copied
    y, z = gemm.outputs[0], other.outputs[0]
    for v, name, shape in ((y, "y", [4, n]), (z, "z", [4, k])):
        v.name, v.type, v.shape = name, ir.TensorType(ir.DataType.FLOAT), ir.Shape(shape)
    model = testing.model([x], [y, z], [scaled, gemm, other], inits)
    common.ShapeInferencePass()(model)
    feeds = [{"x": RNG.standard_normal((4, k)).astype(np.float32)} for _ in range(2)]
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    before = [session.run(None, f) for f in feeds]
    sq = _smooth(model, feeds, alpha=0.8)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    for f, ref in zip(feeds, before):
        for a, b in zip(ref, session.run(None, f)):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    s = scale / _const_array(model, "scale", 1)
    np.testing.assert_allclose(_const_array(model, "fc", 1), w * s[None, :], rtol=1e-5)
    np.testing.assert_array_equal(_const_array(model, "other", 1), scale)  # the other reader keeps its constant
    assert sq.details["groups"]["scaled"]["alpha"] == 0.8


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([], "is empty"),
        ([{"input": np.zeros((2, 8, C), np.float32)}], "'input' is not an input of the model"),
        ([{"x": np.zeros((2, 8, C + 1), np.float32)}], "has size 17 on axis 2"),
        ([{"x": np.zeros((2, 8, C), np.float64)}], "has dtype float64"),
    ],
)
def test_bad_calibration_fails_before_any_change(feeds: list, message: str) -> None:
    model = _block()
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(CalibrationError, match=message):
        _smooth(model, feeds)
    assert ir.to_proto(model).SerializeToString() == before


def test_recipe_pipeline_smoothquant_then_static_int8() -> None:
    model, feeds = _block(), _feeds()
    before = _run(model, feeds)
    context = PassContext(calibration=CalibrationData(feeds))
    records = Pipeline([create("quantize.smoothquant", {}, context), create("quantize.static-int8", {}, context)])(
        model
    )
    assert [r.name for r in records] == ["quantize.smoothquant", "quantize.static-int8"]
    fusion = records[1].details["ort_fusion"]
    assert fusion["integer_ops"] == {"MatMulIntegerToFloat": 7} and fusion["unfused"] == []
    for a, b in zip(before, _run(model, feeds)):
        cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine > 0.999
