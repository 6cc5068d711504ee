"""Whitened truncated SVD, patch statistics and rank allocation, against numpy references."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import kiln.testing as kt
from kiln.errors import KilnError
from kiln.passes.lowrank import rank, whiten

RNG = np.random.default_rng(0)


def correlated(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Activations with strongly correlated channels of unequal scale, like a transformer's."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    return (rng.standard_normal((rows, k)) @ mixing * rng.uniform(0.2, 3.0, k)).astype(np.float32)


def gram(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64).T @ x.astype(np.float64) / len(x)


def _whitening(kind: whiten.Kind, g: np.ndarray, damp: float = 0.01) -> whiten.Whitening:
    return whiten.Whitening(kind, g if kind == "cov" else np.diag(g), damp)


@pytest.mark.parametrize("kind", ["none", "diag", "cov"])
def test_full_rank_reconstructs_the_weight(kind: whiten.Kind) -> None:
    w = RNG.standard_normal((48, 32)).astype(np.float32)
    a, b, _ = _whitening(kind, gram(correlated(256, 48))).truncated(w, 32)
    assert np.abs(a.astype(np.float32) @ b.astype(np.float32) - w).max() < 1e-5


@pytest.mark.parametrize("r", [1, 5, 20])
def test_plain_error_is_the_dropped_singular_values(r: int) -> None:
    w = RNG.standard_normal((40, 24))
    sigma = np.linalg.svd(w, compute_uv=False)
    a, b, energy = whiten.Whitening("none").truncated(w, r)
    np.testing.assert_allclose(energy, sigma**2)
    assert a.shape == (40, r) and b.shape == (r, 24)
    assert np.linalg.norm(w - a @ b) == pytest.approx(np.sqrt(np.sum(sigma[r:] ** 2)), rel=1e-10)


@pytest.mark.parametrize("r", [4, 12])
def test_whitened_output_error_is_the_tail_and_beats_plain(r: int) -> None:
    x = correlated(2048, 48, seed=1)
    g = gram(x)
    w = RNG.standard_normal((48, 32))

    def output_error(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (w - a @ b)) ** 2 / len(x))

    a, b, energy = whiten.Whitening("cov", g, damp=1e-10).truncated(w, r)
    assert output_error(a, b) == pytest.approx(energy[r:].sum(), rel=1e-6)
    plain = output_error(*whiten.Whitening("none").truncated(w, r)[:2])
    diag = output_error(*_whitening("diag", g).truncated(w, r)[:2])
    # Measured: cov at 0.77 (rank 4) and 0.47 (rank 12) of plain SVD's output error, diag at 0.88 and 0.68.
    assert output_error(a, b) < diag < plain
    assert output_error(a, b) < {4: 0.85, 12: 0.55}[r] * plain


def test_output_errors_for_every_rank_match_direct_products() -> None:
    g = gram(correlated(512, 40, seed=2))
    d = RNG.standard_normal((40, 16))
    a, b, _ = whiten.Whitening("cov", g).truncated(d, 10)
    direct = [np.einsum("kn,kn->", e, g @ e) for e in (d - a[:, :r] @ b[:r] for r in range(11))]
    np.testing.assert_allclose(whiten.output_errors(g, d, a, b), direct, rtol=1e-9)


@pytest.mark.parametrize(
    "attributes",
    [
        {"kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
        {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
        {"kernel_shape": [1, 1]},
    ],
)
def test_patches_are_the_rows_a_conv_multiplies(attributes: dict[str, object]) -> None:
    """Conv(X, W) equals patches @ W's matrix view, position by position."""
    kernel = attributes["kernel_shape"]
    w = RNG.standard_normal((5, 3, *kernel)).astype(np.float32)
    x = RNG.standard_normal((2, 3, 9, 8)).astype(np.float32)
    node = ir.node("Conv", [kt.value("x", [2, 3, 9, 8]), kt.initializer("w", w)], attributes=attributes)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(kt.FLOAT)
    model = kt.model([node.inputs[0]], [node.outputs[0]], [node], [node.inputs[1]])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    patches = whiten.Patches.of(node, tuple(kernel))
    for sample, rows in zip(y, patches.rows(x)):
        np.testing.assert_allclose(rows @ w.reshape(5, -1).T, sample.reshape(5, -1).T, atol=1e-5)


