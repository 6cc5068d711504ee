"""Passes from different families in one recipe: prune, then factor, then quantize, each seeing the last's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import kiln
from kiln import testing
from kiln.compiler.calibration import CalibrationData

RECIPE = """
description = "prune heads, factor, quantize"

[[passes]]
name = "prune.heads"
options = { ratio = 0.125 }

[[passes]]
name = "lowrank.asvd"
options = { keep = 0.9, rank_step = 8, sequential = true }

[[passes]]
name = "quantize.gptq"
options = { bits = 8, group_size = 16, min_elements = 0, sequential = true }

[verify]
# Random weights have no redundancy: alone, pruning 1 of 8 heads gives cosine 0.887, the factoring 0.963.
min_output_cosine = 0.8
"""


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids})[0]


def test_prune_factor_and_quantize_in_one_recipe(tmp_path: Path) -> None:
    source = testing.write_llama(tmp_path / "in", layers=2, hidden=64, intermediate=128, vocab=50, heads=8)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    rng = np.random.default_rng(0)
    calibration = CalibrationData([{"input_ids": rng.integers(0, 50, (2, 16))} for _ in range(8)])
    result = kiln.compile_model(source, tmp_path / "out", recipe, calibration=calibration)
    passes = {record["name"]: record for record in result.report["passes"]}
    assert list(passes) == ["prune.heads", "lowrank.asvd", "quantize.gptq"]

    # Each pass's effect is in the report and in the saved graph: one head of eight gone from every layer, the
    # projections' parameters cut to 80%, and every remaining matmul (factors included) quantized to 8 bits.
    heads = passes["prune.heads"]["details"]
    lowrank = passes["lowrank.asvd"]["details"]
    quantized = passes["quantize.gptq"]["details"]["layers"]
    assert [layer["heads_kept"] for layer in heads["layers"]] == [7, 7]
    assert lowrank["params_after"] <= 0.9 * lowrank["params_before"] < lowrank["params_before"]
    factored = [label for label, layer in lowrank["layers"].items() if layer["rank"] < min(layer["K"], layer["N"])]
    assert factored
    saved = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    ops = [node.op_type for node in saved.graph.node]
    assert ops.count("MatMulNBits") == len(quantized) == 2 * 7 + len(factored) + 1  # the factors and the LM head too
    assert ops.count("MatMul") == 2 * 2  # only attention's two activation products per layer stay float
    assert {layer["bits"] for layer in quantized.values()} == {8}

    ids = rng.integers(0, 50, (1, 12))
    expected, got = _logits(source, ids), _logits(tmp_path / "out" / "model.onnx", ids)
    cosine = float(np.dot(expected.ravel(), got.ravel()) / np.linalg.norm(expected) / np.linalg.norm(got))
    assert 0.8 < cosine < 0.99  # near the original (measured 0.928), and visibly changed
