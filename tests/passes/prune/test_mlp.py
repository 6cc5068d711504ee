from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from prunegraphs import bert, llama, minilm_refit_cosines, row_cosines, run, set_weight, weight

import kiln
from kiln.compiler import registry
from kiln.compiler.calibration import CalibrationData
from kiln.errors import KilnError, RecipeError
from kiln.passes._base import PassContext
from kiln.passes.prune._stats import ChannelMoments
from kiln.passes.prune.mlp import MLPOptions, PruneMLP
from kiln.passes.prune.structure import find_structure


def _ids(seed: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, 40, (2, 7)).astype(np.int64)}


def _x(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 5, 32)).astype(np.float32)}


def _prune(model: ir.Model, feeds: list[dict[str, np.ndarray]], **options: object) -> PruneMLP:
    pass_ = PruneMLP(MLPOptions(**options), PassContext(calibration=CalibrationData(feeds)))
    kiln.Pipeline([pass_])(model)
    return pass_


def test_swiglu_channels_that_add_nothing_go_first(tmp_path: Path) -> None:
    model = llama(tmp_path, layers=2, intermediate=48)
    silent = [3, 10, 11, 20, 30, 31, 40, 47, 0, 5, 6, 7]  # 12 of 48 = 25%
    for layer in range(2):
        w = weight(model, f"layers.{layer}.down_proj").copy()
        w[silent] = 0
        set_weight(model, f"layers.{layer}.down_proj", w)
    expected = run(model, _ids(0))[0]
    original = {n: weight(model, f"layers.0.{n}_proj").copy() for n in ("gate", "up", "down")}
    pruned = _prune(model, [_ids(1), _ids(2)], ratio=0.25, multiple_of=4)
    assert pruned.details["widths"] == [36, 36]
    np.testing.assert_allclose(run(model, _ids(0))[0], expected, rtol=1e-5, atol=1e-5)
    keep = [j for j in range(48) if j not in silent]
    mlp = find_structure(model).blocks[0].mlp.mlp
    np.testing.assert_array_equal(weight(model, mlp.gate.weight.name), original["gate"][:, keep])
    np.testing.assert_array_equal(weight(model, mlp.up.weight.name), original["up"][:, keep])
    np.testing.assert_array_equal(weight(model, mlp.down.weight.name), original["down"][keep])
    assert mlp.down.bias is not None and not weight(model, mlp.down.bias.name).any()  # silent channels: mean 0
    assert pruned.details["parameters_before"] - pruned.details["parameters_after"] == 2 * 3 * 12 * 32 - 2 * 32


def test_ffn_with_biases_and_compensation() -> None:
    model = bert(layers=1, intermediate=64)
    feeds = [_x(1), _x(2)]
    moments = ChannelMoments()
    CalibrationData(feeds).collect(model, {"l0.gelu": [moments]})
    w2, b2 = weight(model, "l0.fc2.w").astype(np.float64), weight(model, "l0.fc2.b").astype(np.float64)
    b1 = weight(model, "l0.fc1.b").copy()
    pruned = _prune(model, feeds, ratio=0.5)
    mlp = find_structure(model).blocks[0].mlp.mlp
    assert mlp.up.shape == (32, 32) and mlp.down.shape == (32, 32) and pruned.details["widths"] == [32]
    scores = moments.mean_square * (w2 * w2).sum(axis=1)
    removed = np.sort(np.argsort(scores, kind="stable")[:32])
    kept = np.setdiff1d(np.arange(64), removed)
    np.testing.assert_array_equal(weight(model, mlp.up.bias.name), b1[kept])
    np.testing.assert_allclose(weight(model, mlp.down.bias.name), b2 + moments.mean[removed] @ w2[removed], rtol=1e-5)
    assert run(model, _x(0))[0].shape == (2, 5, 32)


