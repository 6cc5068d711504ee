from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from prunegraphs import bert, llama, run

import kiln
from kiln import testing
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.timing import Latency
from kiln.errors import KilnError
from kiln.passes._base import PassContext
from kiln.passes.prune import budget
from kiln.passes.prune.blocks import BlocksOptions, PruneBlocks
from kiln.passes.prune.filters import FiltersOptions, PruneFilters
from kiln.passes.prune.heads import HeadsOptions, PruneHeads
from kiln.passes.prune.mlp import MLPOptions, PruneMLP
from kiln.passes.prune.structure import parameter_count


def _layer(scores: list[float], params: float, floor: int = 0) -> budget.Layer:
    return budget.Layer(
        steps=[(i,) for i in range(len(scores))],
        scores=scores,
        units=len(scores),
        floor=floor,
        cost=params,
    )


def test_importance_decides_which_units_go_and_the_measure_how_many() -> None:
    # A unit of the second layer saves 4x the parameters; units still go by importance, alternating here.
    layers = [_layer([1.0, 2.0, 3.0], params=10), _layer([1.5, 2.5, 3.5], params=40)]
    taken, saved = budget.allocate(layers, "params", 0.5, total=200, what="test")
    assert taken == [2, 2] and saved == 100  # 10, 50, 60, 100: the fourth step reaches half of 200
    taken, saved = budget.allocate(layers, "units", 3 / 6, total=6, what="test")
    assert taken == [2, 1] and saved == 3


def test_params_stop_at_the_first_step_that_reaches_the_target() -> None:
    layers = [_layer([1.0, 1.5, 2.0, 2.5], params=10)]
    taken, saved = budget.allocate(layers, "params", 0.25, total=100, what="test")
    assert taken == [3] and saved == 30  # 20 < 25 <= 30


def test_units_never_pass_the_count_and_floors_hold() -> None:
    layers = [_layer([0.1, 0.2, 0.3, 0.4], params=1, floor=3), _layer([1.0, 2.0, 3.0, 4.0], params=1)]
    taken, saved = budget.allocate(layers, "units", 0.5, total=8, what="test")
    assert taken == [1, 3] and saved == 4


def test_an_unreachable_budget_names_what_is_possible() -> None:
    layers = [_layer([1.0, 2.0, 3.0, 4.0], params=10, floor=2)]
    with pytest.raises(KilnError, match=re.escape("test: removing 50% of the model's parameters is out of reach")):
        budget.allocate(layers, "params", 0.5, total=100, what="test")
    with pytest.raises(KilnError, match=re.escape("pruning saves 20.0%")):
        budget.allocate(layers, "params", 0.5, total=100, what="test")


def _convs(batch: int | str = "n") -> tuple[ir.Model, ir.Node, ir.Node]:
    """x [batch, 4, 16, 16] -> Conv 3x3 stride 2 (8) -> GlobalAveragePool -> Flatten -> MatMul [8, 5] -> y."""
    x = testing.value("x", [batch, 4, 16, 16])
    w = testing.initializer("w", np.ones((8, 4, 3, 3), np.float32))
    m = testing.initializer("m", np.ones((8, 5), np.float32))
    conv = ir.node("Conv", [x, w], attributes={"strides": [2, 2], "pads": [1, 1, 1, 1]}, name="conv")
    pool = ir.node("GlobalAveragePool", [conv.outputs[0]], name="pool")
    flat = ir.node("Flatten", [pool.outputs[0]], name="flat")
    matmul = ir.node("MatMul", [flat.outputs[0], m], name="mm")
    y = matmul.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, 5])
    return testing.model([x], [y], [conv, pool, flat, matmul], [w, m], name="macs"), conv, matmul


def test_multiply_adds_per_output_position_and_row() -> None:
    model, conv, matmul = _convs(batch=2)
    budget.prepare(model, "flops")
    assert budget.weighted_macs(conv) == 8 * 4 * 9 * (2 * 8 * 8)
    assert budget.weighted_macs(matmul) == 8 * 5 * 2
    assert budget.model_total(model, "flops", []) == 8 * 4 * 9 * 128 + 80
    dynamic, _, matmul = _convs()
    budget.prepare(dynamic, "flops")
    assert budget.weighted_macs(matmul) == 8 * 5  # a dynamic batch counts 1: per sample


