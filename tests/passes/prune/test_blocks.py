from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from prunegraphs import bert, llama, run, set_weight, weight

import kiln
from kiln import testing
from kiln.compiler import registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError, RecipeError
from kiln.passes._base import PassContext
from kiln.passes.prune._stats import ChannelMoments
from kiln.passes.prune.blocks import BlocksOptions, PruneBlocks
from kiln.passes.prune.structure import StructureError, find_structure, parameter_count


def _prune(model: ir.Model, calibration: CalibrationData | None = None, **options: object) -> PruneBlocks:
    pass_ = PruneBlocks(BlocksOptions(**options), PassContext(calibration=calibration))
    kiln.Pipeline([pass_])(model)
    return pass_


def _ids(seed: int = 0) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, 40, (2, 7)).astype(np.int64)}


def _matmuls(model: ir.Model) -> int:
    return sum(n.op_type == "MatMul" for n in model.graph)


def test_a_block_that_adds_nothing_is_dropped_first_and_outputs_stay_equal(tmp_path: Path) -> None:
    model = llama(tmp_path, layers=4)
    # Block 2 adds zero to the residual stream: its Block Influence is 0 and removing it changes nothing.
    set_weight(model, "layers.2.o_proj", np.zeros((32, 32)))
    set_weight(model, "layers.2.down_proj", np.zeros((48, 32)))
    expected = run(model, _ids())[0]
    before = parameter_count(model)
    calibration = CalibrationData([_ids(1), _ids(2)])
    pruned = _prune(model, calibration, count=1)
    assert [d["index"] for d in pruned.details["dropped"]] == [2]
    assert pruned.details["scores"][2] == pytest.approx(0.0, abs=1e-12)
    assert min(pruned.details["scores"][:2] + pruned.details["scores"][3:]) > 1e-3
    np.testing.assert_allclose(run(model, _ids())[0], expected, rtol=1e-5, atol=1e-5)
    assert (
        len(find_structure(model).blocks) == 3 and _matmuls(model) == 3 * 9 + 1
    )  # 9 per block: 4 + 3 projections, Q K^T, P V
    per_block = 4 * 32 * 32 + 3 * 32 * 48 + 2 * 32  # projections and the two RMSNorm weights
    assert (
        before - parameter_count(model)
        == per_block
        == pruned.details["parameters_before"] - pruned.details["parameters_after"]
    )
    assert "layers.2.q_proj" not in model.graph.initializers


def test_output_error_importance_measures_each_unit_alone(tmp_path: Path) -> None:
    model = llama(tmp_path, layers=3)
    set_weight(model, "layers.1.o_proj", np.zeros((32, 32)))  # attention 1 adds nothing: no output error
    inputs = [v.name for v in model.graph.inputs]
    pruned = _prune(
        model, CalibrationData([_ids(1), _ids(2), _ids(3)]), unit="attention", count=1, importance="output_error"
    )
    errors = pruned.details["scores"]
    assert errors[1] == pytest.approx(0.0, abs=1e-10) and min(errors[0], errors[2]) > 1e-4
    assert [d["index"] for d in pruned.details["dropped"]] == [1]
    assert [v.name for v in model.graph.inputs] == inputs and not any("kiln_prune_gate" in n.name for n in model.graph)


def test_mean_compensation_leaves_the_mean_output(tmp_path: Path) -> None:
    model = llama(tmp_path, layers=2)
    calibration = CalibrationData([_ids(1), _ids(2)])
    moments = ChannelMoments()
    calibration.collect(model, {"layers.1.down": [moments]})  # the MLP branch of block 1
    pruned = _prune(model, calibration, unit="mlp", indices=[1], mean_compensation=True)
    add = next(n for n in model.graph if n.name == "layers.1.mlp_residual")
    (constant,) = [v for v in add.inputs if v.const_value is not None]
    np.testing.assert_allclose(constant.const_value.numpy(), moments.mean, rtol=1e-5, atol=1e-7)
    assert np.abs(moments.mean).max() > 1e-3 and pruned.details["mean_compensation"]
    assert "layers.1.down_proj" not in model.graph.initializers and len(find_structure(model).mlps()) == 1


@pytest.mark.parametrize("graph", ["llama", "bert"])
def test_structure_runs_through_compensated_sublayers(tmp_path: Path, graph: str) -> None:
    if graph == "llama":
        model, feeds = llama(tmp_path, layers=4), [_ids(1)]
    else:
        model, feeds = bert(layers=4), [{"x": np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)}]
    _prune(model, CalibrationData(feeds), unit="attention", indices=[0, 2], mean_compensation=True)
    _prune(model, CalibrationData(feeds), unit="mlp", indices=[3], mean_compensation=True)
    structure = find_structure(model)
    assert (len(structure.attentions()), len(structure.mlps())) == (2, 3)
    assert [[s.kind for s in b.sublayers()] for b in structure.blocks] == [
        ["mlp"],
        ["attention", "mlp"],
        ["mlp"],
        ["attention"],
    ]


