"""ONNX's per-operator conformance tests (Debian ``libonnx-testdata``: 932 node tests) through kiln's cleanup.

Each test model is loaded with :func:`kiln.load`, rewritten by ``cleanup.optimize`` through :class:`kiln.Pipeline`,
saved with :func:`kiln.save` and run in ONNX Runtime against the test's expected outputs. Outcomes:

* ``passed``: the saved model reproduces the expected outputs;
* ``refused``: kiln declined with a :class:`KilnError` (an unsupported model), which is allowed;
* ``ort cannot run the original``: ONNX Runtime fails on, or disagrees with, the unmodified test model too, so the
  test says nothing about kiln;
* anything else fails: a crash (any other exception), or a model the original's ONNX Runtime run matches and
  kiln's does not.

The data is installed in CI by ``.ci/run`` (``apt-get install -y libonnx-testdata``); without it the tests skip.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import kiln
from kiln.errors import KilnError
from kiln.passes import create

NODE_TESTS = Path("/usr/share/libonnx-testdata/data/node")

pytestmark = pytest.mark.skipif(
    not NODE_TESTS.is_dir(), reason="Debian package libonnx-testdata not installed (apt-get install libonnx-testdata)"
)


def _read(path: Path, kind: onnx.TypeProto):
    """A test-data file as the value ONNX Runtime takes: array, list of arrays, optional, or dict."""
    field = kind.WhichOneof("value")
    proto = {
        "tensor_type": onnx.TensorProto,
        "sequence_type": onnx.SequenceProto,
        "optional_type": onnx.OptionalProto,
        "map_type": onnx.MapProto,
    }[field]()
    proto.ParseFromString(path.read_bytes())
    if field == "tensor_type":
        return numpy_helper.to_array(proto)
    if field == "sequence_type":
        return numpy_helper.to_list(proto)
    if field == "optional_type":
        return numpy_helper.to_optional(proto)
    return numpy_helper.to_dict(proto)


def _matches(got, expected) -> bool:
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(_matches, got, expected))
    if expected is None or got is None:
        return expected is None and got is None
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        return False
    if expected.dtype.kind in "fc":
        return np.allclose(
            got.astype(np.complex128), expected.astype(np.complex128), rtol=1e-3, atol=1e-5, equal_nan=True
        )
    return np.array_equal(got, expected)


def _runs_as_expected(path: Path, case: Path, graph: onnx.GraphProto, expected: list) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        data = case / "test_data_set_0"
        initializers = {t.name for t in graph.initializer}
        inputs = [v for v in graph.input if v.name not in initializers]
        feed = {
            v.name: _read(data / f"input_{i}.pb", v.type)
            for i, v in enumerate(inputs)
            if (data / f"input_{i}.pb").exists()
        }
        got = session.run(None, feed)
    except Exception:  # ONNX Runtime's own errors, or test inputs it cannot take (e.g. bfloat16)
        return False
    return len(got) == len(expected) and all(map(_matches, got, expected))


def check_node_test(case: Path, out_dir: Path) -> str:
    """The outcome of one node test (see the module docstring); raises on a crash."""
    graph = onnx.load(str(case / "model.onnx"), load_external_data=False).graph
    data = case / "test_data_set_0"
    expected = [_read(data / f"output_{i}.pb", v.type) for i, v in enumerate(graph.output)]
    try:
        model = kiln.load(case / "model.onnx")
        kiln.Pipeline([create("cleanup.optimize")])(model)
    except KilnError:
        return "refused"
    saved = kiln.save(model, out_dir / f"{case.name}.onnx")
    if _runs_as_expected(saved, case, graph, expected):
        return "passed"
    if not _runs_as_expected(case / "model.onnx", case, graph, expected):
        return "ort cannot run the original"
    return "kiln broke it"


def test_node_conformance_through_cleanup(tmp_path: Path):
    cases = sorted(p for p in NODE_TESTS.iterdir() if (p / "model.onnx").is_file())
    outcomes: dict[str, list[str]] = collections.defaultdict(list)
    for case in cases:
        outcomes[check_node_test(case, tmp_path)].append(case.name)
    counts = {outcome: len(names) for outcome, names in sorted(outcomes.items())}
    print(
        f"\nlibonnx-testdata node tests through cleanup.optimize: {len(cases)} tests, {counts}, "
        f"pass rate {len(outcomes['passed']) / len(cases):.1%}"
    )
    assert len(cases) >= 900
    assert not outcomes["kiln broke it"], outcomes["kiln broke it"]
    assert len(outcomes["passed"]) >= 0.9 * len(cases), counts


def check_node_test_on_tvm(case: Path, out_dir: Path) -> str:
    """The outcome of one node test built and run by the tvm-llvm target: "passed", "refused" (a KilnError) or
    "wrong"; any other exception propagates (a crash)."""
    from kiln import targets

    graph = onnx.load(str(case / "model.onnx"), load_external_data=False).graph
    data = case / "test_data_set_0"
    expected = {v.name: _read(data / f"output_{i}.pb", v.type) for i, v in enumerate(graph.output)}
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    feed = {v.name: _read(data / f"input_{i}.pb", v.type) for i, v in enumerate(inputs)}
    target = targets.get("tvm-llvm")
    build_dir = out_dir / case.name
    build_dir.mkdir()
    try:
        target.build(case / "model.onnx", build_dir)
        got = target.load(build_dir)(feed)
    except KilnError:
        return "refused"
    return "passed" if all(_matches(got.get(name), value) for name, value in expected.items()) else "wrong"


def test_node_conformance_through_tvm(tmp_path: Path):
    """Every per-operator test through the tvm-llvm target: it runs right or is refused with a KilnError (an op
    the importer lacks or converts wrongly, or TVM's own failure as one line), never a crash or a wrong result."""
    pytest.importorskip("tvm")
    cases = sorted(p for p in NODE_TESTS.iterdir() if (p / "model.onnx").is_file())
    outcomes: dict[str, list[str]] = collections.defaultdict(list)
    for case in cases:
        outcomes[check_node_test_on_tvm(case, tmp_path)].append(case.name)
    counts = {outcome: len(names) for outcome, names in sorted(outcomes.items())}
    print(
        f"\nlibonnx-testdata node tests through tvm-llvm: {len(cases)} tests, {counts}, "
        f"pass rate {len(outcomes['passed']) / len(cases):.1%}"
    )
    assert not outcomes["wrong"], outcomes["wrong"]
    assert len(outcomes["passed"]) >= 0.5 * len(cases), counts


def test_sequence_typed_if_output_in_a_loop_body_keeps_its_type(tmp_path: Path):
    """Regression: onnx_ir's ShapeInferencePass merged dtypes only and typed this If output tensor(float)."""
    assert check_node_test(NODE_TESTS / "test_loop16_seq_none", tmp_path) == "passed"