def test_a_conv_without_static_output_size_has_no_flop_count() -> None:
    x = testing.value("x", ["n", 4, "h", "w"])
    conv = ir.node("Conv", [x, testing.initializer("w", np.ones((8, 4, 1, 1), np.float32))], name="c")
    y = conv.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 8, "h", "w"])
    model = testing.model([x], [y], [conv], [conv.inputs[1]], name="dyn")
    with pytest.raises(KilnError, match=re.escape("the output size of Conv node 'c' is not static")):
        budget.model_total(model, "flops", [])


def _x(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 5, 32)).astype(np.float32)}


def _run(pass_: kiln.passes._base.KilnPass, model: ir.Model) -> dict[str, object]:
    kiln.Pipeline([pass_])(model)
    return pass_.details


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_mlp_parameter_budget_is_met_in_the_saved_counts(ratio: float) -> None:
    model = bert(layers=3, intermediate=64)
    before = parameter_count(model)
    options = MLPOptions(ratio=ratio, allocation="global", target="params", multiple_of=4)
    details = _run(PruneMLP(options, PassContext(calibration=CalibrationData([_x(1), _x(2)]))), model)
    removed = before - parameter_count(model)
    # One channel of this FFN: a column of fc1 (32 + bias) and a row of fc2 (32); steps are 4 channels.
    assert ratio * before <= removed < ratio * before + 4 * 65
    assert details["budget"]["removed"] == removed and details["budget"]["total"] == before
    assert all(w % 4 == 0 for w in details["widths"])
    assert run(model, _x(0))[0].shape == (2, 5, 32)


def test_heads_flop_budget_counts_projection_multiply_adds(tmp_path: Path) -> None:
    model = llama(tmp_path, layers=2)
    ids = [{"input_ids": np.random.default_rng(s).integers(0, 40, (2, 7)).astype(np.int64)} for s in (1, 2)]
    options = HeadsOptions(ratio=0.1, allocation="global", target="flops")
    details = _run(PruneHeads(options, PassContext(calibration=CalibrationData(ids))), model)
    budget = details["budget"]
    removed_heads = sum(len(layer["removed"]) for layer in details["layers"])
    hidden = 32
    d = hidden // details["layers"][0]["heads_before"]
    assert budget["target"] == "flops" and removed_heads > 0
    assert budget["removed"] == removed_heads * 4 * d * hidden  # Q, K, V columns and O rows, per token
    assert budget["removed_fraction"] >= 0.1


def _two_chains() -> ir.Model:
    """a1 -> Sigmoid -> p1 at 16x16, MaxPool to 4x4, a2 -> Sigmoid -> p2: two chains of 16 channels, all alike
    except that p2 reads channels 0-3 with a quarter of the weight, so those matter least of all."""
    inits: list[ir.Value] = []

    def conv(value: ir.Value, name: str, array: np.ndarray) -> ir.Node:
        inits.append(testing.initializer(name, array.astype(np.float32)))
        return ir.node("Conv", [value, inits[-1]], name=name)

    weak = np.ones((4, 16, 1, 1))
    weak[:, :4] = 0.25
    x = testing.value("x", ["n", 4, 16, 16])
    nodes = [conv(x, "a1", np.ones((16, 4, 1, 1)))]
    nodes.append(ir.node("Sigmoid", [nodes[-1].outputs[0]]))
    nodes.append(conv(nodes[-1].outputs[0], "p1", np.ones((4, 16, 1, 1))))
    nodes.append(ir.node("MaxPool", [nodes[-1].outputs[0]], attributes={"kernel_shape": [4, 4], "strides": [4, 4]}))
    nodes.append(conv(nodes[-1].outputs[0], "a2", np.ones((16, 4, 1, 1))))
    nodes.append(ir.node("Sigmoid", [nodes[-1].outputs[0]]))
    nodes.append(conv(nodes[-1].outputs[0], "p2", weak))
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"h{i}"
    y = nodes[-1].outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 4, 4, 4])
    return testing.model([x], [y], nodes, inits, name="two_chains")