@pytest.mark.parametrize(("unit", "matmuls", "zeroed"), [("attention", 6, "o_proj"), ("mlp", 3, "down_proj")])
def test_dropping_one_sublayer(tmp_path: Path, unit: str, matmuls: int, zeroed: str) -> None:
    model = llama(tmp_path, layers=2)
    set_weight(model, f"layers.1.{zeroed}", np.zeros_like(weight(model, f"layers.1.{zeroed}")))
    expected = run(model, _ids())[0]
    _prune(model, unit=unit, indices=[1])
    np.testing.assert_allclose(run(model, _ids())[0], expected, rtol=1e-5, atol=1e-5)
    assert _matmuls(model) == 2 * 9 + 1 - matmuls
    structure = find_structure(model)  # block 1 keeps only its other sublayer
    assert len(structure.blocks) == 2 and structure.blocks[1].sublayers()[0].kind != unit
    assert (len(structure.attentions()), len(structure.mlps())) == ((1, 2) if unit == "attention" else (2, 1))


def test_post_norm_sublayer_goes_with_its_norm() -> None:
    model = bert(layers=3)
    x = {"x": np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)}
    _prune(model, unit="block", importance="last", count=1)
    structure = find_structure(model)
    assert len(structure.blocks) == 2 and structure.blocks[-1].output.name == "l1.ln2"
    assert not any(node.name.startswith("l2.") for node in model.graph)
    # The model now ends at block 1's output: compare with the original cut there.
    reference = bert(layers=2)
    np.testing.assert_allclose(run(model, x)[0], run(reference, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"importance": "last", "count": 2}, [2, 3]), ({"importance": "random", "count": 2, "seed": 0}, None)],
)
def test_baselines(tmp_path: Path, options: dict[str, object], expected: list[int] | None) -> None:
    dropped = []
    for _ in range(2):
        model = llama(tmp_path, layers=4)
        pruned = _prune(model, **options)
        dropped.append([d["index"] for d in pruned.details["dropped"]])
        assert pruned.details["scores"] is None
    assert dropped[0] == dropped[1] and len(dropped[0]) == 2
    if expected is not None:
        assert dropped[0] == expected


def test_fraction_rounds_to_a_count(tmp_path: Path) -> None:
    pruned = _prune(llama(tmp_path, layers=4), importance="last", fraction=0.5, unit="attention")
    assert pruned.details["units"] == 4 and [d["index"] for d in pruned.details["dropped"]] == [2, 3]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=re.escape("prune.blocks: cannot drop 3 of the model's 3 block units")):
        _prune(llama(tmp_path, layers=3), importance="last", count=3)
    with pytest.raises(KilnError, match=re.escape("indices [5] out of range for 3 mlp units")):
        _prune(llama(tmp_path, layers=3), unit="mlp", indices=[5])
    with pytest.raises(StructureError, match="no transformer structure"):
        _prune(testing.mlp([8, 16, 4]), importance="last", count=1)
    with pytest.raises(KilnError, match="needs calibration data"):
        _prune(llama(tmp_path, layers=3), count=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unit": "head"}, "unit must be 'block', 'attention' or 'mlp'"),
        ({"importance": "magnitude"}, "importance must be 'block_influence', 'output_error', 'last' or 'random'"),
        ({"error_feeds": 0}, "error_feeds must be >= 1"),
        ({"count": -1}, "count must be >= 0"),
        ({"fraction": 1.0}, "fraction must be in [0, 1)"),
        ({"count": 2, "indices": [1]}, "give count or indices, not both"),
        ({"indices": [1, 1]}, "indices must be distinct and >= 0"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        BlocksOptions(**options)
    with pytest.raises(RecipeError, match=re.escape("pass 'prune.blocks': ") + f"(option '{next(iter(options))}')?"):
        registry.create("prune.blocks", options)


@pytest.mark.zoo
def test_smollm2_decode_loses_the_cache_of_dropped_attention(smollm2_decode_path: Path) -> None:
    from kiln import zoo

    model = kiln.load(smollm2_decode_path)
    pruned = _prune(model, unit="attention", indices=[21, 22])  # past 21 and 22 also feed the graph's Shape reads
    names = [v.name for v in model.graph.inputs]
    assert len(names) == 61 - 4 and "past_key_values.22.value" not in names
    assert [v.name for v in model.graph.outputs][43:45] == ["present.23.key", "present.23.value"]
    assert pruned.details["parameters_before"] - pruned.details["parameters_after"] == 2 * (
        2 * 576 * 576 + 2 * 576 * 192 + 576
    )  # Q, O, K, V and the RMSNorm weight
    feed = zoo.get("smollm2-135m").verification_feeds("decode", limit=1)[0]
    feed = {k: v for k, v in feed.items() if k in names}
    logits, *present = run(model, feed)
    assert logits.shape == (4, 1, 49152) and np.isfinite(logits).all()
    assert present[0].shape[2] == feed["past_key_values.0.key"].shape[2] + 1


@pytest.mark.zoo
def test_pruned_decode_graph_compiles_and_verifies_on_its_remaining_outputs(tmp_path: Path) -> None:
    result = kiln.compile_model(
        "smollm2-135m/decode", tmp_path / "out", "prune-attn-half", verify_limit=2, accept_out_of_tolerance=True
    )
    report = result.report["verification"]
    removed = report["removed_outputs"]
    assert len(removed) == 30 and all(name.startswith("present.") for name in removed)  # 15 layers' key and value
    compared = set(report["outputs"])
    assert "logits" in compared and len(compared) == 61 - 30 and not compared & set(removed)
    assert all(o["cosine"] > 0.5 for o in report["outputs"].values())
