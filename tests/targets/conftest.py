"""Tiny models and recipes shared by the target tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln
from kiln import testing
from kiln.compiler.recipes import Recipe, parse


def rtn_recipe(target: str, *, bits: int = 4, fmt: str = "dq") -> Recipe:
    """Weight-only RTN in groups of 16 on every layer, for ``target``."""
    return parse(
        f"""
target = "{target}"

[[passes]]
name = "quantize.rtn"
options = {{ format = "{fmt}", bits = {bits}, group_size = 16, min_elements = 0 }}

[verify]
min_output_cosine = 0.95
""",
        name=f"rtn-{fmt}{bits}",
    )


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    """x [batch, 64] -> MatMul/Add/Relu -> MatMul/Add -> y [batch, 16]."""
    return kiln.save(testing.mlp([64, 32, 16]), tmp_path / "in" / "model.onnx")
