"""quantize.static-int8 on tiny graphs: exact grids, calibrated ranges against numpy, ONNX Runtime fusion."""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort
import pytest

from kiln import testing
from kiln.compiler import recipes
from kiln.compiler.calibration import CalibrationData
from kiln.errors import CalibrationError, RecipeError
from kiln.passes import create
from kiln.passes._base import PassContext
from kiln.passes.quantize import int8, output_correction, ranges
from kiln.passes.quantize.static_int8 import StaticInt8, StaticInt8Options

RNG = np.random.default_rng(0)
FLOAT = ir.DataType.FLOAT


def _typed(value: ir.Value, name: str, shape: list[int | str]) -> ir.Value:
    value.name, value.type, value.shape = name, ir.TensorType(FLOAT), ir.Shape(shape)
    return value


def _linear(k: int = 24, n: int = 10, *, bias: bool = False) -> ir.Model:
    """y = x @ W (+ b) with x [batch, seq, K]."""
    w = testing.initializer("W", RNG.standard_normal((k, n)).astype(np.float32))
    x = testing.value("x", ["b", 4, k])
    mm = ir.node("MatMul", [x, w], name="mm")
    nodes, inits = [mm], [w]
    if bias:
        b = testing.initializer("B", RNG.standard_normal(n).astype(np.float32))
        _typed(mm.outputs[0], "h", ["b", 4, n])
        nodes.append(ir.node("Add", [mm.outputs[0], b], name="add"))
        inits.append(b)
    y = _typed(nodes[-1].outputs[0], "y", ["b", 4, n])
    return testing.model([x], [y], nodes, inits)


def _cnn(rng: np.random.Generator = RNG) -> ir.Model:
    """Conv-Relu, Conv-Clip(0, 6), depthwise Conv, GlobalAveragePool, Flatten, Gemm(transB=1)."""
    c = 8
    inits = [
        testing.initializer("w0", (0.3 * rng.standard_normal((c, 3, 3, 3))).astype(np.float32)),
        testing.initializer("b0", (0.1 * rng.standard_normal(c)).astype(np.float32)),
        testing.initializer("w1", (0.3 * rng.standard_normal((c, c, 3, 3))).astype(np.float32)),
        testing.initializer("b1", (0.1 * rng.standard_normal(c)).astype(np.float32)),
        testing.initializer("w2", (0.3 * rng.standard_normal((c, 1, 3, 3))).astype(np.float32)),
        testing.initializer("fc_w", rng.standard_normal((10, c)).astype(np.float32)),
        testing.initializer("fc_b", rng.standard_normal(10).astype(np.float32)),
        testing.initializer("lo", np.array(0.0, np.float32)),
        testing.initializer("hi", np.array(6.0, np.float32)),
    ]
    v = {i.name: i for i in inits}
    x = testing.value("x", ["n", 3, 8, 8])
    pads = {"pads": [1, 1, 1, 1]}
    conv0 = ir.node("Conv", [x, v["w0"], v["b0"]], attributes=pads, name="conv0")
    relu = ir.node("Relu", [conv0.outputs[0]], name="relu")
    conv1 = ir.node("Conv", [relu.outputs[0], v["w1"], v["b1"]], attributes=pads, name="conv1")
    clip = ir.node("Clip", [conv1.outputs[0], v["lo"], v["hi"]], name="clip")
    conv2 = ir.node("Conv", [clip.outputs[0], v["w2"]], attributes={**pads, "group": c}, name="dwconv")
    gap = ir.node("GlobalAveragePool", [conv2.outputs[0]], name="gap")
    flat = ir.node("Flatten", [gap.outputs[0]], name="flatten")
    fc = ir.node("Gemm", [flat.outputs[0], v["fc_w"], v["fc_b"]], attributes={"transB": 1}, name="fc")
    nodes = [conv0, relu, conv1, clip, conv2, gap, flat, fc]
    for i, node in enumerate(nodes[:-1]):
        node.outputs[0].name = f"t{i}"
    y = _typed(fc.outputs[0], "y", ["n", 10])
    model = testing.model([x], [y], nodes, inits)
    common.ShapeInferencePass()(model)
    return model


def _quantize(model: ir.Model, feeds: list[dict[str, np.ndarray]], **options: object) -> StaticInt8:
    pass_ = StaticInt8(StaticInt8Options(**options), PassContext(calibration=CalibrationData(feeds)))
    pass_(model)
    return pass_


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _known_range_feeds(k: int, low: float, high: float) -> list[dict[str, np.ndarray]]:
    feeds = [{"x": RNG.uniform(low, high, (2, 4, k)).astype(np.float32)} for _ in range(3)]
    feeds[0]["x"][0, 0, 0], feeds[2]["x"][1, 3, 5] = low, high
    return feeds


