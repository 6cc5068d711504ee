"""kiln's GEMV kernels: exact against numpy, and the matmuls of a compiled model routed to them by row count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import kiln
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.recipes import parse
from kiln.errors import KilnError
from kiln.runtime_ops import shiftadd, shiftadd_ort
from kiln.targets.ort import SessionSettings
from kiln.targets.ort.runner import OrtRunner
from kiln.targets.tvm import gemv, relax_build, runner, shiftadd_lut
from tests.targets.conftest import rtn_recipe


def _run(func, arrays: list[np.ndarray], out_shape: tuple[int, int]) -> np.ndarray:
    import tvm

    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    library = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))]
    library["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize(
    ("rows", "k", "n", "bits", "block"),
    [(1, 576, 192, 4, 128), (2, 100, 70, 2, 32), (1, 64, 200, 8, 16), (3, 96, 64, 4, 64)],
)
def test_nbits_kernel_equals_the_dequantized_product(rows: int, k: int, n: int, bits: int, block: int):
    """Ragged K (576 in groups of 128, 100 in 32), N off the tile (70, 200), several rows, 2/4/8 bits."""
    rng = np.random.default_rng(0)
    groups = -(-k // block)
    weight = gemv.PackedWeight(
        codes=rng.integers(0, 1 << bits, (groups * block, n)).astype(np.uint8),
        scales=rng.random((groups, n)).astype(np.float32),
        zero_points=rng.integers(0, 1 << bits, (groups, n)).astype(np.float32),
        bits=bits,
        block=block,
        k=k,
    )
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = _run(
        gemv.nbits_gemv(rows, k, gemv.padded(n), bits, block), [x, *weight.kernel_inputs()], (rows, gemv.padded(n))
    )
    expected = x @ weight.dequantize()
    assert np.abs(y[:, :n] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert not y[:, n:].any()  # padded columns have zero scales
    assert weight.nbytes == groups * block * n * bits // 8 + 2 * 4 * groups * n


def test_float_kernel_equals_the_product():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 96)).astype(np.float32), rng.standard_normal((96, 100)).astype(np.float32)
    y = _run(gemv.float_gemv(2, 96, gemv.padded(100)), [x, gemv.tile_major(w)], (2, 128))
    np.testing.assert_allclose(y[:, :100], x @ w, rtol=1e-5, atol=1e-5)


def _exact_ort(out_dir: Path, x: np.ndarray) -> np.ndarray:
    # without graph optimizations, as the ORT reference of the other TVM tests
    settings = SessionSettings(graph_optimization_level="ORT_DISABLE_ALL")
    return OrtRunner.from_path(out_dir / "model.onnx", settings=settings)({"x": x})["y"]


@pytest.mark.parametrize(("batch", "packed"), [(1, 2), (2 * gemv.MAX_ROWS, 0)])
def test_matmulnbits_runs_packed_up_to_max_rows(mlp_path: Path, tmp_path: Path, batch: int, packed: int):
    """One row: both MatMulNBits weights stay packed in the library; more than MAX_ROWS: float weights. Same numbers
    as ONNX Runtime either way."""
    out_dir = tmp_path / "out"
    options = {"dims": {"batch": batch}}
    recipe = rtn_recipe("tvm-llvm", fmt="matmulnbits")
    result = kiln.compile_model(mlp_path, out_dir, recipe, input_shapes={"x": [batch, 64]}, target_options=options)
    assert result.report["target"]["gemv_kernels"] == {"packed": packed, "shiftadd": 0, "shiftadd_lut": 0, "float": 0}
    x = np.random.default_rng(2).standard_normal((batch, 64)).astype(np.float32)
    assert np.abs(runner.TvmRunner.from_dir(out_dir)({"x": x})["y"] - _exact_ort(out_dir, x)).max() < 1e-4


def test_float_matmuls_of_one_row_use_the_float_kernel(mlp_path: Path, tmp_path: Path):
    recipe = parse('target = "tvm-llvm"\n[[passes]]\nname = "cleanup.optimize"\n', name="fp32")
    out_dir = tmp_path / "out"
    result = kiln.compile_model(mlp_path, out_dir, recipe, target_options={"dims": {"batch": 1}})
    assert result.report["target"]["gemv_kernels"] == {"packed": 0, "shiftadd": 0, "shiftadd_lut": 0, "float": 2}
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    assert np.abs(runner.TvmRunner.from_dir(out_dir)({"x": x})["y"] - _exact_ort(out_dir, x)).max() < 1e-4


@pytest.mark.parametrize(
    ("rows", "k", "n", "bits", "group", "mantissa_bits"),
    [(1, 576, 192, 3, 128, 0), (2, 100, 70, 2, 32, 0), (1, 64, 64, 4, 64, 0), (1, 576, 192, 3, 128, 3)],
)
def test_shiftadd_kernel_equals_the_reference(rows: int, k: int, n: int, bits: int, group: int, mantissa_bits: int):
    """The op's numpy reference (kiln.runtime_ops.shiftadd), ragged K and scales with mantissas included."""
    rng = np.random.default_rng(4)
    groups = shiftadd.n_groups(k, group)
    codes = rng.integers(-9 << mantissa_bits, 3 << mantissa_bits, (n, bits, groups))
    packed = shiftadd.pack(rng.random((n, bits, k)) > 0.5, codes, group, mantissa_bits)
    weight = gemv.SignPlanes(packed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    kernel = gemv.shiftadd_gemv(rows, k, gemv.padded(n), bits, group)
    y = _run(kernel, [x, *weight.kernel_inputs()], (rows, gemv.padded(n)))
    expected = shiftadd.reference(x, packed)
    assert np.abs(y[:, :n] - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_array_equal(weight.dequantize(), shiftadd.dequantize(packed).astype(np.float32))


def _compile_shiftadd(mlp_path: Path, out_dir: Path, group: int, kernel: str) -> dict:
    recipe = parse(
        'target = "tvm-llvm"\n[[passes]]\nname = "shiftadd.bcq"\n'
        f"options = {{ bits = 3, group_size = {group}, min_elements = 0, compensate = false }}\n"
        "[verify]\nmin_output_cosine = 0.5\n",
        name="shiftadd",
    )
    rng = np.random.default_rng(5)
    calibration = CalibrationData([{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(2)])
    options = {"dims": {"batch": 1}, "shiftadd_kernel": kernel}
    result = kiln.compile_model(mlp_path, out_dir, recipe, calibration=calibration, target_options=options)
    assert result.report["target"]["lowered"] == {"ShiftAddMatMul": 2}
    return result.report["target"]["gemv_kernels"]


@pytest.mark.parametrize(("group", "kernels"), [(32, 2), (16, 0)])
def test_shiftadd_matmuls_run_on_the_sign_kernel(mlp_path: Path, tmp_path: Path, group: int, kernels: int):
    """ShiftAddMatMul nodes become the kernel (groups of whole 32-row words) or float weights (groups of 16), with
    the numbers of the op's function form in ONNX Runtime."""
    out_dir = tmp_path / "out"
    counts = _compile_shiftadd(mlp_path, out_dir, group, "sign")
    assert counts == {"packed": 0, "shiftadd": kernels, "shiftadd_lut": 0, "float": 0}
    assert json.loads((out_dir / runner.METADATA).read_text())["runtime_functions"] == []
    x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
    assert np.abs(runner.TvmRunner.from_dir(out_dir)({"x": x})["y"] - _exact_ort(out_dir, x)).max() < 1e-4


@pytest.mark.skipif(not shiftadd_lut.available(), reason="the table-lookup kernel needs x86-64 with AVX2")
@pytest.mark.parametrize("group", [32, 16])
def test_shiftadd_matmuls_call_the_lut_kernel(mlp_path: Path, tmp_path: Path, group: int):
    """By default both ShiftAddMatMul nodes call kiln's C kernel (groups of 8 rows suffice), with the numbers ONNX
    Runtime gives when its PyOp runs the same kernel; the library lists the function it needs registered."""
    out_dir = tmp_path / "out"
    counts = _compile_shiftadd(mlp_path, out_dir, group, "lut")
    assert counts == {"packed": 0, "shiftadd": 0, "shiftadd_lut": 2, "float": 0}
    assert json.loads((out_dir / runner.METADATA).read_text())["runtime_functions"] == [shiftadd_lut.FUNCTION]
    x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
    model = kiln.load(out_dir / "model.onnx")
    assert shiftadd_ort.use_kernel(model) == 2
    options = shiftadd_ort.session_options(threads=1, activations="int8")
    pyop = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = runner.TvmRunner.from_dir(out_dir)({"x": x})["y"]
    np.testing.assert_allclose(y, pyop.run(["y"], {"x": x})[0], rtol=1e-5, atol=1e-5)
    exact = _exact_ort(out_dir, x)  # the op's float reference, within the 8-bit activations' rounding
    assert 0 < np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


def test_a_library_calling_an_unknown_function_is_refused(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    _compile_shiftadd(mlp_path, out_dir, 32, "lut")
    metadata = json.loads((out_dir / runner.METADATA).read_text())
    metadata["runtime_functions"] = ["other.kernel"]
    with pytest.raises(KilnError, match=re.escape("calls 'other.kernel', which this kiln does not provide")):
        runner.TvmRunner(out_dir / runner.LIBRARY, metadata)


def test_without_avx2_the_sign_kernel_runs_and_the_lut_is_refused(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A CPU without the table-lookup kernel compiles shift-add onto TVM's sign kernel, and a library that needs the
    kernel cannot be loaded there."""
    monkeypatch.setattr(shiftadd_lut, "available", lambda: False)
    counts = _compile_shiftadd(mlp_path, tmp_path / "out", 32, "lut")
    assert counts == {"packed": 0, "shiftadd": 2, "shiftadd_lut": 0, "float": 0}
    with pytest.raises(KilnError, match=re.escape("kiln.shiftadd_lut needs an x86-64 CPU with AVX2 and a C compiler")):
        shiftadd_lut.register.__wrapped__()
