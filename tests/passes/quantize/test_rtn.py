"""The quantize.rtn pass on tiny graphs, run in ONNX Runtime and compared with numpy."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.compiler import registry
from kiln.errors import KilnError, RecipeError
from kiln.passes.quantize import grid
from kiln.passes.quantize import rtn as rtn_module
from kiln.passes.quantize.grid import GridSpec
from kiln.passes.quantize.rtn import RTNOptions, WeightOnlyRTN

RNG = np.random.default_rng(0)
# Loose bound on ||Y_quant - Y_float|| / ||Y_float|| for Gaussian weights and activations (measured: about half).
FLOAT_ERROR = {2: 0.75, 3: 0.35, 4: 0.15, 6: 0.04, 8: 0.01}


def _weight(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int | str]],
    outputs: dict[str, list[int | str] | None],
    inits: dict[str, np.ndarray],
    opset: int = 21,
    elem: int = TensorProto.FLOAT,
    other_inputs: tuple[onnx.ValueInfoProto, ...] = (),
) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, elem, shape) for name, shape in inputs.items()] + list(other_inputs),
        [helper.make_tensor_value_info(name, elem, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _run_pass(model: ir.Model, **options: object) -> WeightOnlyRTN:
    rtn = WeightOnlyRTN(RTNOptions(**options))
    result = rtn(model)
    assert result.model is model
    return rtn


def _run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray], exact_dq: bool = True) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    if exact_dq:
        # ORT fuses DequantizeLinear + MatMul into MatMulNBits with accuracy_level 4 (int8 activations) by default;
        # level 0 keeps float activations so the result can be compared tightly.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _dequantized(w: np.ndarray, bits: int, group_size: int, symmetric: bool) -> np.ndarray:
    return grid.dequantize(grid.quantize(w, GridSpec(bits, group_size, symmetric)))


def _close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * np.abs(expected).max())


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul(fmt: str, bits: int, symmetric: bool) -> None:
    """3 and 6-bit grids are stored in 4 and 8 bits: same weights as the grid, the wider width's bytes."""
    k, n = 200, 48  # K is not a multiple of the group: the last group is ragged
    w = _weight(k, n)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])],
        {"x": [2, 3, k]},
        {"y": [2, 3, n]},
        {"W": w},
        opset=25 if bits == 2 else 21,
    )
    rtn = _run_pass(model, bits=bits, group_size=32, symmetric=symmetric, format=fmt, min_elements=0)

    expected_ops = ["MatMulNBits", "Relu"] if fmt == "matmulnbits" else ["DequantizeLinear", "MatMul", "Relu"]
    assert _ops(model) == expected_ops
    assert "W" not in model.graph.initializers
    assert model.graph.node(len(expected_ops) - 2).outputs[0].name == "h"  # output value keeps its name
    x = _weight(2, 3, k)
    (y,) = _run(model, {"x": x})
    wq = _dequantized(w, bits, 32, symmetric)
    _close(y, np.maximum(x @ wq, 0))
    assert _rel(y, np.maximum(x @ w, 0)) < FLOAT_ERROR[bits]

    layer = rtn.details["layers"]["mm"]
    assert layer["K"] == k and layer["N"] == n and layer["bits"] == bits and layer["group_size"] == 32
    assert layer["weight_rel_error"] == pytest.approx(
        grid.relative_error(w, grid.quantize(w, GridSpec(bits, 32, symmetric)))
    )
    assert layer["bytes_before"] == k * n * 4
    n_groups = 7  # ceil(200 / 32)
    stored = {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}[bits]
    if fmt == "matmulnbits":
        b_bytes = n * n_groups * 32 * stored // 8
        zp_bytes = 0 if symmetric else n * -(-n_groups * stored // 8)
        assert model.graph.node(0).attributes["bits"].as_int() == stored
    else:
        b_bytes = -(-k * n * stored // 8)
        zp_bytes = 0 if symmetric else -(-n_groups * n * stored // 8)
    assert layer["bytes_after"] == b_bytes + n_groups * n * 4 + zp_bytes
    assert rtn.details["bytes_before"] == layer["bytes_before"]
    assert rtn.details["bytes_after"] == layer["bytes_after"]
    assert rtn.details["skipped"] == {}
    if fmt == "matmulnbits":
        assert model.opset_imports["com.microsoft"] == 1


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias(fmt: str, trans_b: int) -> None:
    k, n = 96, 40
    w = _weight(k, n)
    bias = _weight(n)
    model = _model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=trans_b)],
        {"x": [4, k]},
        {"y": [4, n]},
        {"W": w.T.copy() if trans_b else w, "C": bias},
    )
    rtn = _run_pass(model, bits=4, group_size=32, format=fmt, min_elements=0)
    assert _ops(model) == (["MatMulNBits"] if fmt == "matmulnbits" else ["DequantizeLinear", "MatMul", "Add"])
    assert model.graph.outputs[0].name == "y"
    x = _weight(4, k)
    (y,) = _run(model, {"x": x})
    _close(y, x @ _dequantized(w, 4, 32, False) + bias)
    assert rtn.details["layers"]["fc"]["lm_head"] is True  # it produces the graph output


