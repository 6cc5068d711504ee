"""kiln custom-op domains: function forms travel with the model, native kernels are registered per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from onnx import TensorProto

import kiln
from kiln import testing
from kiln.errors import KilnError
from kiln.targets.ort import SessionSettings, custom_ops, session

DOMAIN = "kiln.test"


def affine_function() -> onnx.FunctionProto:
    """kiln.test.Affine(x) = 2 x + 1, in standard ops."""
    two = oh.make_node("Constant", [], ["two"], value=oh.make_tensor("two", TensorProto.FLOAT, [], [2.0]))
    one = oh.make_node("Constant", [], ["one"], value=oh.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    body = [two, one, oh.make_node("Mul", ["x", "two"], ["t"]), oh.make_node("Add", ["t", "one"], ["y"])]
    return oh.make_function(DOMAIN, "Affine", ["x"], ["y"], body, opset_imports=[oh.make_opsetid("", 21)])


def custom_model(path: Path, domain: str = DOMAIN) -> Path:
    """y = Relu(domain.Affine(x)), without the function in the model."""
    x, y = testing.value("x", ["b", 4]), testing.value("y", ["b", 4])
    affine = ir.node("Affine", [x], domain=domain, name="affine")
    affine.outputs[0].name = "a"
    relu = ir.Node("", "Relu", [affine.outputs[0]], outputs=[y], name="relu")
    model = testing.model([x], [y], [affine, relu])
    model.opset_imports[domain] = 1
    ir.save(model, path)
    return path


@pytest.fixture
def affine_domain() -> Iterator[custom_ops.CustomDomain]:
    domain = custom_ops.register(custom_ops.CustomDomain(DOMAIN, {"Affine": affine_function()}))
    yield domain
    custom_ops.unregister(DOMAIN)


def expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(2 * x + 1, 0)


def build(target_name: str, out_dir: Path) -> dict:
    """Build ``target_name`` on the custom-op model directly: ONNX Runtime cannot run the source model, so a
    compile could not verify against it (kiln custom ops come from kiln passes, inside a compile)."""
    out_dir.mkdir()
    target = kiln.targets.get(target_name)
    details = target.build(custom_model(out_dir / "model.onnx"), out_dir)
    kiln.targets.write_marker(out_dir, target.name)
    return details


@pytest.mark.parametrize("target", ["ort-cpu", "ort-mobile"])
def test_function_form_is_attached_and_runs(affine_domain, tmp_path: Path, target: str):
    out_dir = tmp_path / "out"
    details = build(target, out_dir)
    assert details["custom_ops"] == ["kiln.test.Affine runs as its ONNX-function form (it has no native kernel)"]
    saved = onnx.load(str(out_dir / "model.onnx"))
    assert [(f.domain, f.name) for f in saved.functions] == [(DOMAIN, "Affine")]
    x = np.array([[-2.0, -0.25, 0.5, 3.0]], np.float32)
    np.testing.assert_allclose(kiln.targets.load(out_dir)({"x": x})["y"], expected(x))


def test_native_kernels_are_registered_in_each_session(tmp_path: Path):
    calls = []

    def register_kernels(options) -> None:
        calls.append(options)
        options.add_session_config_entry("kiln.test.kernels", "registered")

    custom_ops.register(custom_ops.CustomDomain(DOMAIN, {"Affine": affine_function()}, register_kernels))
    try:
        out_dir = tmp_path / "out"
        assert "custom_ops" not in build("ort-cpu", out_dir)
        assert SessionSettings.read(out_dir).custom_op_domains == [DOMAIN]
        options = session(out_dir).get_session_options()
        assert options.get_session_config_entry("kiln.test.kernels") == "registered"
    finally:
        custom_ops.unregister(DOMAIN)
    with pytest.raises(KilnError, match=r"native kernels of custom-op domain 'kiln\.test'"):
        session(out_dir)


def test_mobile_uses_function_form_when_native_kernels_are_desktop_only(tmp_path: Path):
    domain = custom_ops.CustomDomain(DOMAIN, {"Affine": affine_function()}, lambda options: None, mobile=False)
    custom_ops.register(domain)
    try:
        proto = onnx.load(str(custom_model(tmp_path / "c.onnx")))
        assert custom_ops.prepare(proto, mobile=True) == (
            [],
            ["kiln.test.Affine runs as its ONNX-function form (its native kernels are not in mobile builds)"],
        )
        assert custom_ops.prepare(proto) == ([DOMAIN], [])
    finally:
        custom_ops.unregister(DOMAIN)


def test_function_must_match_its_op():
    with pytest.raises(ValueError, match="must match"):
        custom_ops.CustomDomain(DOMAIN, {"Scale": affine_function()})


@pytest.mark.parametrize(
    ("domain", "mobile", "fragment"),
    [
        ("kiln.unknown", False, "custom-op domain 'kiln.unknown', which neither a kiln custom-op domain nor"),
        ("ai.onnx.contrib", False, "onnxruntime-extensions op: it needs that custom-op library registered"),
        ("ai.onnx.contrib", True, "Python-defined PyOps cannot run on mobile at all"),
    ],
)
def test_unknown_custom_ops_are_refused(tmp_path: Path, domain: str, mobile: bool, fragment: str):
    proto = onnx.load(str(custom_model(tmp_path / "c.onnx", domain)))
    with pytest.raises(KilnError, match=fragment):
        custom_ops.prepare(proto, mobile=mobile)


def test_model_local_functions_need_nothing(tmp_path: Path):
    proto = onnx.load(str(custom_model(tmp_path / "c.onnx")))
    proto.functions.append(affine_function())
    assert custom_ops.prepare(proto, mobile=True) == ([], [])