@pytest.mark.parametrize(
    ("activation_type", "scale", "zero_point", "dtype"),
    [("uint8", 4.0 / 255, 64, np.uint8), ("int8", 3.0 / 127, 0, np.int8)],
)
def test_grid_of_a_known_range_and_exact_output(
    activation_type: str, scale: float, zero_point: int, dtype: type
) -> None:
    model = _linear()
    w = _initializer(model, "W").copy()
    feeds = _known_range_feeds(24, -1.0, 3.0)
    sq = _quantize(model, feeds, activation_type=activation_type)

    assert _initializer(model, "x_scale") == np.float32(scale)
    assert _initializer(model, "x_zero_point").dtype == dtype
    assert int(_initializer(model, "x_zero_point")) == zero_point
    assert sq.details["activations"]["x"] == {
        "range": [-1.0, 3.0],
        "scale": float(np.float32(scale)),
        "zero_point": zero_point,
    }
    w_scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(_initializer(model, "W_scale"), w_scale, rtol=1e-6)
    codes = _initializer(model, "W_quantized")
    assert codes.dtype == np.uint8 and (_initializer(model, "W_zero_point") == 128).all()
    np.testing.assert_array_equal(codes.astype(np.int32) - 128, np.rint(w / w_scale))
    assert "W" not in model.graph.initializers

    x = feeds[1]["x"]
    s = np.float32(scale)
    lo, hi = (0, 255) if dtype is np.uint8 else (-128, 127)
    x_restored = (np.clip(np.rint(x / s) + zero_point, lo, hi) - zero_point) * s
    w_restored = (codes.astype(np.float32) - 128) * _initializer(model, "W_scale")
    (y,) = _session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, x_restored @ w_restored, rtol=0, atol=1e-5 * np.abs(y).max())
    assert sq.details["layers"]["mm"]["fused"] is True
    assert sq.details["ort_fusion"]["integer_ops"] == {"MatMulIntegerToFloat": 1}


def _reference_entropy(counts: np.ndarray, edges: np.ndarray, levels: int = 128) -> float:
    """TensorRT's KL calibration, written out loop by loop as in its description."""
    best, best_kl = len(counts), np.inf
    for i in range(levels, len(counts) + 1):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(counts[i:].sum())
        merged = i // levels
        q = [0.0] * i
        for g in range(levels):
            start = g * merged
            stop = i if g == levels - 1 else start + merged
            chunk = counts[start:stop]
            nonzero = [j for j in range(start, stop) if counts[j] != 0]
            for j in nonzero:
                q[j] = float(chunk.sum()) / len(nonzero)
        p_arr = np.array(p) / sum(p)
        q_arr = np.array(q) / sum(q)
        p_arr = (1 - 1e-4) * p_arr + 1e-4 / i
        q_arr = (1 - 1e-4) * q_arr + 1e-4 / i
        kl = float(np.sum(p_arr * np.log(p_arr / q_arr)))
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])


def test_percentile_and_entropy_on_a_known_histogram() -> None:
    counts = np.zeros(400, dtype=np.int64)
    counts[:100] = 10  # 1000 values spread over the first quarter
    counts[200] = 3  # an outlier cluster
    counts[399] = 1  # one extreme value
    edges = np.linspace(0.0, 4.0, 401)
    # 99.9% of 1004 values is 1002.996: the cumulative count reaches it at the outlier cluster (bin 200).
    assert ranges.percentile_magnitude(counts, edges, 99.9) == pytest.approx(edges[201])
    assert ranges.percentile_magnitude(counts, edges, 99.0) == pytest.approx(edges[100])
    # Two-sided, 99.9%: the 0.05% (0.502 values) cut on each side stays inside bin 0 and the extreme bin; 99%: the
    # 0.5% (5.02 values) cut above removes the extreme value and the outlier cluster.
    assert ranges.percentile_range(counts, edges, 99.9) == pytest.approx((edges[0], edges[400]))
    assert ranges.percentile_range(counts, edges, 99.0) == pytest.approx((edges[0], edges[100]))
    assert ranges.entropy_threshold(counts, edges) == pytest.approx(_reference_entropy(counts, edges))

    laplace = np.abs(RNG.laplace(0.0, 1.0, 200_000))
    counts, edges = np.histogram(laplace, bins=512, range=(0.0, laplace.max()))
    threshold = ranges.entropy_threshold(counts, edges)
    assert threshold == pytest.approx(_reference_entropy(counts, edges))
    assert 0.2 * laplace.max() < threshold < laplace.max()  # clips the long tail, keeps the bulk