def test_gemm_forms_that_are_not_handled() -> None:
    w = _weight(64, 64)
    model = _model(
        [
            helper.make_node("Gemm", ["x", "W"], ["a"], name="scaled", alpha=2.0),
            helper.make_node("Gemm", ["a", "W2", "C"], ["b"], name="beta", beta=0.5),
            helper.make_node("Gemm", ["b", "W3"], ["y"], name="transposed_a", transA=1),
        ],
        {"x": [64, 64]},
        {"y": [64, 64]},
        {"W": w, "W2": w + 1, "W3": w - 1, "C": _weight(64)},
    )
    rtn = _run_pass(model, min_elements=0)
    assert rtn.details["skipped"] == {
        "scaled": "Gemm with alpha=2.0 is not handled (only 1)",
        "beta": "Gemm with beta=0.5 is not handled (only 1)",
        "transposed_a": "Gemm with transA=1 is not handled",
    }
    assert _ops(model) == ["Gemm"] * 3


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_weight_in_a_constant_node(fmt: str) -> None:
    w = _weight(64, 32)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w))
    model = _model(
        [const, helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"x": [1, 64]}, {"y": [1, 32]}, {}
    )
    _run_pass(model, group_size=16, format=fmt, min_elements=0)
    assert "Constant" not in _ops(model)
    x = _weight(1, 64)
    _close(_run(model, {"x": x})[0], x @ _dequantized(w, 4, 16, False))


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_weight_shared_by_two_matmuls(fmt: str) -> None:
    w = _weight(64, 64)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="second"),
        ],
        {"x": [2, 64]},
        {"y": [2, 64]},
        {"W": w},
    )
    rtn = _run_pass(model, group_size=32, format=fmt, min_elements=0)
    quantized = [name for name in model.graph.initializers if name.startswith("W_q4")]
    assert quantized == ["W_q4"]  # quantized once, used by both nodes
    layers = rtn.details["layers"]
    assert layers["first"]["shared_weight"] and layers["second"]["shared_weight"]
    assert rtn.details["bytes_before"] == 64 * 64 * 4  # counted once
    x = _weight(2, 64)
    wq = _dequantized(w, 4, 32, False)
    _close(_run(model, {"x": x})[0], x @ wq @ wq)


def test_weight_with_another_float_consumer_is_skipped() -> None:
    w = _weight(64, 64)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "W"], ["y"], name="residual"),
        ],
        {"x": [64, 64]},
        {"y": [64, 64]},
        {"W": w},
    )
    rtn = _run_pass(model, min_elements=0)
    assert rtn.details["skipped"] == {"mm": "weight 'W' is also used by Add node 'residual'"}
    assert rtn.details["layers"] == {}
    assert _ops(model) == ["MatMul", "Add"]
    x = _weight(64, 64)
    _close(_run(model, {"x": x})[0], x @ w + w)


def test_skip_reasons() -> None:
    model = _model(
        [
            helper.make_node("MatMul", ["x", "dynamic"], ["a"], name="dynamic_weight"),
            helper.make_node("MatMul", ["a", "batched"], ["b"], name="three_d"),
            helper.make_node("MatMul", ["b", "narrow"], ["c"], name="small_k"),
            helper.make_node("MatMul", ["c", "tiny"], ["d"], name="few_elements"),
            helper.make_node("MatMul", ["d", "kept"], ["y"], name="excluded"),
        ],
        {"x": [2, 64], "dynamic": [64, 64]},
        {"y": None},
        {"batched": _weight(2, 64, 8), "narrow": _weight(8, 32), "tiny": _weight(32, 16), "kept": _weight(16, 64)},
    )
    rtn = _run_pass(model, exclude=["excluded"], min_elements=1024)
    assert rtn.details["skipped"] == {
        "dynamic_weight": "weight 'dynamic' is not a constant (initializer or Constant node)",
        "three_d": "weight 'batched' has shape [2, 64, 8]: only 2-D weights are quantized",
        "small_k": "K=8 is too small to quantize in groups (needs K >= 16)",
        "few_elements": "weight has 512 elements, fewer than min_elements=1024",
        "excluded": "excluded by option 'exclude'",
    }
    assert rtn.details["layers"] == {}


def test_graph_input_weight_is_skipped() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        {"x": [2, 64], "W": [64, 64]},
        {"y": None},
        {"W": _weight(64, 64)},
    )
    rtn = _run_pass(model, min_elements=0)
    assert rtn.details["skipped"] == {"mm": "weight 'W' is a graph input (it can be overridden at run time)"}


