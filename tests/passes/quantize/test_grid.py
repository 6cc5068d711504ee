"""The numeric core of weight-only quantization: scales, zero points, codes and errors on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln.passes.quantize import grid
from kiln.passes.quantize.grid import GridSpec


def _reference(w: np.ndarray, spec: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A plain loop over groups and columns, in float64, written from the module docstring's formulas."""
    k, n = w.shape
    g = spec.group_len(k)
    n_groups = -(-k // g)
    codes = np.zeros((k, n), dtype=np.int64)
    scales = np.zeros((n_groups, n))
    zeros = None if spec.symmetric else np.zeros((n_groups, n), dtype=np.int64)
    for j in range(n):
        for gi in range(n_groups):
            block = w[gi * g : (gi + 1) * g, j].astype(np.float64)
            if spec.symmetric:
                m = block.max() if abs(block.max()) > abs(block.min()) else block.min()
                s = m / -(2 ** (spec.bits - 1))
                q = np.zeros_like(block) if s == 0 else np.floor(block / s + 0.5)
                codes[gi * g : (gi + 1) * g, j] = np.clip(q, spec.qmin, spec.qmax)
            else:
                lo, hi = min(block.min(), 0.0), max(block.max(), 0.0)
                s = (hi - lo) / (2**spec.bits - 1)
                z = 0 if s == 0 else int(np.clip(np.floor(-lo / s + 0.5), 0, spec.qmax))
                q = np.full_like(block, z) if s == 0 else np.floor(block / s + z + 0.5)
                codes[gi * g : (gi + 1) * g, j] = np.clip(q, 0, spec.qmax)
                zeros[gi, j] = z
            scales[gi, j] = s
    return codes, scales, zeros


def test_asymmetric_two_bits_by_hand() -> None:
    # lo = -1, hi = 2: s = 3 / 3 = 1, z = round(1) = 1; 0.5 + 1 = 1.5 rounds half up to 2.
    w = np.array([[-1.0], [2.0], [0.5], [1.2]], dtype=np.float32)
    q = grid.quantize(w, GridSpec(bits=2, group_size=0, symmetric=False))
    assert q.scales.tolist() == [[1.0]]
    assert q.zero_points.tolist() == [[1]]
    assert q.codes[:, 0].tolist() == [0, 3, 2, 2]
    assert grid.dequantize(q)[:, 0].tolist() == [-1.0, 2.0, 1.0, 1.0]


def test_symmetric_four_bits_by_hand() -> None:
    # Column 0: extreme -2 -> s = -2 / -8 = 0.25. Column 1: extreme +4 -> s = 4 / -8 = -0.5 (negative scale).
    w = np.array([[0.5, 4.0], [-2.0, -1.0], [1.0, 0.5], [0.25, 3.0]], dtype=np.float32)
    q = grid.quantize(w, GridSpec(bits=4, group_size=0, symmetric=True))
    assert q.zero_points is None
    assert q.codes.dtype == np.int8
    assert q.scales.tolist() == [[0.25, -0.5]]
    assert q.codes.tolist() == [[2, -8], [-8, 2], [4, -1], [1, -6]]
    np.testing.assert_array_equal(grid.dequantize(q), w)


def test_symmetric_tie_takes_the_negative_extreme() -> None:
    q = grid.quantize(np.array([[2.0], [-2.0]], dtype=np.float32), GridSpec(4, 0, True))
    assert q.scales.tolist() == [[0.25]]
    assert q.codes[:, 0].tolist() == [7, -8]  # 2 / 0.25 = 8 is clipped to 7


def test_ragged_groups() -> None:
    # K = 5 with groups of 2: groups {0,1}, {2,3}, {4}; the last group has one row.
    w = np.array([[1.0], [-3.0], [0.0], [6.0], [-0.5]], dtype=np.float32)
    q = grid.quantize(w, GridSpec(bits=8, group_size=2, symmetric=False))
    assert q.scales.shape == (3, 1)
    np.testing.assert_allclose(q.scales[:, 0], [4.0 / 255, 6.0 / 255, 0.5 / 255], rtol=1e-7)
    assert q.zero_points[:, 0].tolist() == [191, 0, 255]  # round(3 / (4/255)) = round(191.25)
    assert q.codes[:, 0].tolist() == [255, 0, 0, 255, 0]


def test_per_channel_is_one_group_over_k() -> None:
    w = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    q = grid.quantize(w, GridSpec(4, 0, False))
    assert q.scales.shape == (1, 5)
    assert q.group_len == 37
    np.testing.assert_allclose(q.scales[0], (np.maximum(w.max(0), 0) - np.minimum(w.min(0), 0)) / 15, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_groups_give_zero_scale_and_no_nan(symmetric: bool) -> None:
    w = np.zeros((64, 3), dtype=np.float32)
    w[32:, 1] = np.linspace(-1, 1, 32)  # one group of column 1 is non-zero
    q = grid.quantize(w, GridSpec(4, 32, symmetric))
    assert q.scales[0].tolist() == [0.0, 0.0, 0.0]
    assert q.scales[1, 1] != 0
    back = grid.dequantize(q)
    assert np.isfinite(back).all()
    assert (back[:32] == 0).all() and (back[:, [0, 2]] == 0).all()
    assert grid.relative_error(np.zeros((4, 4), np.float32), grid.quantize(np.zeros((4, 4), np.float32), q.spec)) == 0


def test_all_positive_group_has_zero_point_zero() -> None:
    w = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    q = grid.quantize(w, GridSpec(2, 0, False))
    assert q.zero_points.tolist() == [[0]]
    assert q.scales.tolist() == [[1.0]]
    assert q.codes[:, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16, 24])
def test_matches_loop_reference(bits: int, symmetric: bool, group_size: int) -> None:
    w = np.random.default_rng(bits * 10 + group_size).standard_normal((70, 9)).astype(np.float32)
    spec = GridSpec(bits, group_size, symmetric)
    q = grid.quantize(w, spec)
    codes, scales, zeros = _reference(w, spec)
    np.testing.assert_allclose(q.scales, scales, rtol=1e-6)
    np.testing.assert_array_equal(q.codes, codes)
    if zeros is not None:
        np.testing.assert_array_equal(q.zero_points, zeros)
    assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax


@pytest.mark.parametrize(("bits", "bound"), [(2, 0.6), (4, 0.12), (8, 0.006)])
def test_relative_error_shrinks_with_bits(bits: int, bound: float) -> None:
    w = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
    err = grid.relative_error(w, grid.quantize(w, GridSpec(bits, 32, False)))
    # Uniform rounding noise: error ~ range / (2^b - 1) / sqrt(12); the bounds leave a margin of about 1.5x.
    assert bound / 4 < err < bound


def test_float16_weight_keeps_float16_scales() -> None:
    w = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float16)
    q = grid.quantize(w, GridSpec(4, 32, False))
    assert q.scales.dtype == np.float16
    # Codes were computed with the rounded float16 scales: reconstruction stays within half a step.
    rows = np.arange(64) // 32
    step = np.abs(q.scales.astype(np.float32))[rows]
    assert (np.abs(grid.dequantize(q) - w.astype(np.float32)) <= step / 2 + 1e-3).all()