def test_entropy_ignores_the_zeros_of_a_relu() -> None:
    # 70% exact zeros, the rest half-normal: with the zeros in the histogram, KL picks the first candidates.
    model = _linear()
    values = np.abs(RNG.standard_normal((4, 2, 4, 24))).astype(np.float32)
    values[RNG.random(values.shape) < 0.7] = 0.0
    sq = _quantize(model, [{"x": v} for v in values], method="entropy", bins=512, check_fusion=False)
    nonzero = values[values != 0].astype(np.float64)
    counts, edges = np.histogram(nonzero, bins=512, range=(0.0, float(values.max())))
    low, high = sq.details["activations"]["x"]["range"]
    assert low == 0.0 and high == pytest.approx(_reference_entropy(counts, edges), rel=1e-6)
    assert high > 0.5 * values.max()


def _reference_mse(counts: np.ndarray, edges: np.ndarray, levels: int, symmetric: bool) -> tuple[float, float]:
    """Every (lo, hi) pair of edges around 0 (symmetric: every t), each error summed bin by bin."""
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_error = None, np.inf
    lows = [0] if symmetric else [i for i in range(len(edges)) if edges[i] <= 0 or i == 0]
    for i in lows:
        for j in range(i + 1, len(edges)):
            lo, hi = (-edges[j], edges[j]) if symmetric else (edges[i], edges[j])
            if not symmetric and hi < 0:
                continue
            step = hi / levels if symmetric else (max(hi, 0.0) - min(lo, 0.0)) / levels
            clipped = np.clip(centres, lo, hi)
            inside = (
                (centres >= lo) & (centres <= hi)
                if symmetric
                else (np.arange(len(centres)) >= i) & (np.arange(len(centres)) < j)
            )
            error = np.sum(counts * np.where(inside, step * step / 12, (centres - clipped) ** 2))
            if error < best_error:
                best, best_error = (lo, hi), error
    return best


def test_mse_range_is_the_least_squared_error_range() -> None:
    x = RNG.laplace(0.5, 1.0, 50_000)
    counts, edges = np.histogram(x, bins=96, range=(x.min(), x.max()))
    assert ranges.mse_range(counts, edges) == pytest.approx(_reference_mse(counts, edges, 255, False))
    magnitudes = np.abs(x)
    counts, edges = np.histogram(magnitudes, bins=96, range=(0.0, magnitudes.max()))
    t = ranges.mse_magnitude(counts, edges)
    assert (-t, t) == pytest.approx(_reference_mse(counts, edges, 127, True))

    # 2048 bins (a coarse search, then refined): the grid it gives quantizes the samples with less error than
    # min-max's
    counts, edges = np.histogram(x, bins=2048, range=(x.min(), x.max()))
    lo, hi = ranges.mse_range(counts, edges)
    assert x.min() < lo < 0 < hi < x.max()

    def sample_error(low: float, high: float) -> float:
        grid = int8.activation_grid(low, high, "uint8")
        codes = np.clip(np.rint(x / grid.scale) + grid.zero_point, 0, 255)
        return float(np.mean((x - (codes - grid.zero_point) * grid.scale) ** 2))

    assert sample_error(lo, hi) < 0.95 * sample_error(x.min(), x.max())
    # a heavy far cluster that clipping would ruin is kept whole, where the 99.8 percentile drops it
    far = np.concatenate([RNG.normal(0.0, 1.0, 20_000), RNG.normal(40.0, 0.1, 15)])
    counts, edges = np.histogram(far, bins=2048, range=(far.min(), far.max()))
    assert ranges.mse_range(counts, edges)[1] > 39.0
    assert ranges.percentile_range(counts, edges, 99.8)[1] < 5.0


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_calibrated_ranges_match_numpy(method: str, activation_type: str) -> None:
    model = _linear()
    feeds = [{"x": RNG.laplace(0.3, 1.0, (2, 4, 24)).astype(np.float32)} for _ in range(4)]
    options = {"method": method, "percentile": 99.0, "bins": 512, "activation_type": activation_type}
    sq = _quantize(model, feeds, check_fusion=False, **options)
    x = np.concatenate([f["x"].ravel() for f in feeds]).astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if method == "percentile" and activation_type == "uint8":
        counts, edges = np.histogram(x, bins=512, range=(lo, hi))
        cdf = np.cumsum(counts) / counts.sum()
        expected = (edges[np.argmax(cdf >= 0.005)], edges[np.argmax(cdf >= 0.995) + 1])
    elif method == "mse" and activation_type == "uint8":
        counts, edges = np.histogram(x, bins=512, range=(lo, hi))
        expected = ranges.mse_range(counts, edges)
    else:
        magnitudes = np.abs(x) if method == "percentile" else np.abs(x[x != 0])  # entropy and mse skip zeros
        counts, edges = np.histogram(magnitudes, bins=512, range=(0.0, max(-lo, hi)))
        if method == "percentile":
            cdf = np.cumsum(counts) / counts.sum()
            t = edges[np.argmax(cdf >= 0.99) + 1]
        elif method == "mse":
            t = ranges.mse_magnitude(counts, edges)
        else:
            t = _reference_entropy(counts, edges)
        expected = (max(lo, -t), min(hi, t))
    assert sq.details["activations"]["x"]["range"] == pytest.approx(expected, rel=1e-6)


