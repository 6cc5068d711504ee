"""kiln.load / kiln.save: round trips, external data, atomic writes, and every malformed-input error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import kiln
from kiln import testing
from kiln.compiler import io
from kiln.errors import ModelLoadError


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return kiln.save(testing.mlp([64, 128, 16]), tmp_path / "m.onnx")


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_round_trip_keeps_weights_external_and_lazy(saved: Path, tmp_path: Path):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    model = kiln.load(saved)
    w0 = model.graph.initializers["w0"].const_value
    assert isinstance(w0, ir.ExternalTensor)
    resaved = kiln.save(model, tmp_path / "copy" / "m.onnx")
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(saved, x), run(resaved, x))
    # 64x128 + 128x16 float weights live in the data file, not in the protobuf.
    assert (tmp_path / "copy" / "m.onnx.data").stat().st_size >= (64 * 128 + 128 * 16) * 4
    assert (tmp_path / "copy" / "m.onnx").stat().st_size < 4096


def test_save_leaves_no_temporaries_and_replaces_atomically(saved: Path, tmp_path: Path):
    model = kiln.load(saved)
    target = tmp_path / "out" / "model.onnx"
    kiln.save(model, target)
    kiln.save(model, target)  # again, over the existing files
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(target))


def test_model_bytes_counts_external_data(saved: Path):
    assert io.model_bytes(saved) == saved.stat().st_size + (saved.parent / "m.onnx.data").stat().st_size


def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        kiln.load(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path: Path):
    expect_error(tmp_path / "nope.onnx", "nope.onnx", "no such file")


def test_directory_is_not_a_model(tmp_path: Path):
    expect_error(tmp_path, "not a file")


def test_empty_file(tmp_path: Path):
    (tmp_path / "e.onnx").write_bytes(b"")
    expect_error(tmp_path / "e.onnx", "e.onnx", "empty file")


def test_random_bytes(tmp_path: Path):
    (tmp_path / "r.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(tmp_path / "r.onnx", "r.onnx", "not a valid ONNX model")


def test_truncated_protobuf(saved: Path, tmp_path: Path):
    data = saved.read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "t.onnx", "t.onnx", "not a valid ONNX model")


def test_missing_external_data(saved: Path):
    os.remove(saved.parent / "m.onnx.data")
    expect_error(saved, "initializer 'w0'", "m.onnx.data", "missing")


def test_short_external_data(saved: Path):
    os.truncate(saved.parent / "m.onnx.data", 100)
    expect_error(saved, "too short")


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.data", "sub/../../outside.data"])
def test_external_data_outside_model_dir_is_refused(saved: Path, location: str):
    proto = onnx.load(str(saved), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(saved))
    expect_error(saved, "escapes the model's directory")


def test_opset_newer_than_supported(saved: Path):
    proto = onnx.load(str(saved), load_external_data=False)
    proto.opset_import[0].version = io.MAX_OPSET + 1
    onnx.save(proto, str(saved))
    expect_error(saved, f"opset {io.MAX_OPSET + 1}", f"max {io.MAX_OPSET}")


def test_checker_rejection_names_the_problem(saved: Path):
    proto = onnx.load(str(saved), load_external_data=False)
    proto.graph.node[0].input[0] = "undefined_tensor"
    onnx.save(proto, str(saved))
    expect_error(saved, "rejected by the ONNX checker")


def test_load_never_modifies_the_input(saved: Path, tmp_path: Path):
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = kiln.load(saved)
    model.graph.initializers["w0"].const_value = ir.tensor(np.zeros((64, 128), np.float32), name="w0")
    kiln.save(model, tmp_path / "other" / "m.onnx")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