def test_refit_moves_removed_channels_onto_the_kept_ones_they_copy() -> None:
    # Channels 48..63 compute exactly what channels 0..15 do, with small down rows so that they go first: the
    # least-squares refit hands their rows to their twins and the outputs stay; bias compensation cannot.
    feeds = [_x(i) for i in range(1, 13)]  # 120 tokens: at least twice the 48 kept channels
    outputs, details = {}, {}
    for refit in (False, True):
        model = bert(layers=1, intermediate=64)
        w1, b1, w2 = (weight(model, f"l0.{n}").copy() for n in ("fc1.w", "fc1.b", "fc2.w"))
        w1[:, 48:], b1[48:], w2[48:] = w1[:, :16], b1[:16], 0.05 * w2[48:]
        for name, array in (("fc1.w", w1), ("fc1.b", b1), ("fc2.w", w2)):
            set_weight(model, f"l0.{name}", array)
        expected = run(model, _x(0))[0]
        pruned = _prune(model, feeds, ratio=0.25, multiple_of=1, refit=refit)
        assert pruned.details["widths"] == [48]
        outputs[refit] = float(np.abs(run(model, _x(0))[0] - expected).max())
        details[refit] = pruned.details["layers"][0]
    mlp_weight = weight(model, find_structure(model).blocks[0].mlp.mlp.down.weight.name)
    np.testing.assert_allclose(mlp_weight[:16], w2[:16] + w2[48:], atol=1e-3)  # twins took the rows (damping aside)
    assert outputs[True] < 1e-3 and outputs[False] > 50 * outputs[True], outputs  # measured 2.5e-4 and 0.043
    assert details[True]["refit_error"] < 1e-6 < details[True]["bias_compensation_error"]


def test_refit_refuses_fewer_tokens_than_twice_the_kept_channels() -> None:
    message = (
        "prune.mlp: MLP 0 ('l0.fc2.mm'): a least-squares refit over 48 kept channels needs at least 96 calibration"
    )
    with pytest.raises(KilnError, match=re.escape(message) + ".* tokens, got 20; .*set refit = false"):
        _prune(bert(layers=1, intermediate=64), [_x(1), _x(2)], ratio=0.25, multiple_of=1, refit=True)


def test_global_allocation_respects_the_floor() -> None:
    model = bert(layers=3, intermediate=64)
    pruned = _prune(model, [_x(1)], ratio=0.6, allocation="global", min_ratio=0.25, multiple_of=1)
    widths = pruned.details["widths"]
    assert sum(widths) == 3 * 64 - round(0.6 * 3 * 64) and min(widths) >= 16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refit": True, "bias_compensation": False}, "refit re-solves the bias too: it needs bias_compensation"),
        ({"ratio": 1.0}, "ratio must be in [0, 1)"),
        ({"min_ratio": 0.0}, "min_ratio must be in (0, 1]"),
        ({"multiple_of": 0}, "multiple_of must be >= 1"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        MLPOptions(**options)
    with pytest.raises(RecipeError, match=re.escape(f"pass 'prune.mlp': {message}")):
        registry.create("prune.mlp", options)


@pytest.mark.zoo
def test_minilm_quarter_of_the_channels(minilm_path: Path) -> None:
    from kiln import zoo

    model = kiln.load(minilm_path)
    feed = zoo.get("minilm-l6").verification_feeds("full", limit=1)[0]
    expected = run(model, feed)[0]
    pass_ = PruneMLP(MLPOptions(ratio=0.25), PassContext(calibration=CalibrationData.from_zoo("minilm-l6", limit=2)))
    kiln.Pipeline([pass_])(model)
    assert pass_.details["widths"] == [1152] * 6
    got = run(model, feed)[0]
    cosine = row_cosines(got, expected)
    assert cosine.mean() > 0.85  # measured 0.92 on the whole verification set


@pytest.mark.zoo
def test_minilm_refit_of_the_down_projection_beats_bias_compensation(minilm_path: Path) -> None:
    cosines = minilm_refit_cosines(
        minilm_path,
        lambda refit, calibration: PruneMLP(MLPOptions(ratio=0.25, refit=refit), PassContext(calibration=calibration)),
    )
    assert cosines[True] > cosines[False] + 0.01, cosines  # measured on all 256 sentences: 0.949 and 0.924