def test_mlp_runs_on_qgemm() -> None:
    model = testing.mlp([16, 64, 64, 8])
    common.ShapeInferencePass()(model)
    reference = _session(model)
    feeds = [{"x": RNG.standard_normal((32, 16)).astype(np.float32)} for _ in range(3)]
    sq = _quantize(model, feeds)
    # 2-D MatMul + Add(bias) becomes Gemm in ONNX Runtime; the bias is stored as int32 so QGemm can take it.
    assert sq.details["ort_fusion"] == {"integer_ops": {"QGemm": 3}, "fused": 3, "unfused": []}
    assert all(layer["bias"] == f"b{i}" for i, layer in enumerate(sq.details["layers"].values()))
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    assert _cosine(reference.run(None, {"x": x})[0], _session(model).run(None, {"x": x})[0]) > 0.999
    for layer in sq.details["layers"].values():
        assert 0 < layer["weight_rel_error"] < 0.02 and 0 < layer["est_output_rel_error"] < 0.05


def test_cnn_runs_on_qlinearconv() -> None:
    model = _cnn()
    reference = _session(model)
    feeds = [{"x": RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    sq = _quantize(model, feeds)
    fusion = sq.details["ort_fusion"]
    assert fusion == {"integer_ops": {"QGemm": 1, "QLinearConv": 3}, "fused": 4, "unfused": []}
    # The Q after a Conv sits after its Relu/Clip, whose uint8 range starts at 0: ORT drops them.
    assert sq.details["layers"]["conv0"]["output"] == "t1"
    assert sq.details["layers"]["conv1"]["output"] == "t3"
    assert sq.details["activations"]["t3"]["zero_point"] == 0
    assert sq.details["activations"]["t3"]["range"][1] <= 6.0
    assert _initializer(model, "b0_conv0_quantized").dtype == np.int32
    x = feeds[0]["x"]
    assert _cosine(reference.run(None, {"x": x})[0], _session(model).run(None, {"x": x})[0]) > 0.99


def test_dead_channel_keeps_its_bias() -> None:
    # A channel whose weights are ~0 but whose bias is not (BatchNorm folding makes these): its int32 bias code would
    # overflow at scale s_x * max|W_c| / 127, so its weight scale is raised instead.
    w = (0.3 * RNG.standard_normal((4, 3, 1, 1))).astype(np.float32)
    w[2] = 1e-12
    bias = np.array([0.1, -0.2, 5.0, 0.3], np.float32)
    x = testing.value("x", ["n", 3, 4, 4])
    conv = ir.node("Conv", [x, testing.initializer("w", w), testing.initializer("b", bias)], name="conv")
    model = testing.model([x], [_typed(conv.outputs[0], "y", ["n", 4, 4, 4])], [conv], list(conv.inputs[1:]))
    sq = _quantize(model, [{"x": RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)}], check_fusion=False)
    assert sq.details["layers"]["conv"]["scales_raised_for_bias"] == 1
    codes = _initializer(model, "b_conv_quantized")
    assert np.abs(codes.astype(np.int64)).max() < np.iinfo(np.int32).max
    (y,) = _session(model).run(None, {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)})
    np.testing.assert_allclose(y[0, 2], 5.0, rtol=1e-6)


