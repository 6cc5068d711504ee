"""output_correction.fit: the per-channel least-squares gain and bias, from streamed moments."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.passes.quantize import output_correction
from kiln.passes.quantize.output_correction import ChannelMoments, fit


def _moments(reference: np.ndarray, current: np.ndarray, axis: int, batches: int = 3) -> ChannelMoments:
    moments = ChannelMoments(axis)
    for r, c in zip(np.array_split(reference, batches), np.array_split(current, batches)):
        moments.update(r, c)
    return moments


def test_fit_recovers_an_affine_map_per_channel() -> None:
    rng = np.random.default_rng(0)
    current = rng.standard_normal((12, 4, 5, 5)).astype(np.float32) + np.arange(4).reshape(1, 4, 1, 1)
    bias = np.array([0.5, -0.2, 0.0, 1.0])
    gain = np.array([1.1, 0.9, 1.0, 2.0])  # the last beyond MAX_GAIN
    offset = np.array([0.3, 0.0, -0.1, 0.2])
    shape = (1, 4, 1, 1)
    reference = gain.reshape(shape) * (current - bias.reshape(shape)) + offset.reshape(shape)
    moments = _moments(reference, current, axis=1)
    assert moments.count == 12 * 25

    g, b = fit(moments, bias, affine=True)
    assert g[:3] == pytest.approx(gain[:3], rel=1e-6)
    assert g[3] == pytest.approx(output_correction.MAX_GAIN)
    # b' = E[t] - g (E[t̂] - b̂): exact where the gain is, the least-squares offset for the clipped gain
    mean_t, mean_q = reference.mean(axis=(0, 2, 3)), current.mean(axis=(0, 2, 3))
    assert b == pytest.approx(mean_t - g * (mean_q - bias), abs=1e-5)
    assert b[:3] == pytest.approx(offset[:3], abs=1e-5)

    g, b = fit(moments, bias, affine=False)  # "bias": the means only
    assert np.all(g == 1)
    assert b == pytest.approx(bias + mean_t - mean_q, abs=1e-5)


def test_fit_keeps_a_constant_channel_and_an_empty_statistic() -> None:
    current = np.ones((6, 3), dtype=np.float32)  # no variance: no gain to fit
    reference = current * 2.0
    g, b = fit(_moments(reference, current, axis=-1), np.zeros(3), affine=True)
    assert np.all(g == 1) and b == pytest.approx(np.full(3, 1.0))
    g, b = fit(ChannelMoments(-1), np.array([0.1, 0.2]), affine=True)
    assert np.all(g == 1) and b == pytest.approx([0.1, 0.2])
