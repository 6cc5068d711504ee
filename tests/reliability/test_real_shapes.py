"""Graph shapes real exporters produce, through every registered pass and every ONNX Runtime target.

Each graph is small and built with ``onnx.helper`` (a torch export per test would take seconds):

* ``constants``: weights and biases in ``Constant`` nodes, Gemm with ``transB=1``, opset 13;
* ``nested-if``: an ``If`` whose else-branch holds another ``If``, branches reading outer-scope weights;
* ``rnn``: an LSTM feeding a GRU, then a MatMul head;
* ``fp16``: float16 inputs, weights and outputs, with LayerNormalization and Softmax;
* ``mixed-dtypes``: int64 token ids through a Gather, a float16 island between Casts, float32 outside;
* ``dynamic``: symbolic batch and sequence, with the Shape -> Gather -> Concat -> Reshape chains exporters emit.

Every pass (calibration from random feeds where it needs it) must give a model that checks and runs in ONNX Runtime
with the original's outputs (exactly for cleanup passes, finite and of the same shape for lossy ones), or decline
with a :class:`KilnError`. Every ONNX Runtime target must build and verify the model, or refuse it with one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import kiln
from kiln import targets, testing
from kiln.compiler import io, recipes, registry
from kiln.compiler.pipeline import PipelineError
from kiln.errors import KilnError, VerificationError
from kiln.passes import PassContext, create

F32, F16, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64
RNG = np.random.default_rng(0)


def weight(name: str, *shape: int, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype), name)


def const_node(tensor: onnx.TensorProto) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [tensor.name], value=tensor, name=f"const_{tensor.name}")


def model(nodes, inputs, outputs, initializers=(), opset: int = 21) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "real", inputs, outputs, list(initializers))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8 if opset < 21 else 10)


def constants() -> onnx.ModelProto:
    nodes = [
        const_node(weight("w1", 64, 32)),
        const_node(weight("b1", 32)),
        const_node(weight("w2", 32, 32)),
        const_node(weight("b2", 32)),
        oh.make_node("MatMul", ["x", "w1"], ["h1"]),
        oh.make_node("Add", ["h1", "b1"], ["h2"]),
        oh.make_node("Relu", ["h2"], ["h3"]),
        oh.make_node("Gemm", ["h3", "w2", "b2"], ["y"], transB=1),
    ]
    x = oh.make_tensor_value_info("x", F32, ["batch", 64])
    return model(nodes, [x], [oh.make_tensor_value_info("y", F32, ["batch", 32])], opset=13)


def nested_if() -> onnx.ModelProto:
    def branch(name: str, w: str) -> onnx.GraphProto:
        out = oh.make_tensor_value_info(f"{name}_out", F32, ["batch", 64])
        return oh.make_graph([oh.make_node("MatMul", ["x", w], [f"{name}_out"])], name, [], [out])

    inner = oh.make_node("If", ["cond2"], ["inner_out"], then_branch=branch("t2", "w2"), else_branch=branch("e2", "w3"))
    else_out = oh.make_tensor_value_info("inner_out", F32, ["batch", 64])
    else_branch = oh.make_graph([inner], "else", [], [else_out])
    nodes = [
        oh.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        oh.make_node("Greater", ["total", "zero"], ["cond"]),
        oh.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        oh.make_node("Greater", ["peak", "one"], ["cond2"]),
        oh.make_node("If", ["cond"], ["y"], then_branch=branch("t1", "w1"), else_branch=else_branch),
    ]
    inits = [weight(f"w{i}", 32, 64) for i in (1, 2, 3)]
    inits += [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(1), "one")]
    x = oh.make_tensor_value_info("x", F32, ["batch", 32])
    return model(nodes, [x], [oh.make_tensor_value_info("y", F32, ["batch", 64])], inits)


def rnn() -> onnx.ModelProto:
    hidden = 16
    inits = [
        weight("lstm_w", 1, 4 * hidden, 8),
        weight("lstm_r", 1, 4 * hidden, hidden),
        weight("lstm_b", 1, 8 * hidden),
        weight("gru_w", 1, 3 * hidden, hidden),
        weight("gru_r", 1, 3 * hidden, hidden),
        weight("gru_b", 1, 6 * hidden),
        weight("head", hidden, 32),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    nodes = [
        oh.make_node("LSTM", ["x", "lstm_w", "lstm_r", "lstm_b"], ["seq", ""], hidden_size=hidden),
        oh.make_node("Squeeze", ["seq", "axis1"], ["seq3"]),
        oh.make_node("GRU", ["seq3", "gru_w", "gru_r", "gru_b"], ["", "last"], hidden_size=hidden),
        oh.make_node("Squeeze", ["last", "axis0"], ["last2"]),
        oh.make_node("MatMul", ["last2", "head"], ["y"]),
    ]
    x = oh.make_tensor_value_info("x", F32, [5, "batch", 8])
    return model(nodes, [x], [oh.make_tensor_value_info("y", F32, ["batch", 32])], inits)


def fp16() -> onnx.ModelProto:
    inits = [
        weight("w1", 32, 64, dtype=np.float16),
        weight("b1", 64, dtype=np.float16),
        numpy_helper.from_array(np.ones(64, np.float16), "gamma"),
        numpy_helper.from_array(np.zeros(64, np.float16), "beta"),
        weight("w2", 64, 32, dtype=np.float16),
    ]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h1"]),
        oh.make_node("Add", ["h1", "b1"], ["h2"]),
        oh.make_node("Relu", ["h2"], ["h3"]),
        oh.make_node("LayerNormalization", ["h3", "gamma", "beta"], ["h4"], axis=-1),
        oh.make_node("MatMul", ["h4", "w2"], ["h5"]),
        oh.make_node("Softmax", ["h5"], ["y"], axis=-1),
    ]
    x = oh.make_tensor_value_info("x", F16, ["batch", 4, 32])
    return model(nodes, [x], [oh.make_tensor_value_info("y", F16, ["batch", 4, 32])], inits)


def mixed_dtypes() -> onnx.ModelProto:
    inits = [
        weight("embedding", 50, 32),
        weight("w16", 32, 32, dtype=np.float16),
        weight("w32", 32, 16),
    ]
    nodes = [
        oh.make_node("Gather", ["embedding", "ids"], ["emb"]),
        oh.make_node("Cast", ["emb"], ["emb16"], to=F16),
        oh.make_node("MatMul", ["emb16", "w16"], ["h16"]),
        oh.make_node("Cast", ["h16"], ["h32"], to=F32),
        oh.make_node("Add", ["h32", "emb"], ["res"]),
        oh.make_node("MatMul", ["res", "w32"], ["y"]),
    ]
    ids = oh.make_tensor_value_info("ids", I64, ["batch", "seq"])
    return model(nodes, [ids], [oh.make_tensor_value_info("y", F32, ["batch", "seq", 16])], inits)


def dynamic() -> onnx.ModelProto:
    inits = [
        weight("w1", 32, 64),
        weight("w2", 64, 32),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        numpy_helper.from_array(np.array([2, 32], np.int64), "heads"),
        numpy_helper.from_array(np.array([64], np.int64), "width"),
    ]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h"]),
        oh.make_node("Shape", ["h"], ["shape"]),
        oh.make_node("Gather", ["shape", "i0"], ["b"]),
        oh.make_node("Gather", ["shape", "i1"], ["s"]),
        oh.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        oh.make_node("Unsqueeze", ["s", "ax0"], ["s1"]),
        oh.make_node("Concat", ["b1", "s1", "heads"], ["split_shape"], axis=0),
        oh.make_node("Reshape", ["h", "split_shape"], ["split"]),
        oh.make_node("Transpose", ["split"], ["t"], perm=[0, 2, 1, 3]),
        oh.make_node("Softmax", ["t"], ["p"], axis=-1),
        oh.make_node("Transpose", ["p"], ["back"], perm=[0, 2, 1, 3]),
        oh.make_node("Concat", ["b1", "s1", "width"], ["merge_shape"], axis=0),
        oh.make_node("Reshape", ["back", "merge_shape"], ["merged"]),
        oh.make_node("MatMul", ["merged", "w2"], ["y"]),
    ]
    x = oh.make_tensor_value_info("x", F32, ["batch", "seq", 32])
    return model(nodes, [x], [oh.make_tensor_value_info("y", F32, ["batch", "seq", 32])], inits)


GRAPHS: dict[str, Callable[[], onnx.ModelProto]] = {
    "constants": constants,
    "nested-if": nested_if,
    "rnn": rnn,
    "fp16": fp16,
    "mixed-dtypes": mixed_dtypes,
    "dynamic": dynamic,
}
#: The dynamic dimensions' sizes in test feeds: not 1, so a pass that froze a dimension to 1 is caught.
SIZES = {"batch": 2, "seq": 3}


def feed(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    result = {}
    for value in proto.graph.input:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else SIZES[d.dim_param] for d in tensor.shape.dim]
        if tensor.elem_type == I64:
            result[value.name] = rng.integers(0, 50, shape).astype(np.int64)
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            result[value.name] = rng.standard_normal(shape).astype(dtype)
    return result


def run_ort(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, inputs
    )


def pass_options(name: str) -> dict[str, int]:
    """Options that let a weight pass act on these small weights (defaults skip weights under 4096 elements)."""
    fields = {field for field, _, _ in registry.option_fields(registry.get(name))}
    return {key: value for key, value in {"min_elements": 0, "group_size": 16}.items() if key in fields}


#: Bugs found here in passes owned by others, (graph, pass) -> what goes wrong; strict, so a fix is noticed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}
PASS_CASES = [
    pytest.param(graph, name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[graph, name])])
    if (graph, name) in KNOWN_BUGS
    else pytest.param(graph, name)
    for graph in sorted(GRAPHS)
    for name in registry.names()
]


@pytest.mark.parametrize(("graph", "pass_name"), PASS_CASES)
def test_every_pass_handles_real_export_shapes(graph: str, pass_name: str):
    original = GRAPHS[graph]()
    onnx.checker.check_model(original, full_check=True)
    inputs = feed(original)
    expected = run_ort(original, inputs)
    context = PassContext(calibration=kiln.CalibrationData([feed(original, seed=s) for s in (1, 2)]))
    model = ir.serde.deserialize_model(original)
    try:
        (record,) = kiln.Pipeline([create(pass_name, pass_options(pass_name), context)])(model)
    except PipelineError as e:
        assert "cannot run on this model" in str(e), str(e)
        return
    except KilnError:
        return
    result = ir.serde.serialize_model(model)
    onnx.checker.check_model(result)
    got = run_ort(result, inputs)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        if not record.modified or pass_name.startswith("cleanup."):
            tolerance = 1e-2 if e.dtype == np.float16 else 1e-4
            np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance)
        else:
            assert np.isfinite(g).all()


@pytest.mark.parametrize("target", targets.names())
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_every_ort_target_builds_real_export_shapes(tmp_path: Path, graph: str, target: str):
    original = GRAPHS[graph]()
    onnx.save(original, str(tmp_path / "model.onnx"))
    recipe = dataclasses.replace(recipes.load("cleanup"), target=target, target_options={})
    out_dir = tmp_path / "out"
    calibration = kiln.CalibrationData([feed(original)])
    try:
        kiln.compile_model(tmp_path / "model.onnx", out_dir, recipe, calibration=calibration)
    except VerificationError as e:  # the compiled artifact does not load or run: a bug, not a refusal
        pytest.fail(str(e))
    except KilnError:  # e.g. no CUDA device for ort-cuda
        assert not out_dir.exists()
        return
    inputs = feed(original, seed=3)
    got = targets.load(out_dir)(inputs)
    for name, e in zip([o.name for o in original.graph.output], run_ort(original, inputs), strict=True):
        np.testing.assert_allclose(got[name], e, rtol=1e-2, atol=1e-2)


def test_llama_generator_writes_a_model_rtn_quantizes(tmp_path: Path):
    """kiln.testing.write_llama, which tools/scale_bench.py scales to 7 GB, at a size that runs in a moment."""
    path = testing.write_llama(tmp_path / "fp32", layers=2, hidden=64, intermediate=128, vocab=100, heads=4)
    assert io.model_bytes(path) > 4 * (2 * (4 * 64 * 64 + 3 * 64 * 128) + 2 * 100 * 64)
    ids = {"input_ids": np.array([[1, 2, 3, 4, 5]], np.int64)}
    expected = run_ort(onnx.load(str(path)), ids)[0]
    model = kiln.load(path)
    (record,) = kiln.Pipeline([create("quantize.rtn", {"bits": 4, "group_size": 32, "min_elements": 0})])(model)
    assert len(record.details["layers"]) == 2 * 7 + 1  # every projection and the LM head; the embedding stays
    out = kiln.save(model, tmp_path / "w4" / "model.onnx")
    got = run_ort(onnx.load(str(out)), ids)[0]
    assert got.shape == expected.shape == (1, 5, 100)
    assert np.dot(got.ravel(), expected.ravel()) / np.linalg.norm(got) / np.linalg.norm(expected) > 0.9