def test_what_stays_float() -> None:
    model = _cnn()
    feeds = [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    sq = _quantize(model, feeds, exclude=["conv1"], exclude_first_last=True, check_fusion=False)
    assert set(sq.details["layers"]) == {"dwconv"}
    assert sq.details["skipped"] == {
        "conv1": "excluded by option 'exclude'",
        "conv0": "first or last quantizable layer (exclude_first_last)",
        "fc": "first or last quantizable layer (exclude_first_last)",
    }
    floats = {n.name: n.inputs[1].name for n in model.graph if n.op_type in ("Conv", "Gemm")}
    assert floats == {"conv0": "w0", "conv1": "w1", "dwconv": "w2_dequantized", "fc": "fc_w"}

    model = _cnn()
    sq = _quantize(model, feeds, op_types=["Gemm"], check_fusion=False)
    assert list(sq.details["layers"]) == ["fc"]

    # The layer reading the graph input keeps it float; the layers after it are quantized as usual.
    model = _cnn()
    sq = _quantize(model, feeds, quantize_model_inputs=False, check_fusion=False)
    assert set(sq.details["layers"]) == {"conv1", "dwconv", "fc"}
    assert sq.details["skipped"] == {"conv0": "reads the model input 'x' (quantize_model_inputs=false)"}
    assert [use.node.name for use in model.graph.inputs[0].uses()] == ["conv0"]
    assert model.graph.node("conv0").inputs[1].name == "w0"

    # Activation x activation MatMul (attention scores) stays float.
    a, b = testing.value("a", [2, 4, 8]), testing.value("b", [2, 8, 4])
    mm = ir.node("MatMul", [a, b], name="scores")
    model = testing.model([a, b], [_typed(mm.outputs[0], "y", [2, 4, 4])], [mm])
    feeds = [
        {"a": RNG.standard_normal((2, 4, 8), dtype=np.float32), "b": RNG.standard_normal((2, 8, 4), dtype=np.float32)}
    ]
    sq = _quantize(model, feeds)
    assert sq.details["skipped"] == {"scores": "second input 'b' is not a constant"}
    assert [n.op_type for n in model.graph] == ["MatMul"]


def test_layers_above_max_layer_error_stay_float() -> None:
    feeds = [{"x": RNG.standard_normal((32, 16)).astype(np.float32)} for _ in range(2)]
    model = testing.mlp([16, 64, 64, 8])
    estimates = {k: v["est_output_rel_error"] for k, v in _quantize(model, feeds).details["layers"].items()}
    threshold = sorted(estimates.values())[1]
    model = testing.mlp([16, 64, 64, 8])
    sq = _quantize(model, feeds, max_layer_error=threshold, check_fusion=False)
    worst = max(estimates, key=estimates.get)
    assert set(sq.details["layers"]) == set(estimates) - {worst}
    assert sq.details["skipped"] == {worst: f"estimated output error {estimates[worst]:.4f} > max_layer_error"}
    assert next(n for n in model.graph if n.name == worst).inputs[1].name == f"w{worst[-1]}"  # still float

    model = _linear()
    before = ir.to_proto(model).SerializeToString()
    assert not _quantize(model, _known_range_feeds(24, -1.0, 3.0), max_layer_error=1e-6).details["layers"]
    assert ir.to_proto(model).SerializeToString() == before


def test_gptq_codes_lower_the_output_error_on_the_same_grid() -> None:
    k, n = 24, 6
    w = RNG.standard_normal((2, k, n)).astype(np.float32)
    scales = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    mixing = RNG.standard_normal((2, k, k))
    hessian = mixing @ mixing.transpose(0, 2, 1) + np.ones((2, k, k))  # correlated inputs with a common mean
    nearest = np.clip(np.rint(w / scales[:, None]), -127, 127)
    codes = int8.gptq_codes(w, hessian, scales)
    assert np.array_equal(codes, np.rint(codes)) and np.abs(codes).max() <= 127

    def error(g: int, c: np.ndarray) -> float:
        d = w[g] - c * scales[g]
        return float(np.trace(d.T @ hessian[g] @ d))

    for g in range(2):
        assert error(g, codes[g]) < 0.7 * error(g, nearest[g])
    # Uncorrelated inputs: nothing to compensate, GPTQ is round-to-nearest.
    identity = np.broadcast_to(np.eye(k), (2, k, k))
    assert np.array_equal(int8.gptq_codes(w, identity, scales), nearest)


def test_gptq_rounding_and_bias_correction_on_a_cnn() -> None:
    # Smooth images with a non-zero mean, as photos are: neighbouring inputs are correlated, which GPTQ exploits,
    # and a weight error changes every output's mean, which bias correction removes.
    # (its own generator: the model and images are fixed whatever other tests draw)
    rng = np.random.default_rng(0)

    def smooth(n: int) -> np.ndarray:
        coarse = rng.standard_normal((n, 3, 2, 2))
        return (np.kron(coarse, np.ones((4, 4))) + 0.1 * rng.standard_normal((n, 3, 8, 8)) + 1.0).astype(np.float32)

    feeds = [{"x": smooth(8)} for _ in range(4)]
    original = ir.to_proto(_cnn(rng))
    reference = _session(ir.from_proto(original))
    errors = {}
    for options in ({}, {"rounding": "gptq", "bias_correction": True}):
        model = ir.from_proto(original)
        sq = _quantize(model, feeds, **options)
        assert sq.details["ort_fusion"]["integer_ops"] == {"QGemm": 1, "QLinearConv": 3}
        quantized = _session(model)
        x = np.concatenate([f["x"] for f in feeds])
        errors[bool(options)] = np.linalg.norm(quantized.run(None, {"x": x})[0] - reference.run(None, {"x": x})[0])
        layers = sq.details["layers"]
        if options:
            for layer in layers.values():
                assert layer["output_rel_error"] <= layer["output_rel_error_nearest"] * (1 + 1e-6)
                assert layer["bias_correction_norm"] > 0
            # The depthwise conv had no bias: it gets one, as int32 codes ORT's QLinearConv reads.
            dwconv = next(n for n in model.graph if n.name == "dwconv")
            assert dwconv.inputs[2].producer().inputs[0].const_value.dtype == ir.DataType.INT32
        else:
            assert all("output_rel_error" not in layer for layer in layers.values())
    assert errors[True] < 0.9 * errors[False], (errors[True], errors[False])


def test_a_1d_conv_is_rounded_to_nearest_and_says_why() -> None:
    w = (0.3 * RNG.standard_normal((4, 3, 3))).astype(np.float32)
    x = testing.value("x", ["n", 3, 8])
    conv = ir.node("Conv", [x, testing.initializer("w", w)], name="conv1d")
    model = testing.model([x], [_typed(conv.outputs[0], "y", ["n", 4, 6])], [conv], [conv.inputs[1]])
    feeds = [{"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}]
    sq = _quantize(model, feeds, rounding="gptq", bias_correction=True, check_fusion=False)
    assert sq.details["layers_without_statistics"] == {
        "conv1d": "rounded to nearest, no bias correction: a 1-D convolution (patch statistics cover 2-D ones)"
    }
    assert "output_rel_error" not in sq.details["layers"]["conv1d"] and len(conv.inputs) == 2


def test_shared_input_and_weight_are_quantized_once() -> None:
    k = 16
    w = testing.initializer("W", RNG.standard_normal((k, k)).astype(np.float32))
    x = testing.value("x", ["b", 3, k])
    first = ir.node("MatMul", [x, w], name="first")
    second = ir.node("MatMul", [x, w], name="second")
    outputs = [_typed(first.outputs[0], "y1", ["b", 3, k]), _typed(second.outputs[0], "y2", ["b", 3, k])]
    model = testing.model([x], outputs, [first, second], [w])
    sq = _quantize(model, [{"x": RNG.standard_normal((2, 3, k)).astype(np.float32)}])
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    assert sq.details["ort_fusion"]["integer_ops"] == {"MatMulIntegerToFloat": 2}


def test_transformer_linear_with_bias_runs_on_matmul_integer_to_float() -> None:
    model = _linear(bias=True)
    reference = _session(model)
    feeds = [{"x": RNG.standard_normal((2, 4, 24)).astype(np.float32)} for _ in range(2)]
    sq = _quantize(model, feeds, method="entropy")
    assert sq.details["ort_fusion"]["integer_ops"] == {"MatMulIntegerToFloat": 1}
    assert "bias" not in sq.details["layers"]["mm"]  # 3-D input: the Add stays float
    x = feeds[0]["x"]
    assert _cosine(reference.run(None, {"x": x})[0], _session(model).run(None, {"x": x})[0]) > 0.99


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ([], "is empty"),
        ([{"input": np.zeros((2, 4, 24), np.float32)}], "'input' is not an input of the model"),
        ([{"x": np.zeros((2, 5, 24), np.float32)}], "has size 5 on axis 1"),
        ([{"x": np.zeros((2, 4), np.float32)}], "has rank 2"),
    ],
)
def test_bad_calibration_fails_before_any_change(feeds: list, message: str) -> None:
    model = _linear()
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(CalibrationError, match=message):
        _quantize(model, feeds)
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("mode", ["bias", "affine"])
def test_output_correction_matches_the_float_means_of_a_cnn(mode: str) -> None:
    rng = np.random.default_rng(1)
    feeds = [{"x": (rng.standard_normal((8, 3, 8, 8)) + 0.5).astype(np.float32)} for _ in range(4)]
    original = ir.to_proto(_cnn(rng))
    reference = _session(ir.from_proto(original))
    x = np.concatenate([f["x"] for f in feeds])
    expected = reference.run(None, {"x": x})[0]
    drift = {}
    for correction in ("none", mode):
        model = ir.from_proto(original)
        sq = _quantize(model, feeds, method="mse", output_correction=correction)
        assert sq.details["ort_fusion"]["integer_ops"] == {"QGemm": 1, "QLinearConv": 3}
        got = _session(model).run(None, {"x": x})[0]
        drift[correction] = np.abs(got.mean(axis=0) - expected.mean(axis=0)).max()
        if correction == "none":
            continue
        layers = sq.details["layers"]
        assert set(layers) == {"conv0", "conv1", "dwconv", "fc"}
        for layer in layers.values():
            entry = layer["output_correction"]
            assert entry["bias_shift_norm"] >= 0
            if mode == "affine":
                low, high = entry["gain_range"]
                assert 1 / output_correction.MAX_GAIN <= low <= high <= output_correction.MAX_GAIN
            else:
                assert "gain_range" not in entry
        # the depthwise conv had no bias: it got an int32 one to carry its correction
        dwconv = next(n for n in model.graph if n.name == "dwconv")
        assert dwconv.inputs[2].producer().inputs[0].const_value.dtype == ir.DataType.INT32
    # The last layer is corrected after all the others: its mean output on the calibration data is the float one,
    # up to its bias codes' rounding and ONNX Runtime's fused kernels.
    scale = np.abs(expected).mean()
    assert drift[mode] < 2e-3 * scale < drift["none"]


def test_output_correction_moves_a_float_bias_after_a_3d_matmul() -> None:
    # ORT adds a 3-D MatMul's bias in float: the correction rewrites that initializer, and for one layer the
    # calibration mean is then exactly the float model's.
    model = _linear(bias=True)
    feeds = [{"x": (RNG.standard_normal((2, 4, 24)) + 0.3).astype(np.float32)} for _ in range(4)]
    reference = _session(model)
    bias_before = _initializer(model, "B").copy()
    x = np.concatenate([f["x"] for f in feeds])
    expected = reference.run(None, {"x": x})[0]
    sq = _quantize(model, feeds, method="minmax", output_correction="bias", correction_batches=2)
    got = _session(model).run(None, {"x": x})[0]
    # fitted on the first two batches only (correction_batches): their mean is the float one, not the others'
    assert got[:4].mean(axis=(0, 1)) == pytest.approx(expected[:4].mean(axis=(0, 1)), abs=1e-5)
    assert np.abs(got[4:].mean(axis=(0, 1)) - expected[4:].mean(axis=(0, 1))).max() > 1e-4
    shift = sq.details["layers"]["mm"]["output_correction"]["bias_shift_norm"]
    assert shift == pytest.approx(float(np.linalg.norm(_initializer(model, "B") - bias_before)), rel=1e-5)
    assert shift > 0


def _stft_model(n_fft: int = 64, hop: int = 32, bins: int = 16, mels: int = 8, classes: int = 4) -> ir.Model:
    """Log-mel features of raw audio, then a classifier: a Conv whose filters are a windowed Fourier basis, the
    power of each channel, a mel filterbank MatMul, Log, and a MatMul."""
    rng = np.random.default_rng(3)
    t = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * t / n_fft)
    f = np.arange(1, bins + 1)[:, None]
    basis = np.concatenate([np.cos(2 * np.pi * f * t / n_fft), -np.sin(2 * np.pi * f * t / n_fft)]) * window
    inits = [
        testing.initializer("basis", basis[:, None, :].astype(np.float32)),
        testing.initializer("mel", np.abs(rng.standard_normal((2 * bins, mels))).astype(np.float32)),
        testing.initializer("cls", rng.standard_normal((mels, classes)).astype(np.float32)),
        testing.initializer("eps", np.array(1e-6, np.float32)),
    ]
    v = {i.name: i for i in inits}
    x = testing.value("audio", ["n", 1, 2048])
    conv = ir.node("Conv", [x, v["basis"]], attributes={"strides": [hop]}, name="stft")
    power = ir.node("Mul", [conv.outputs[0], conv.outputs[0]], name="power")
    frames = ir.node("Transpose", [power.outputs[0]], attributes={"perm": [0, 2, 1]}, name="frames")
    melbank = ir.node("MatMul", [frames.outputs[0], v["mel"]], name="melbank")
    floor = ir.node("Add", [melbank.outputs[0], v["eps"]], name="floor")
    log = ir.node("Log", [floor.outputs[0]], name="log")
    classifier = ir.node("MatMul", [log.outputs[0], v["cls"]], name="classifier")
    nodes = [conv, power, frames, melbank, floor, log, classifier]
    for i, node in enumerate(nodes[:-1]):
        node.outputs[0].name = f"s{i}"
    y = _typed(classifier.outputs[0], "y", ["n", 63, classes])
    model = testing.model([x], [y], nodes, inits)
    common.ShapeInferencePass()(model)
    return model