def test_nothing_to_do_leaves_the_model_unmodified() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2]}, {"y": [2]}, {}, opset=18)
    rtn = WeightOnlyRTN(RTNOptions(format="dq"))
    assert rtn(model).modified is False
    assert model.opset_imports[""] == 18  # no conversion when nothing is quantized
    assert rtn.details["layers"] == {} and rtn.details["skipped"] == {}


def _tied_embedding_model() -> tuple[ir.Model, np.ndarray]:
    vocab, d = 64, 32
    table = _weight(vocab, d)
    model = _model(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
            helper.make_node("Gemm", ["h", "table"], ["logits"], name="lm_head", transB=1),
        ],
        {},
        {"logits": [3, vocab]},
        {"table": table},
        other_inputs=(helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),),
    )
    return model, table


def test_tied_lm_head_kept_float_when_asked() -> None:
    model, _ = _tied_embedding_model()
    rtn = _run_pass(model, group_size=16, min_elements=0, quantize_lm_head=False)
    assert rtn.details["skipped"] == {
        "lm_head": "LM head (its weight is tied to a Gather (embedding)) kept float: quantize_lm_head is false"
    }
    assert _ops(model) == ["Gather", "Gemm"]


def test_tied_lm_head_quantized_keeps_the_table_for_the_gather() -> None:
    model, table = _tied_embedding_model()
    rtn = _run_pass(model, group_size=16, min_elements=0, quantize_lm_head=True)
    assert _ops(model) == ["Gather", "MatMulNBits"]
    assert "table" in model.graph.initializers  # still needed by the Gather
    layer = rtn.details["layers"]["lm_head"]
    assert layer["lm_head"] and layer["kept_float"]
    assert rtn.details["bytes_after"] == layer["bytes_after"] + table.nbytes
    ids = np.array([1, 5, 63], dtype=np.int64)
    (logits,) = _run(model, {"ids": ids})
    _close(logits, table[ids] @ _dequantized(table.T, 4, 16, False))


def test_graph_output_lm_head_kept_float_when_asked() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["logits"], name="head")],
        {"x": [1, 64]},
        {"logits": None},
        {"W": _weight(64, 64)},
    )
    rtn = _run_pass(model, min_elements=0, quantize_lm_head=False)
    assert rtn.details["skipped"] == {
        "head": "LM head (it produces a graph output) kept float: quantize_lm_head is false"
    }


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_matmuls_inside_if_branches(fmt: str) -> None:
    k, n = 64, 32
    w = _weight(k, n)
    w_else = _weight(k, n)

    def branch(name: str, weight: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", weight], [f"{name}_out"], name=f"{name}_mm")],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, n])],
            [numpy_helper.from_array(w_else, "W_else")] if name == "else" else [],
        )

    model = _model(
        [
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch("then", "W"), else_branch=branch("else", "W_else")
            )
        ],
        {"x": [2, k]},
        {"y": [2, n]},
        {"W": w},
        other_inputs=(helper.make_tensor_value_info("cond", TensorProto.BOOL, []),),
    )
    rtn = _run_pass(model, group_size=32, format=fmt, min_elements=0)
    assert rtn.details["layers"]["then_mm"]["subgraph"] is True
    assert rtn.details["layers"]["else_mm"]["subgraph"] is True
    x = _weight(2, k)
    for cond, weight in ((True, w), (False, w_else)):
        (y,) = _run(model, {"x": x, "cond": np.array(cond)})
        _close(y, x @ _dequantized(weight, 4, 32, False))


def test_weight_used_from_main_graph_and_subgraph() -> None:
    w = _weight(64, 64)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["t"], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 64])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 64])],
    )
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="outer"),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        {"x": [2, 64]},
        {"y": [2, 64]},
        {"W": w},
        other_inputs=(helper.make_tensor_value_info("cond", TensorProto.BOOL, []),),
    )
    rtn = _run_pass(model, group_size=32, format="dq", min_elements=0)
    assert set(rtn.details["layers"]) == {"outer", "inner"}
    assert "W" not in model.graph.initializers
    subgraph = model.graph.node(2).attributes["then_branch"].as_graph()
    assert any(name.startswith("W_q4") for name in subgraph.initializers)  # a copy beside its user
    assert rtn.details["bytes_before"] == w.nbytes  # the float weight counts once, each copy counts after
    assert rtn.details["bytes_after"] == 2 * rtn.details["layers"]["inner"]["bytes_after"]
    x = _weight(2, 64)
    wq = _dequantized(w, 4, 32, False)
    _close(_run(model, {"x": x, "cond": np.array(True)})[0], x @ wq @ wq)


