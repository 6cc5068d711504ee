from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from prunegraphs import run, weight

import kiln
from kiln import testing
from kiln.compiler import registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError, RecipeError
from kiln.passes._base import PassContext
from kiln.passes.prune.filters import FiltersOptions, PruneFilters, find_chains

SILENT = [1, 5]


def _cnn(seed: int = 0, silent: list[int] = SILENT) -> ir.Model:
    """x [N, 4, 8, 8] -> Conv 1x1 (8) -> BN -> Clip -> depthwise 3x3 -> Relu -> Conv 1x1 (4) -> Add(x) -> y."""
    rng = np.random.default_rng(seed)

    def init(name: str, array: np.ndarray) -> ir.Value:
        inits.append(testing.initializer(name, array.astype(np.float32)))
        return inits[-1]

    inits: list[ir.Value] = []
    x = testing.value("x", ["n", 4, 8, 8])
    w_p = rng.standard_normal((4, 8, 1, 1))
    w_p[:, silent] = 0  # these channels reach nothing
    nodes = [
        ir.node(
            "Conv", [x, init("wa", rng.standard_normal((8, 4, 1, 1))), init("ba", rng.standard_normal(8))], name="a"
        ),
    ]
    bn = [init(n, v) for n, v in (("g", 1 + 0.1 * rng.random(8)), ("b", rng.random(8)), ("m", rng.random(8)))]
    nodes.append(ir.node("BatchNormalization", [nodes[-1].outputs[0], *bn, init("v", 1 + rng.random(8))], name="bn"))
    lo, hi = init("lo", np.array(0.0)), init("hi", np.array(6.0))
    nodes.append(ir.node("Clip", [nodes[-1].outputs[0], lo, hi], name="clip"))
    dw = [init("wd", rng.standard_normal((8, 1, 3, 3))), init("bd", rng.standard_normal(8))]
    nodes.append(ir.node("Conv", [nodes[-1].outputs[0], *dw], attributes={"group": 8, "pads": [1, 1, 1, 1]}, name="d"))
    nodes.append(ir.node("Relu", [nodes[-1].outputs[0]], name="relu"))
    nodes.append(ir.node("Conv", [nodes[-1].outputs[0], init("wp", w_p), init("bp", rng.standard_normal(4))], name="p"))
    nodes.append(ir.node("Add", [nodes[-1].outputs[0], x], name="residual"))
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"h{i}"
    y = nodes[-1].outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 4, 8, 8])
    return testing.model([x], [y], nodes, inits, name="cnn")


def _x(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def _prune(model: ir.Model, **options: object) -> PruneFilters:
    pass_ = PruneFilters(FiltersOptions(**options), PassContext(calibration=CalibrationData([_x(1), _x(2)])))
    kiln.Pipeline([pass_])(model)
    return pass_


def test_chain_through_bn_activations_and_depthwise() -> None:
    (chain,) = find_chains(_cnn().graph)
    assert (chain.first.name, chain.depthwise.name, chain.last.name) == ("a", "d", "p")
    assert [n.name for n in chain.norms] == ["bn"] and chain.channels == 8


def test_silent_channels_go_and_outputs_stay_equal() -> None:
    model = _cnn()
    original = {n: weight(model, n).copy() for n in ("wa", "wd", "wp", "g", "v")}
    expected = run(model, _x(0))[0]
    pruned = _prune(model, ratio=0.25, multiple_of=1)
    np.testing.assert_allclose(run(model, _x(0))[0], expected, rtol=1e-5, atol=1e-5)
    keep = [j for j in range(8) if j not in SILENT]
    (chain,) = find_chains(model.graph)
    assert chain.depthwise.attributes.get_int("group") == 6
    np.testing.assert_array_equal(weight(model, chain.first.inputs[1].name), original["wa"][keep])
    np.testing.assert_array_equal(weight(model, chain.depthwise.inputs[1].name), original["wd"][keep])
    np.testing.assert_array_equal(weight(model, chain.last.inputs[1].name), original["wp"][:, keep])
    for index, name in ((1, "g"), (4, "v")):
        np.testing.assert_array_equal(weight(model, chain.norms[0].inputs[index].name), original[name][keep])
    assert pruned.details["channels_after"] == 6
    per_channel = 4 + 1 + 4 + 9 + 1 + 4  # A filter and bias, 4 BN entries, depthwise filter and bias, P column
    assert pruned.details["parameters_before"] - pruned.details["parameters_after"] == 2 * per_channel


def test_filter_norm_needs_no_data() -> None:
    model = _cnn(silent=[])
    norms = np.abs(weight(model, "wa")).reshape(8, -1).sum(axis=1)
    pass_ = PruneFilters(FiltersOptions(ratio=0.5, importance="l1", multiple_of=1))
    kiln.Pipeline([pass_])(model)
    (chain,) = find_chains(model.graph)
    kept = np.sort(np.argsort(norms, kind="stable")[4:])
    np.testing.assert_array_equal(weight(model, chain.first.inputs[1].name), weight(_cnn(silent=[]), "wa")[kept])
    assert run(model, _x(0))[0].shape == (2, 4, 8, 8)


def test_no_chain_is_a_clear_error() -> None:
    with pytest.raises(KilnError, match=re.escape("prune.filters: no prunable conv chain")):
        _prune(testing.mlp([8, 16, 4]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": -0.1}, "ratio must be in [0, 1)"),
        ({"allocation": "global", "importance": "l2"}, "allocation='global' needs importance='activation'"),
        ({"multiple_of": 0}, "multiple_of must be >= 1"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FiltersOptions(**options)
    with pytest.raises(RecipeError, match=re.escape(f"pass 'prune.filters': {message}")):
        registry.create("prune.filters", options)


@pytest.mark.zoo
def test_efficientnet_quarter_of_the_filters(efficientnet_path: Path) -> None:
    from kiln import zoo

    model = kiln.load(efficientnet_path)
    feed = zoo.get("efficientnet-lite0").verification_feeds("full", limit=1)[0]
    expected = run(model, feed)[0].argmax(1)
    calibration = CalibrationData.from_zoo("efficientnet-lite0", limit=1)
    pass_ = PruneFilters(FiltersOptions(ratio=0.25, allocation="global"), PassContext(calibration=calibration))
    kiln.Pipeline([pass_])(model)
    assert pass_.details["chains"] == 18
    removed = pass_.details["channels_before"] - pass_.details["channels_after"]
    assert pass_.details["channels_before"] == 9296 and abs(removed - 0.25 * 9296) <= 8 * 18  # multiples of 8
    assert (run(model, feed)[0].argmax(1) == expected).mean() > 0.4  # 0.75 over the whole verification set