def test_moments_accumulate_over_batches() -> None:
    x = correlated(300, 12)
    full, diagonal = whiten.Moments(True), whiten.Moments(False)
    for chunk in np.split(x, 3):
        full.update(chunk.reshape(10, 10, 12))
        diagonal.update(chunk)
    np.testing.assert_allclose(full.value, gram(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diagonal.value, np.diag(gram(x)), rtol=1e-5)


# -- rank allocation ------------------------------------------------------------------------------------------------


def _curve(energy: np.ndarray, k: int, n: int, dense: bool = True, step: int = 1) -> rank.Curve:
    max_rank = (k * n) // (k + n)
    return rank.Curve(energy, float(energy.sum()), k + n, k * n if dense else None, min(step, max_rank), max_rank)


def _brute_force(curves: list[rank.Curve], budget: float, step: int, power: float = 1.0) -> float:
    """The least summed error (to ``power``) of any choice of ranks (or dense) within ``budget``."""
    options = [
        [(r * c.unit_cost, c.error(r) ** power) for r in c.ranks(step)]
        + ([(c.dense_cost, 0.0)] if c.dense_cost else [])
        for c in curves
    ]
    return min(sum(e for _, e in combo) for combo in itertools.product(*options) if sum(c for c, _ in combo) <= budget)


def _error(curves: list[rank.Curve], ranks: list[int | None], power: float = 1.0) -> float:
    return sum(0.0 if r is None else c.error(r) ** power for c, r in zip(curves, ranks))


def _cost(curves: list[rank.Curve], ranks: list[int | None]) -> float:
    return sum(c.dense_cost if r is None else r * c.unit_cost for c, r in zip(curves, ranks))  # type: ignore[misc]


@pytest.mark.parametrize(("dense", "power"), [(False, 1.0), (True, 1.0), (True, 2.0)])
def test_allocation_is_optimal(dense: bool, power: float) -> None:
    """Against brute force, over spectra from steep to flat, with and without the dense option."""
    curves = [
        _curve(np.exp(-np.arange(24) / scale) * size, 40, 24, dense=dense, step=4)
        for scale, size in ((2.0, 1.0), (8.0, 3.0), (40.0, 0.5))
    ]
    total = 3 * 40 * 24
    for keep in (0.3, 0.4, 0.55, 0.7, 0.85):
        ranks = rank.allocate(curves, keep * total, step=4, power=power)
        assert _cost(curves, ranks) <= keep * total
        # Costs are rounded up to 1/65536 of the budget: at most that much per matrix is lost.
        slack = 3 * keep * total / 65536
        assert _brute_force(curves, keep * total, 4, power) <= _error(curves, ranks, power)
        assert _error(curves, ranks, power) <= _brute_force(curves, keep * total - slack, 4, power) + 1e-12


def test_allocation_spends_where_the_error_drops_most() -> None:
    steep, flat = np.exp(-np.arange(32.0)), np.ones(32)  # flat: no low-rank structure at all
    curves = [_curve(flat, 32, 32), _curve(steep, 32, 32)]
    ranks = rank.allocate(curves, 0.6 * 2 * 32 * 32, step=1)
    assert ranks[0] is None and ranks[1] is not None and ranks[1] < 16


def test_a_higher_error_power_spreads_the_loss() -> None:
    """Two alike matrices: the total error is least with one kept dense and the other cut deep (dense saves the whole
    tail at once); squared errors are least with both cut alike."""
    curves = [_curve(np.exp(-np.arange(32) / 16), 32, 32) for _ in range(2)]
    budget = 0.75 * 2 * 32 * 32
    total = rank.allocate(curves, budget, step=1)
    spread = rank.allocate(curves, budget, step=1, power=2.0)
    assert sorted(total, key=str) == [7, None]
    assert spread == [12, 12]
    worst = max(curves[0].error(r) for r in spread)  # type: ignore[arg-type]
    assert worst < max(0.0 if r is None else c.error(r) for c, r in zip(curves, total))


def test_budget_below_the_smallest_ranks_is_an_error() -> None:
    with pytest.raises(KilnError, match="keep a larger fraction"):
        rank.allocate([_curve(np.ones(16), 16, 16, step=8)], 100.0, step=8)


def test_energy_rank() -> None:
    energy = np.array([8.0, 1.0, 0.5, 0.25, 0.25])
    curve = rank.Curve(energy, 10.0, 10, 25.0, 1, 4)
    assert rank.energy_rank(curve, 0.8, step=1) == 1
    assert rank.energy_rank(curve, 0.9, step=1) == 2
    assert rank.energy_rank(curve, 0.99, step=1) is None  # needs rank 5 > max_rank