@pytest.mark.parametrize(
    ("target", "ratio", "kept"),
    [
        # 10% of 256 parameters: one step of 4 channels (32 parameters), the weak ones of the second chain.
        ("params", 0.1, {"a1": 16, "a2": 12}),
        # 20% of the multiply-adds: the weak step saves only 4 * 8 * 16, so the next least important step goes too,
        # from the first chain, where a channel costs 8 multiply-adds at each of 256 positions.
        ("flops", 0.2, {"a1": 12, "a2": 12}),
    ],
)
def test_filters_count_the_budget_in_the_measure_asked(target: str, ratio: float, kept: dict[str, int]) -> None:
    model = _two_chains()
    feeds = [{"x": np.random.default_rng(s).standard_normal((2, 4, 16, 16)).astype(np.float32)} for s in (1, 2)]
    options = FiltersOptions(ratio=ratio, allocation="global", target=target, multiple_of=4, min_ratio=0.25)
    details = _run(PruneFilters(options, PassContext(calibration=CalibrationData(feeds))), model)
    assert {layer["first"]: layer["kept"] for layer in details["layers"]} == kept
    per_channel = 8 if target == "params" else {"a1": 8 * 256, "a2": 8 * 16}
    removed = sum((16 - n) * (per_channel if target == "params" else per_channel[k]) for k, n in kept.items())
    assert details["budget"]["removed"] == removed >= ratio * details["budget"]["total"]


def test_blocks_drop_units_until_the_parameter_share_is_gone() -> None:
    model = bert(layers=4, intermediate=64)
    before = parameter_count(model)
    options = BlocksOptions(unit="mlp", target="params", fraction=0.2, importance="last")
    details = _run(PruneBlocks(options, PassContext()), model)
    per_mlp = 32 * 64 + 64 + 64 * 32 + 32  # fc1 and fc2 with biases
    dropped = len(details["dropped"])
    assert [d["index"] for d in details["dropped"]] == list(range(4 - dropped, 4))
    assert (dropped - 1) * per_mlp < 0.2 * before <= dropped * per_mlp
    assert details["budget"]["removed"] == dropped * per_mlp
    # The post-LN norm after each dropped MLP goes too (2 x 32 weights), which the budget does not count.
    assert before - parameter_count(model) == dropped * (per_mlp + 2 * 32)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLPOptions(target="params"), "target='params' is a budget over the whole model"),
        (lambda: HeadsOptions(target="flops"), "target='flops' is a budget over the whole model"),
        (lambda: FiltersOptions(target="bytes", allocation="global"), "target must be 'units', 'params', 'flops' or"),
        (lambda: BlocksOptions(target="params", count=2), "give no count or indices"),
    ],
)
def test_bad_targets(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def _macs_as_time(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    """Replace the timer of the latency search by a deterministic one: a model's time is its multiply-adds."""
    timed: list[dict[str, float]] = []

    def fake(models: dict[str, Path], feed: dict[str, np.ndarray], **_: object) -> dict[str, Latency]:
        times = {}
        for key, path in models.items():
            model = kiln.load(path)
            budget.prepare(model, "flops")
            times[key] = budget.model_total(model, "flops", [])
        timed.append(times)
        return {key: Latency(t, t, 1) for key, t in times.items()}

    monkeypatch.setattr(budget.timing, "compare_latency", fake)
    return timed


def test_latency_target_searches_the_share_of_multiply_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = _macs_as_time(monkeypatch)
    model = bert(layers=3, intermediate=64)
    before = budget.model_total(model, "flops", [])
    options = MLPOptions(ratio=0.2, allocation="global", target="latency", multiple_of=4)
    details = _run(PruneMLP(options, PassContext(calibration=CalibrationData([_x(1), _x(2)]))), model)
    search = details["latency_search"]
    assert len(search["steps"]) == budget.LATENCY_STEPS == len(timed)
    assert search["goal_time_ratio"] == pytest.approx(0.8)
    met = [step["flops_removed"] for step in search["steps"] if step["time_ratio"] <= 0.8]
    assert search["chosen_flops_removed"] == min(met) <= 0.2
    # The model got the chosen share: its (fake) time is within the goal, and the MLP details are there.
    budget.prepare(model, "flops")
    assert budget.model_total(model, "flops", []) <= 0.8 * before and details["budget"]["target"] == "flops"
    assert run(model, _x(0))[0].shape == (2, 5, 32)


def test_latency_out_of_reach_lists_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    _macs_as_time(monkeypatch)
    model = bert(layers=2, intermediate=64)
    options = BlocksOptions(unit="mlp", target="latency", fraction=0.9, importance="last")
    with pytest.raises(KilnError, match=re.escape("prune.blocks: a 90% shorter run time is out of reach: ")) as info:
        _run(PruneBlocks(options, PassContext(calibration=CalibrationData([_x(1)]))), model)
    assert "x the time" in str(info.value) and "refused (prune.blocks: dropping" in str(info.value)
    with pytest.raises(KilnError, match="target='latency' times the model on calibration data, and none was given"):
        _run(PruneBlocks(BlocksOptions(unit="mlp", target="latency", importance="last"), PassContext()), model)
