"""Verification and the task metrics: exact values on hand-made data, and failures named clearly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln import testing
from kiln.compiler.metrics import EmbeddingCosine, Perplexity, Top1Agreement, token_nll
from kiln.compiler.verify import Tolerance, random_feeds, verify
from kiln.errors import VerificationError


def test_token_nll_matches_hand_computation():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = np.array([[0, 1, 2]])
    nll, count = token_nll(logits, ids)
    # position 0 predicts token 1 (p=0.25), position 1 predicts token 2 (p=0.1)
    assert count == 2
    assert nll == pytest.approx(-math.log(0.25) - math.log(0.1))
    assert token_nll(logits, ids, context=1) == (pytest.approx(-math.log(0.1)), 1)


def test_perplexity_metric():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=(1, 6))
    uniform = np.zeros((1, 6, 5))
    metric = Perplexity()
    metric.update({"input_ids": ids}, {"logits": uniform}, {"logits": uniform + 0.0})
    result = metric.result()
    assert result.reference == pytest.approx(5.0) and result.candidate == pytest.approx(5.0)
    assert result.relative_loss == pytest.approx(0.0)


def test_agreement_and_cosine():
    agree = Top1Agreement()
    agree.update({}, {"logits": np.array([[1, 2], [3, 1], [0, 5]])}, {"logits": np.array([[1, 3], [1, 3], [0, 9]])})
    assert agree.result().candidate == pytest.approx(2 / 3)
    cos = EmbeddingCosine("e")
    cos.update({}, {"e": np.array([[1.0, 0.0], [1.0, 1.0]])}, {"e": np.array([[0.0, 1.0], [2.0, 2.0]])})
    assert cos.result().candidate == pytest.approx(0.5)
    assert cos.result().relative_loss == pytest.approx(0.5)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The same MLP, an exact copy, and a copy with one weight perturbed by 50%."""
    model = testing.mlp([16, 32, 8])
    ref = kiln.save(model, tmp_path / "ref" / "m.onnx")
    same = kiln.save(model, tmp_path / "same" / "m.onnx")
    w = model.graph.initializers["w1"]
    w.const_value = __import__("onnx_ir").tensor(w.const_value.numpy() * 1.5, name="w1")
    off = kiln.save(model, tmp_path / "off" / "m.onnx")
    return ref, same, off


def test_identical_models_pass(pair):
    ref, same, _ = pair
    report = verify(ref, same, random_feeds(kiln.load(ref), count=3, shapes={"x": [4, 16]}))
    assert report.passed and report.feeds == 3
    assert report.outputs["y"]["max_abs_diff"] == 0.0
    assert report.outputs["y"]["cosine"] == pytest.approx(1.0)


def test_damaged_model_fails_with_the_numbers(pair):
    ref, _, off = pair
    feeds = random_feeds(kiln.load(ref), count=3)
    report = verify(ref, off, feeds, metric=Top1Agreement("y"), tolerance=Tolerance(min_output_cosine=0.99999))
    assert not report.passed
    assert report.outputs["y"]["max_abs_diff"] > 0.01
    assert any("output 'y' cosine" in f for f in report.failures)


def test_random_feeds_follow_the_model_inputs():
    feeds = random_feeds(testing.mlp([16, 4]), count=2, shapes={"x": [3, 16]})
    assert [f["x"].shape for f in feeds] == [(3, 16), (3, 16)]
    assert feeds[0]["x"].dtype == np.float32
    assert random_feeds(testing.mlp([16, 4]), count=1)[0]["x"].shape == (1, 16)


def _two_output_model(path: Path, *, with_cache: bool, scale: float = 1.0) -> Path:
    """``y = x * scale`` and, with the cache, ``present = Concat(past, x)``: a decode step's two kinds of output."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Mul", ["x", "s"], ["y"])]
    inputs, outputs = [x], [y]
    if with_cache:
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [None, 4]))
        outputs.append(helper.make_tensor_value_info("present", TensorProto.FLOAT, [None, 4]))
        nodes.append(helper.make_node("Concat", ["past", "x"], ["present"], axis=0))
    scale_init = helper.make_tensor("s", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph(nodes, "g", inputs, outputs, [scale_init])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_outputs_removed_on_purpose_are_not_compared_the_rest_are(tmp_path: Path):
    ref = _two_output_model(tmp_path / "ref.onnx", with_cache=True)
    pruned = _two_output_model(tmp_path / "pruned.onnx", with_cache=False)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 4), dtype=np.float32), "past": np.ones((2, 4), np.float32)}]
    with pytest.raises(VerificationError, match=r"lost outputs: \['present'\]"):
        verify(ref, pruned, feeds)
    report = verify(ref, pruned, feeds, removed_outputs=["present"])
    assert report.passed and list(report.outputs) == ["y"] and report.removed_outputs == ["present"]
    assert report.outputs["y"]["max_abs_diff"] == 0.0
    # The outputs that remain are still judged: a wrong y fails.
    wrong = _two_output_model(tmp_path / "wrong.onnx", with_cache=False, scale=-1.0)
    failed = verify(ref, wrong, feeds, removed_outputs=["present"])
    assert not failed.passed and "output 'y' cosine -1.00000" in failed.failures[0]