def test_max_model_error_keeps_an_stft_float() -> None:
    # A loud tone for 300 samples, then near silence: per-tensor 8-bit codes flatten the quiet frames, and the log
    # of their spectrum turns that into a large error, which no layer's own output error shows.
    rng = np.random.default_rng(0)

    def audio(n: int) -> np.ndarray:
        t = np.arange(2048)
        tone = np.sin(2 * np.pi * t * rng.uniform(3, 12, (n, 1)) / 64) * (t < 300)
        return (tone + 1e-3 * rng.standard_normal((n, 2048)))[:, None, :].astype(np.float32)

    feeds = [{"audio": audio(4)} for _ in range(4)]
    test = audio(8)
    original = ir.to_proto(_stft_model())
    expected = _session(ir.from_proto(original)).run(None, {"audio": test})[0]
    errors = {}
    for limit in (None, 0.2):
        model = ir.from_proto(original)
        sq = _quantize(model, feeds, max_model_error=limit, check_fusion=False)
        got = _session(model).run(None, {"audio": test})[0]
        errors[limit] = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        if limit is None:
            assert set(sq.details["layers"]) == {"stft", "melbank", "classifier"}
            continue
        skipped = sq.details["skipped"]
        for label in ("stft", "melbank"):
            measured = float(re.search(r"outputs by ([0-9.]+)", skipped[label]).group(1))
            assert measured > 0.5 and "> max_model_error" in skipped[label]
        assert list(sq.details["layers"]) == ["classifier"]
        assert 0 < sq.details["layers"]["classifier"]["model_error"] < 0.01
        assert [n.op_type for n in model.graph].count("QuantizeLinear") == 1  # the classifier's input only
    assert errors[0.2] < 0.01 < 0.2 < errors[None]


