"""Attention-averaged Grams of value projections, and quantize.gptq pricing V weights with them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from kiln import testing
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError
from kiln.passes import PassContext, create
from kiln.passes.prune.structure import find_structure
from kiln.passes.quantize import grid, value_gram
from kiln.passes.quantize.gptq import CLIP_RATIOS, gptq
from kiln.passes.quantize.value_gram import value_grams
from tests.passes.prune.prunegraphs import run, set_weight, weight

HIDDEN, HEADS, KV_HEADS = 48, 6, 2
HEAD_DIM = HIDDEN // HEADS


def _llama(tmp_path: Path) -> ir.Model:
    path = testing.write_llama(tmp_path, layers=2, hidden=HIDDEN, intermediate=64, vocab=40, heads=HEADS, kv_heads=2)
    return ir.load(path)


def _feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 40, (2, 7), dtype=np.int64)} for _ in range(count)]


def _attention_outputs(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Per feed, each layer's attention output before O (the product of the probabilities and V), [B, H, T, d]."""
    copy = model.clone()
    products = []
    for sublayer in find_structure(copy).attentions():
        softmax = sublayer.attention.softmax.outputs[0]
        product = next(use.node for use in softmax.uses() if use.node.op_type == "MatMul").outputs[0]
        copy.graph.outputs.append(product)
        products.append(product)
    first = len(copy.graph.outputs) - len(products)
    return [run(copy, feed)[first:] for feed in feeds]


def test_a_value_weight_error_costs_its_kv_heads_gram_in_the_attention_output(tmp_path: Path) -> None:
    """Perturb KV head g's columns of layer 0's V weight by D: the attention outputs of g's query heads move by
    exactly tr(D^T H_g D) per averaged row, and no other head moves."""
    model = _llama(tmp_path)
    feeds = _feeds(3)
    grams, why = value_grams(model, CalibrationData(feeds))
    assert why is None and sorted(grams) == ["layers.0.v_proj", "layers.1.v_proj"]
    assert [g.shape for g in grams["layers.0.v_proj"]] == [(HIDDEN, HIDDEN)] * KV_HEADS
    before = _attention_outputs(model, feeds)
    rep = HEADS // KV_HEADS
    for g in range(KV_HEADS):
        perturbed = model.clone()
        d = np.random.default_rng(g).standard_normal((HIDDEN, HEAD_DIM)).astype(np.float32) * 0.1
        w = weight(perturbed, "layers.0.v_proj").copy()  # [K, N]: MatMul orientation
        w[:, g * HEAD_DIM : (g + 1) * HEAD_DIM] += d
        set_weight(perturbed, "layers.0.v_proj", w)
        after = _attention_outputs(perturbed, feeds)
        moved = sum(
            float(np.square(a[0] - b[0]).sum(axis=(0, 2, 3))[g * rep : (g + 1) * rep].sum())
            for a, b in zip(after, before)
        )
        others = sum(
            float(np.square(np.delete(a[0] - b[0], np.s_[g * rep : (g + 1) * rep], axis=1)).sum())
            for a, b in zip(after, before)
        )
        rows = sum(b[0].shape[0] * rep * b[0].shape[2] for b in before)
        predicted = float(np.einsum("kn,kn->", d, grams["layers.0.v_proj"][g] @ d)) * rows
        assert moved == pytest.approx(predicted, rel=1e-4)
        assert others == 0.0


def _weight_error(w: np.ndarray, grams: list[np.ndarray]) -> float:
    """Relative weight error of ``w`` quantized by kiln's GPTQ (3 bits, groups of 16), one column block per Gram."""
    spec = grid.GridSpec(3, 16, False)
    width = w.shape[1] // len(grams)
    blocks = [w[:, g * width : (g + 1) * width] for g in range(len(grams))]
    q = [grid.dequantize(gptq(b, h, spec, act_order=True, clip_ratios=CLIP_RATIOS)) for b, h in zip(blocks, grams)]
    return float(np.linalg.norm(w - np.concatenate(q, axis=1)) / np.linalg.norm(w))


def test_gptq_quantizes_each_kv_heads_columns_against_its_gram(tmp_path: Path) -> None:
    model = _llama(tmp_path)
    feeds = _feeds(2)
    grams, _ = value_grams(model, CalibrationData(feeds))
    w = weight(model, "layers.1.v_proj").copy()
    options = {"bits": 3, "group_size": 16, "format": "matmulnbits", "min_elements": 0}
    errors = {}
    for hessian in ("input", "attention"):
        quantize = create("quantize.gptq", options | {"value_hessian": hessian}, PassContext(CalibrationData(feeds)))
        quantize(_llama(tmp_path / hessian))
        errors[hessian] = quantize.details["layers"]["layers.1.v"]
        assert quantize.details["layers"]["layers.1.q"].get("hessian") is None
    assert errors["attention"]["hessian"] == "attention" and "hessian" not in errors["input"]
    expected = _weight_error(w, grams["layers.1.v_proj"])
    assert errors["attention"]["weight_rel_error"] == pytest.approx(expected, rel=1e-5)
    assert errors["input"]["weight_rel_error"] != pytest.approx(expected, rel=1e-3)


def test_a_model_without_attention_keeps_the_input_gram(tmp_path: Path) -> None:
    model = ir.load(testing.write_matmul_chain(tmp_path, layers=2, dim=32))
    feeds = [{"x": np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)}]
    quantize = create(
        "quantize.gptq",
        {"bits": 4, "group_size": 16, "value_hessian": "attention", "min_elements": 0},
        PassContext(CalibrationData(feeds)),
    )
    quantize(model)
    assert quantize.details["value_hessian"]["layers"] == 0
    assert quantize.details["value_hessian"]["skipped"].startswith("no transformer structure: ")
    assert all("hessian" not in layer for layer in quantize.details["layers"].values())


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        (
            "quantize.gptq",
            {"value_hessian": "output"},
            "option 'value_hessian' must be one of 'input', 'attention', got 'output'",
        ),
        ("quantize.awq", {"value_hessian": "attention"}, "quantize.awq prices every weight by its input's Gram"),
        ("quantize.mixed", {"value_hessian": "attention"}, "quantize.mixed prices every weight by its input's Gram"),
        ("lowrank.compensate", {"value_hessian": "attention"}, "value_hessian='attention' needs method='gptq'"),
    ],
)
def test_bad_value_hessian_options(name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(KilnError, match=re.escape(message)):
        create(name, options)


def test_head_grams_refuse_a_batch_of_the_wrong_layout_and_an_empty_sample() -> None:
    grams = value_gram._HeadGrams("layers.0.v", heads=6, kv_heads=2)
    with pytest.raises(KilnError, match=re.escape("value Gram of 'layers.0.v': no calibration rows reached it")):
        _ = grams.value
    with pytest.raises(
        KilnError,
        match=re.escape(
            "value Gram of 'layers.0.v': attention-averaged inputs have shape [2, 4, 7, 48], "
            "expected [batch, 6 heads, queries, channels]"
        ),
    ):
        grams.update(np.zeros((2, 4, 7, 48), np.float32))
