"""CalibrationData: feeds from files, validation before work, and streamed statistics equal to numpy's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from kiln import CalibrationData, testing
from kiln.compiler.calibration import ChannelAbsMax, ChannelMeanSquare, Gram, Histogram, MinMax
from kiln.errors import CalibrationError


def hidden(model, x: np.ndarray) -> np.ndarray:
    """h1 = relu(x @ w0 + b0), computed with numpy from the model's own weights."""
    w0 = model.graph.initializers["w0"].const_value.numpy()
    b0 = model.graph.initializers["b0"].const_value.numpy()
    return np.maximum(x @ w0 + b0, 0)


def test_statistics_match_numpy():
    model = testing.mlp([8, 16, 4])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]
    stats = {"h2": [MinMax(), ChannelAbsMax(), ChannelMeanSquare(), Gram()], "x": [MinMax()]}
    CalibrationData(feeds).collect(model, stats)
    h = np.concatenate([hidden(model, f["x"]) for f in feeds])
    mm, absmax, meansq, gram = stats["h2"]
    assert mm.min == pytest.approx(h.min(), abs=1e-5) and mm.max == pytest.approx(h.max(), rel=1e-5)
    np.testing.assert_allclose(absmax.value, np.abs(h).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(meansq.value, (h.astype(np.float64) ** 2).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(gram.value, h.T.astype(np.float64) @ h / h.shape[0], rtol=1e-4, atol=1e-6)
    assert gram.count == 15
    # The model is left as it was: no extra outputs.
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_only_what_the_statistics_need_runs_and_the_model_is_restored():
    """A node downstream of the collected tensor would fail at run time (Reshape of 5 x 4 values to 7 rows); the
    collection must not run it, and must leave the graph exactly as it was."""
    model = testing.mlp([8, 16, 4])
    y = model.graph.outputs[0]
    shape = ir.Value(name="bad_shape", const_value=ir.tensor(np.array([7, -1], dtype=np.int64)))
    model.graph.register_initializer(shape)
    reshape = ir.node("Reshape", [y, shape], name="bad_reshape")
    reshape.outputs[0].name = "z"
    model.graph.append(reshape)
    model.graph.outputs.append(reshape.outputs[0])
    before = [node.name for node in model.graph]
    feeds = [{"x": np.ones((5, 8), np.float32)}]
    stats = {"h2": [MinMax()]}
    CalibrationData(feeds).collect(model, stats)
    assert stats["h2"][0].max == pytest.approx(hidden(model, feeds[0]["x"]).max(), rel=1e-5)
    assert [node.name for node in model.graph] == before
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    with pytest.raises(Exception, match="bad_reshape"):  # the full graph does fail: the test is real
        CalibrationData(feeds).collect(model, {"z": [MinMax()]})


def test_histogram_counts_every_value():
    hist = Histogram(-1.0, 1.0, bins=4)
    hist.update(np.array([-2.0, -0.9, 0.1, 0.6, 0.9, 5.0]))
    assert hist.counts.tolist() == [2, 0, 1, 3]


def test_npz_batches(tmp_path: Path):
    np.savez(tmp_path / "c.npz", x=np.arange(10 * 8, dtype=np.float32).reshape(10, 8))
    data = CalibrationData.from_npz(tmp_path / "c.npz", batch_size=4)
    assert [f["x"].shape[0] for f in data] == [4, 4, 2]
    data.validate(testing.mlp([8, 16, 4]))
    assert len(list(CalibrationData.from_npz(tmp_path / "c.npz", batch_size=4, limit=2))) == 2


@pytest.mark.parametrize(
    ("feed", "fragment"),
    [
        ({"input": np.zeros((2, 8), np.float32)}, "'input' is not an input of the model"),
        ({}, "model input 'x' is missing"),
        ({"x": np.zeros((2, 8), np.float64)}, "dtype float64, the model expects float32"),
        ({"x": np.zeros((2, 2, 8), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 9), np.float32)}, "size 9 on axis 1, the model expects 8"),
    ],
)
def test_bad_feeds_are_rejected_before_work(feed, fragment):
    with pytest.raises(CalibrationError, match=fragment):
        CalibrationData([feed]).validate(testing.mlp([8, 16, 4]))


def test_empty_calibration_set():
    with pytest.raises(CalibrationError, match="is empty"):
        CalibrationData([]).validate(testing.mlp([8, 4]))


def test_unknown_tensor():
    with pytest.raises(CalibrationError, match="no tensor named 'nope'"):
        CalibrationData([{"x": np.zeros((1, 8), np.float32)}]).collect(testing.mlp([8, 4]), {"nope": [MinMax()]})


def test_bad_npz_files(tmp_path: Path):
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationData.from_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match=r"not a readable \.npz"):
        CalibrationData.from_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "ragged.npz", a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    with pytest.raises(CalibrationError, match="disagree on the number of samples"):
        CalibrationData.from_npz(tmp_path / "ragged.npz")


def test_text_windows():
    data = CalibrationData.from_text("a b c d e f g", lambda t: [ord(c) for c in t.split()], seq_len=3)
    windows = [f["input_ids"] for f in data]
    assert [w.tolist() for w in windows] == [[[97, 98, 99]], [[100, 101, 102]]]
    assert windows[0].dtype == np.int64
    with pytest.raises(CalibrationError, match="fewer than one window"):
        CalibrationData.from_text("a b", lambda t: [1, 2], seq_len=3)


def test_recipe_draws_its_own_number_of_zoo_feeds(minilm_path: Path, tmp_path: Path):
    """``[calibration] samples`` sets how much of the zoo's calibration set a compile uses; asking for more than
    is stored (MiniLM has 32 batches) takes all of it instead of failing."""
    from kiln import compile_model
    from kiln.compiler import recipes

    for samples, feeds in ((2, 2), (1000, 32)):
        recipe = recipes.parse(
            '[[passes]]\nname = "quantize.static-int8"\noptions = { check_fusion = false }\n'
            f"[calibration]\nsamples = {samples}\n",
            name=f"static-{samples}",
        )
        assert recipe.calibration_samples == samples
        result = compile_model(minilm_path, tmp_path / str(samples), recipe, verify_limit=1)
        assert result.report["calibration"] == {"data": "zoo:minilm-l6", "limit": samples}
        used = CalibrationData.from_zoo("minilm-l6", limit=samples, at_most=True)
        assert sum(1 for _ in used) == feeds