def test_failed_opset_conversion_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(model: ir.Model, target_version: int) -> None:
        raise RuntimeError("no adapter for SomeOp")

    monkeypatch.setattr(rtn_module.version_converter, "convert_version", refuse)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        {"x": [2, 64]},
        {"y": [2, 32]},
        {"W": _weight(64, 32)},
        opset=17,
    )
    message = "format='dq' with bits=4 needs the default opset >= 21; converting the model from opset 17 failed"
    with pytest.raises(KilnError, match=re.escape(message)):
        _run_pass(model, format="dq", min_elements=0)


@pytest.mark.parametrize(("bits", "target"), [(4, 21), (2, 25)])
def test_dq_converts_an_older_opset(bits: int, target: int) -> None:
    w = _weight(64, 32)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("ReduceMean", ["h", "axes"], ["y"], keepdims=1),  # axes became an input in opset 18
        ],
        {"x": [2, 64]},
        {"y": [2, 1]},
        {"W": w, "axes": np.array([-1], np.int64)},
        opset=18,
    )
    rtn = _run_pass(model, bits=bits, group_size=16, format="dq", min_elements=0)
    assert rtn.details["opset"] == {"from": 18, "to": target}
    assert model.opset_imports[""] == target
    assert model.ir_version >= onnx.helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    x = _weight(2, 64)
    _close(_run(model, {"x": x})[0], (x @ _dequantized(w, bits, 16, False)).mean(-1, keepdims=True))


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_per_channel(fmt: str) -> None:
    w = _weight(100, 24)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"x": [3, 100]}, {"y": [3, 24]}, {"W": w}
    )
    _run_pass(model, bits=8, group_size=0, symmetric=True, format=fmt, min_elements=0)
    node = model.graph.node(len(model.graph) - 1 if fmt == "matmulnbits" else 0)
    if fmt == "matmulnbits":
        assert node.attributes.get_int("block_size") == 128
    else:
        assert node.attributes.get_int("axis") == 1 and "block_size" not in node.attributes
    x = _weight(3, 100)
    _close(_run(model, {"x": x})[0], x @ _dequantized(w, 8, 0, True))


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_float16_model(fmt: str) -> None:
    w = _weight(64, 32, dtype=np.float16)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        {"x": [2, 64]},
        {"y": [2, 32]},
        {"W": w},
        elem=TensorProto.FLOAT16,
    )
    _run_pass(model, group_size=32, format=fmt, min_elements=0)
    scales = next(v for name, v in model.graph.initializers.items() if "scale" in name)
    assert scales.dtype == ir.DataType.FLOAT16
    x = _weight(2, 64, dtype=np.float16)
    (y,) = _run(model, {"x": x})
    assert y.dtype == np.float16
    _close(y.astype(np.float32), x.astype(np.float32) @ _dequantized(w, 4, 32, False), rel=2e-3)


def test_accuracy_level_four_runs_with_int8_activations() -> None:
    w = _weight(128, 64)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"x": [4, 128]}, {"y": [4, 64]}, {"W": w}
    )
    _run_pass(model, group_size=32, accuracy_level=4, min_elements=0)
    assert model.graph.node(0).attributes.get_int("accuracy_level") == 4
    x = _weight(4, 128)
    (y,) = _run(model, {"x": x})
    assert _rel(y, x @ _dequantized(w, 4, 32, False)) < 0.02  # activations are quantized to int8 in blocks


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 9}, "bits must be an integer from 2 to 8, got 9"),
        ({"group_size": 24}, "group_size=24 with format='matmulnbits': it becomes MatMulNBits' block_size"),
        ({"bits": 2, "group_size": 512}, "with block_size <= 256"),
        ({"group_size": -1}, "group_size must be 0"),
        ({"accuracy_level": 7}, "accuracy_level must be 0..4"),
        ({"format": "dq", "accuracy_level": 4}, "accuracy_level applies only to format='matmulnbits'"),
        ({"format": "int4"}, "format must be 'matmulnbits' or 'dq'"),
        ({"op_types": ["Conv"]}, "op_types may contain only 'MatMul' and 'Gemm'"),
        ({"min_elements": -5}, "min_elements must be >= 0"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RTNOptions(**options)


def test_registry_turns_bad_options_into_recipe_errors() -> None:
    assert registry.get("quantize.rtn") is WeightOnlyRTN
    with pytest.raises(RecipeError, match=re.escape("pass 'quantize.rtn': bits must be an integer from 2 to 8, got 9")):
        registry.create("quantize.rtn", {"bits": 9})
    with pytest.raises(RecipeError, match="group_size=24 with format='matmulnbits'"):
        registry.create("quantize.rtn", {"group_size": 24})
    created = registry.create("quantize.rtn", {"bits": 8, "format": "dq", "exclude": ["lm_head"]})
    assert created.options.bits == 8 and created.options.exclude == ["lm_head"]