def test_max_error_share_keeps_float_the_layer_doing_most_of_the_damage() -> None:
    rng = np.random.default_rng(1)
    feeds = [{"audio": rng.standard_normal((4, 1, 2048)).astype(np.float32)} for _ in range(4)]
    original = ir.to_proto(_stft_model())
    measured = _quantize(ir.from_proto(original), feeds, max_model_error=100.0, check_fusion=False).details["layers"]
    errors = {label: layer["model_error"] for label, layer in measured.items()}
    assert set(errors) == {"stft", "melbank", "classifier"}
    total = sum(errors.values())
    worst, second = sorted(errors, key=errors.get, reverse=True)[:2]
    assert errors[worst] > 1.2 * errors[second]
    share = (errors[worst] + errors[second]) / 2 / total  # between the two largest shares
    model = ir.from_proto(original)
    sq = _quantize(model, feeds, max_error_share=share, check_fusion=False)
    assert set(sq.details["layers"]) == set(errors) - {worst}
    reason = sq.details["skipped"][worst]
    assert f"{errors[worst] / total:.1%} of the sum over all 3 layers > max_error_share" in reason
    for label, layer in sq.details["layers"].items():
        assert layer["model_error"] == pytest.approx(errors[label], rel=1e-6)
    with pytest.raises(ValueError, match=r"max_error_share must be in \(0, 1\), got 1"):
        StaticInt8Options(max_error_share=1)


