"""ort-mobile: a verified .ort file plus the reduced-build operator config, or a clear refusal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import kiln
from kiln import testing
from kiln.errors import KilnError
from kiln.targets.ort import SessionSettings, mobile
from tests.targets.conftest import rtn_recipe


def test_ort_file_config_and_verification(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-mobile", bits=8))
    assert result.verification.passed
    assert {"model.ort", "required_operators.config", "session.json", "model.onnx"} <= set(os.listdir(out_dir))
    details = result.report["target"]
    assert details["ort_bytes"] == (out_dir / "model.ort").stat().st_size
    config = (out_dir / "required_operators.config").read_text()
    assert "# - model.ort" in config and "kiln-tmp" not in config
    assert "com.microsoft;1;FusedGemm,MatMulNBits" in config.splitlines()
    settings = SessionSettings.read(out_dir)
    assert (settings.model, settings.graph_optimization_level) == ("model.ort", "ORT_DISABLE_ALL")


def test_type_reduction_config(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    kiln.compile_model(
        mlp_path, out_dir, rtn_recipe("ort-mobile", fmt="matmulnbits"), target_options={"type_reduction": True}
    )
    config = (out_dir / "required_operators_and_types.config").read_text()
    assert "MatMulNBits" in config and "{" in config


def test_unfused_4bit_weights_are_refused_with_the_reason(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    with pytest.raises(KilnError) as info:
        kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-mobile", bits=4))
    message = str(info.value)
    assert "the ORT format cannot store UINT4 tensors" in message
    assert "matmul0_dq: the MatMul (with its bias Add) feeds a single Relu/Clip" in message
    assert "format='matmulnbits'" in message
    assert not out_dir.exists()


def test_4bit_matmulnbits_goes_to_mobile(mlp_path: Path, tmp_path: Path):
    result = kiln.compile_model(mlp_path, tmp_path / "out", rtn_recipe("ort-mobile", fmt="matmulnbits"))
    assert result.verification.passed
    assert result.report["target"]["optimization"]["ops_after"]["com.microsoft.MatMulNBits"] == 2


@pytest.mark.parametrize("listed", [True, False], ids=["kernel-list", "cpu-session"])
def test_contrib_ops_without_cpu_kernel_are_refused(monkeypatch: pytest.MonkeyPatch, listed: bool):
    if not listed:  # onnxruntime-gpu builds that crash listing their kernels: a CPU-only session finds it
        monkeypatch.setattr(mobile, "cpu_kernels", lambda: None)
    a, b = testing.value("a", [4, 4]), testing.value("b", [4, 4])
    y = testing.value("y", [4, 4])
    node = ir.Node("com.microsoft", "GemmFloat8", [a, b], outputs=[y], name="f8")
    model = ir.to_proto(testing.model([a, b], [y], [node]))
    with pytest.raises(KilnError, match=r"'f8' \(com.microsoft.GemmFloat8\) has no CPU kernel"):
        mobile._check_kernels(model)


def test_runner_matches_onnx_model(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    kiln.compile_model(mlp_path, out_dir, rtn_recipe("ort-mobile", bits=8))
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    onnx_runner = kiln.targets.ort.OrtRunner.from_path(out_dir / "model.onnx")
    np.testing.assert_allclose(kiln.targets.load(out_dir)({"x": x})["y"], onnx_runner({"x": x})["y"], atol=1e-5)
    assert onnx.load(str(out_dir / "model.onnx")).graph.output[0].name == "y"
