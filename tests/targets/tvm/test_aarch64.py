"""tvm-aarch64: an aarch64 ELF library, verified through its host twin; tuning without a board is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln import targets
from kiln.errors import KilnError
from kiln.targets.ort.runner import OrtRunner
from kiln.targets.tvm.aarch64 import CROSS_CC, EM_AARCH64, elf_machine
from tests.targets.conftest import rtn_recipe

pytestmark = pytest.mark.skipif(shutil.which(CROSS_CC) is None, reason=f"needs {CROSS_CC}")


def test_cross_compiled_library_is_aarch64_and_verified(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    result = kiln.compile_model(
        mlp_path, out_dir, rtn_recipe("tvm-aarch64", bits=4, fmt="matmulnbits"), target_options={"dims": {"batch": 1}}
    )
    assert result.verification.passed
    assert elf_machine(out_dir / "model.so") == EM_AARCH64
    assert elf_machine(out_dir / "model.host.so") == 62  # x86-64
    assert '"mtriple":"aarch64-linux-gnu"' in json.loads((out_dir / "tvm.json").read_text())["target"]
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    got = targets.load(out_dir)({"x": x})["y"]
    assert np.abs(got - OrtRunner.from_path(out_dir / "model.onnx")({"x": x})["y"]).max() < 1e-3


def test_tuning_without_a_board_is_refused(mlp_path: Path, tmp_path: Path):
    with pytest.raises(KilnError, match="tuning tvm-aarch64 measures on aarch64 hardware"):
        kiln.compile_model(
            mlp_path, tmp_path / "out", rtn_recipe("tvm-aarch64"), target_options={"dims": {"batch": 1}, "trials": 8}
        )
