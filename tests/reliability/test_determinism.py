"""Same input, recipe and seed give byte-identical outputs: every built-in recipe, compiled twice.

``model.onnx``, ``model.onnx.data``, ``session.json`` and ``target.json`` must match byte for byte; ``report.json``
may differ only in timings, so it is compared with every timing field removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

import kiln
from kiln import testing
from kiln.compiler import recipes


def without_timings(value: Any) -> Any:
    """``value`` with every ``seconds`` / ``*_seconds`` / ``*_ms`` key dropped, at any depth."""
    if isinstance(value, dict):
        return {
            k: without_timings(v) for k, v in value.items() if not (k == "seconds" or k.endswith(("_seconds", "_ms")))
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def _cnn(rng: np.random.Generator) -> ir.Model:
    """x [N, 8, 6, 6] -> Conv 1x1 (32) -> Relu -> Conv 1x1 (8) -> y."""
    x = testing.value("x", ["n", 8, 6, 6])
    w1 = testing.initializer("w1", rng.standard_normal((32, 8, 1, 1)).astype(np.float32))
    w2 = testing.initializer("w2", rng.standard_normal((8, 32, 1, 1)).astype(np.float32))
    first = ir.node("Conv", [x, w1], name="c1")
    relu = ir.node("Relu", first.outputs, name="relu")
    last = ir.node("Conv", [relu.outputs[0], w2], name="c2")
    for node in (first, relu, last):
        node.outputs[0].name = node.name
    y = last.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 8, 6, 6])
    return testing.model([x], [y], [first, relu, last], [w1, w2], name="cnn")


@pytest.mark.parametrize("recipe", recipes.builtin_names())
def test_compiling_twice_gives_identical_bytes(tmp_path: Path, recipe: str):
    rng = np.random.default_rng(0)
    if recipe.startswith("prune-filters"):  # a conv chain
        source = kiln.save(_cnn(rng), tmp_path / "in" / "model.onnx")
        calibration = kiln.CalibrationData(
            [{"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(2)]
        )
    elif recipe.startswith("prune-"):  # structured pruning needs a transformer
        source = testing.write_llama(tmp_path / "in", layers=5, hidden=128, intermediate=256, vocab=64, heads=8)
        # 448 tokens: the least-squares stand-ins and refits want two per input (192 kept MLP channels here)
        calibration = kiln.CalibrationData([{"input_ids": rng.integers(0, 64, (2, 16))} for _ in range(14)])
    else:
        # K = 128 = every recipe's group size, so each weight is really quantized (or factored).
        source = kiln.save(testing.mlp([128, 64, 16], seed=3), tmp_path / "in" / "model.onnx")
        calibration = kiln.CalibrationData([{"x": rng.standard_normal((4, 128)).astype(np.float32)} for _ in range(2)])
    outputs = []
    for run in ("a", "b"):
        out_dir = tmp_path / run
        kiln.compile_model(source, out_dir, recipe, calibration=calibration, seed=1, accept_out_of_tolerance=True)
        outputs.append(out_dir)
    a, b = outputs
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"model.onnx", "model.onnx.data", "report.json"} <= set(names)
    for name in names:
        if name != "report.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{recipe}: {name} differs"
    report_a, report_b = (without_timings(json.loads((d / "report.json").read_text())) for d in outputs)
    assert report_a == report_b