def test_options_and_recipes() -> None:
    with pytest.raises(RecipeError, match="method"):
        create("quantize.static-int8", {"method": "l2"})
    with pytest.raises(RecipeError, match="percentile"):
        create("quantize.static-int8", {"percentile": 20})
    with pytest.raises(RecipeError, match="op_types"):
        create("quantize.static-int8", {"op_types": ["LayerNormalization"]})
    with pytest.raises(RecipeError, match="option 'rounding' must be one of 'nearest', 'gptq', got 'adaround'"):
        create("quantize.static-int8", {"rounding": "adaround"})
    with pytest.raises(RecipeError, match=r"damp must be in \(0, 1\), got 0"):
        create("quantize.static-int8", {"damp": 0})
    with pytest.raises(ValueError, match="max_model_error must be positive, got 0"):
        StaticInt8Options(max_model_error=0)
    with pytest.raises(ValueError, match="correction_batches must be >= 1, got 0"):
        StaticInt8Options(correction_batches=0)
    with pytest.raises(ValueError, match="sensitivity_batches must be >= 1, got 0"):
        StaticInt8Options(sensitivity_batches=0)
    with pytest.raises(ValueError, match="output_correction must be 'none', 'bias' or 'affine', got 'gain'"):
        StaticInt8Options(output_correction="gain")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'gptq', got 'adaround'"):
        StaticInt8Options(rounding="adaround")  # type: ignore[arg-type]
    steps = {
        name: [step.name for step in recipes.load(name).passes]
        for name in ("int8-static", "int8-dynamic", "w8a8-smoothquant")
    }
    assert steps["int8-static"][-1] == "quantize.static-int8"
    assert steps["int8-dynamic"][-1] == "quantize.dynamic-int8"
    assert steps["w8a8-smoothquant"][-2:] == ["quantize.smoothquant", "quantize.static-int8"]
    assert recipes.load("int8-static").needs_calibration and not recipes.load("int8-dynamic").needs_calibration