def test_quantize_codes_with_given_scales_clips() -> None:
    w = np.array([[1.0], [-1.0]], dtype=np.float32)
    spec = GridSpec(4, 0, True)
    codes = grid.quantize_codes(w, np.array([[0.0625]], dtype=np.float32), None, spec)
    assert codes[:, 0].tolist() == [7, -8]  # 16 and -16 clipped to the signed 4-bit range
    with pytest.raises(ValueError, match="scales must have shape"):
        grid.quantize_codes(w, np.ones((2, 1), np.float32), None, spec)
    with pytest.raises(ValueError, match="zero_points"):
        grid.quantize_codes(w, np.ones((1, 1), np.float32), np.zeros((1, 1), np.uint8), spec)


@pytest.mark.parametrize("symmetric", [False, True])
def test_equal_shrink_is_the_grid_of_the_scaled_weight(symmetric: bool) -> None:
    spec = GridSpec(4, 32, symmetric)
    w = np.random.default_rng(3).standard_normal((80, 6)).astype(np.float32)
    for ratio in (1.0, 0.85, 0.55):
        shrunk = grid.compute_scales(w, spec, shrink=(ratio, ratio))
        scaled = grid.compute_scales(w * np.float32(ratio), spec)
        np.testing.assert_array_equal(shrunk[0], scaled[0])
        if not symmetric:
            np.testing.assert_array_equal(shrunk[1], scaled[1])


