"""tvm-cuda: the library builds without a GPU (NVRTC), refuses clearly to compile or run without one, and on a
machine with a GPU compiles, verifies and matches ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln import targets
from kiln.compiler.recipes import parse
from kiln.errors import KilnError
from kiln.targets.ort import SessionSettings
from kiln.targets.ort.runner import OrtRunner
from kiln.targets.tvm.cuda import compiler_problem, device_arch
from tests.targets.conftest import rtn_recipe

GPU = bool(device_arch())
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device")
needs_nvrtc = pytest.mark.skipif(bool(compiler_problem()), reason=compiler_problem() or "")


def _expected(out_dir: Path, x: np.ndarray) -> np.ndarray:
    exact = SessionSettings(graph_optimization_level="ORT_DISABLE_ALL")
    return OrtRunner.from_path(out_dir / "model.onnx", settings=exact)({"x": x})["y"]


@needs_nvrtc
def test_library_builds_for_an_arch_and_runs_only_on_a_gpu(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model_file = kiln.save(kiln.load(mlp_path), out_dir / "model.onnx")
    target = targets.get("tvm-cuda", {"dims": {"batch": 4}, "arch": device_arch() or "sm_80"})
    details = target.build(model_file, out_dir)
    targets.write_marker(out_dir, target.name)
    metadata = json.loads((out_dir / "tvm.json").read_text())
    assert metadata["device"] == "cuda" and '"kind":"cuda"' in metadata["target"]
    assert details["scheduled_functions"]["scheduled"] == details["scheduled_functions"]["total"] > 0
    assert details["cuda_kernels"] >= 3  # MatMul+Add+Relu, MatMul+Add, at least one per fused function
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    if GPU:
        np.testing.assert_allclose(targets.load(out_dir)({"x": x})["y"], _expected(out_dir, x), atol=1e-4)
    else:
        with pytest.raises(KilnError, match=r"model\.so: the library runs on a CUDA device, and TVM sees none"):
            targets.load(out_dir)


@pytest.mark.skipif(GPU, reason="covers machines without a GPU")
def test_compile_refuses_before_any_work_without_a_gpu(mlp_path: Path, tmp_path: Path):
    with pytest.raises(KilnError) as info:
        kiln.compile_model(mlp_path, tmp_path / "out", rtn_recipe("tvm-cuda"))
    assert str(info.value) in (
        "tvm-cuda runs the compiled model on a CUDA device to verify it, and TVM sees none on this machine "
        "(tvm.cuda(0) does not exist)",
        f"tvm-cuda: {compiler_problem()}",
    )
    assert not (tmp_path / "out").exists()


def test_arch_option_is_checked():
    with pytest.raises(KilnError, match="arch must look like sm_80 or sm_90a, got 'ampere'"):
        targets.get("tvm-cuda", {"arch": "ampere"})


@needs_gpu
@pytest.mark.parametrize(("fmt", "bits"), [(None, 0), ("matmulnbits", 4), ("dq", 8)])
def test_compile_verifies_on_the_gpu(mlp_path: Path, tmp_path: Path, fmt: str | None, bits: int):
    out_dir = tmp_path / "out"
    if fmt is None:
        text = 'target = "tvm-cuda"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 0.99999\n'
        recipe = parse(text, name="tvm-cuda-fp32")
    else:
        recipe = rtn_recipe("tvm-cuda", bits=bits, fmt=fmt)
    result = kiln.compile_model(
        mlp_path, out_dir, recipe, input_shapes={"x": [4, 64]}, target_options={"dims": {"batch": 2}}
    )
    assert result.verification.passed
    x = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)  # three compiled batches of 2
    got = targets.load(out_dir)({"x": x})["y"]
    np.testing.assert_allclose(got, _expected(out_dir, x), atol=1e-4)