def test_shrinking_one_end_of_an_asymmetric_range() -> None:
    spec = GridSpec(2, 0, False)
    w = np.array([[-1.5], [0.0], [3.0]], dtype=np.float32)
    scales, zero_points = grid.compute_scales(w, spec, shrink=(1.0, 0.5))
    # range [-1.5, 1.5]: step 3 / 3 = 1, zero point round(1.5) = 2
    assert scales.tolist() == [[1.0]] and zero_points.tolist() == [[2]]
    q = grid.QuantizedWeight(grid.quantize_codes(w, scales, zero_points, spec), scales, zero_points, spec)
    # -1.5 + 2 = 0.5 rounds half up to code 1; 3.0 saturates at code 3
    assert grid.dequantize(q)[:, 0].tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize(("bits", "symmetric"), [(2, False), (3, False), (4, True), (8, True)])
def test_round_trip_is_dequantize_of_the_codes(bits: int, symmetric: bool) -> None:
    """Bit for bit, shrunk ranges (saturating codes), a ragged last group and an all-zero group included."""
    spec = GridSpec(bits, 32, symmetric)
    w = np.random.default_rng(bits).standard_normal((80, 7)).astype(np.float32)
    w[:, 3] = 0
    for shrink in ((1.0, 1.0), (0.7, 0.9)):
        scales, zero_points = grid.compute_scales(w, spec, shrink=shrink)
        q = grid.QuantizedWeight(grid.quantize_codes(w, scales, zero_points, spec), scales, zero_points, spec)
        grouped = np.zeros((96, 7), dtype=np.float32)
        grouped[:80] = w
        back = grid.round_trip(grouped.reshape(3, 32, 7), scales, zero_points, spec).reshape(96, 7)
        np.testing.assert_array_equal(back[:80], grid.dequantize(q))
        assert not back[80:].any()  # zero padding reads back as 0


def test_chunked_columns_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    w = np.random.default_rng(3).standard_normal((48, 40)).astype(np.float32)
    spec = GridSpec(4, 16, False)
    whole = grid.quantize(w, spec)
    monkeypatch.setattr(grid, "_CHUNK_ELEMENTS", 48 * 3)  # 3 columns per chunk
    chunked = grid.quantize(w, spec)
    np.testing.assert_array_equal(whole.codes, chunked.codes)
    np.testing.assert_array_equal(whole.scales, chunked.scales)
    np.testing.assert_array_equal(whole.zero_points, chunked.zero_points)
    direct = np.linalg.norm(w.astype(np.float64) - grid.dequantize(whole)) / np.linalg.norm(w.astype(np.float64))
    assert grid.relative_error(w, chunked) == pytest.approx(direct, rel=1e-12)


def test_deterministic() -> None:
    w = np.random.default_rng(4).standard_normal((96, 7)).astype(np.float32)
    a, b = grid.quantize(w, GridSpec(3, 32, True)), grid.quantize(w.copy(), GridSpec(3, 32, True))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8, got 9"):
        GridSpec(9, 32, False)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8, got 1"):
        GridSpec(1, 32, False)
    with pytest.raises(ValueError, match="group_size must be 0"):
        GridSpec(4, -1, False)
    with pytest.raises(ValueError, match="NaN or inf"):
        grid.quantize(np.array([[1.0], [np.nan]], np.float32), GridSpec(4, 0, False))
    with pytest.raises(ValueError, match="2-D"):
        grid.quantize(np.zeros((2, 2, 2), np.float32), GridSpec(4, 0, False))


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    bits=st.integers(2, 8),
    group_size=st.sampled_from([0, 1, 4, 16]),
)
def test_asymmetric_error_is_at_most_half_a_step(w: np.ndarray, bits: int, group_size: int) -> None:
    """Every weight lies inside its group's range, so rounding moves it by at most s / 2."""
    q = grid.quantize(w, GridSpec(bits, group_size, False))
    rows = np.arange(w.shape[0]) // q.group_len
    step = q.scales[rows]
    err = np.abs(grid.dequantize(q).astype(np.float64) - w)
    assert (err <= step * 0.5 * (1 + 1e-4) + 1e-30).all()
    assert q.codes.max(initial=0) <= 2**bits - 1
