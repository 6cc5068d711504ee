"""Least-squares refit of a projection whose input lost channels (``refit`` of ``prune.mlp`` and ``prune.heads``).

Math. A projection ``y = a W + b`` loses input channels ``R`` (intermediate neurons, or a head's context
channels) and keeps ``K``. With ``C`` the covariance of ``a`` over the calibration tokens, the least-squares
weights on the kept channels are ``W'_K = W_K + C_KK^-1 C_KR W_R``, and the bias gains
``E[a_R] W_R - E[a_K] (W'_K - W_K)`` so that the mean output stays: the kept channels carry the part of the removed
ones they correlate with. With uncorrelated channels (``C_KR = 0``) this is FLAP's bias compensation. The residual
is the Schur complement ``tr(W_R^T (C_RR - C_RK C_KK^-1 C_KR) W_R)``, against bias compensation's
``tr(W_R^T C_RR W_R)``; both are reported relative to ``tr(W^T C W)``.

The fit needs many more tokens than channels: on SmolLM2 (1536 channels per MLP), refitting after removing a
quarter of them loses to bias compensation with 8 windows of 512 tokens (perplexity 35.8 against 34.2) and wins
with 32 (29.6 against 33.4). Weighting tokens by their residual stream's size (so that the few with very large
activations count less) measured no better (29.8).
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.calibration import Gram
from kiln.errors import CalibrationError, KilnError
from kiln.passes import _weights
from kiln.passes.prune import _edit
from kiln.passes.prune.structure import Projection


def refit(
    gram: Gram, mean: np.ndarray, w: np.ndarray, keep: np.ndarray, drop: np.ndarray, damp: float = 1e-3
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """``W'_K`` (the kept rows), the bias shift, and the two relative residuals of the module doc; ``gram`` and
    ``mean`` are the second moment and mean of ``a`` over the same tokens. Refuses fewer tokens than twice the kept
    channels: the fit would only memorize them."""
    if gram.count < 2 * len(keep):
        raise CalibrationError(
            f"a least-squares refit over {len(keep)} kept channels needs at least {2 * len(keep)} calibration tokens, "
            f"got {gram.count}; give more calibration data or set refit = false (bias compensation)"
        )
    cov = gram.value - np.outer(mean, mean)
    c_kk = cov[np.ix_(keep, keep)]
    c_kr = cov[np.ix_(keep, drop)]
    lam = damp * max(float(np.trace(c_kk)) / len(keep), 1e-12)
    removed = w[drop]
    delta = np.linalg.solve(c_kk + lam * np.eye(len(keep)), c_kr @ removed)
    shift = mean[drop] @ removed - mean[keep] @ delta
    bias_only = float(np.sum(removed * (cov[np.ix_(drop, drop)] @ removed)))
    explained = float(np.sum(delta * (c_kr @ removed)))  # tr(W_R^T C_RK C_KK^-1 C_KR W_R), damped
    scale = max(float(np.sum(w * (cov @ w))), 1e-300)
    errors = {"bias_compensation_error": bias_only / scale, "refit_error": max(bias_only - explained, 0.0) / scale}
    return w[keep] + delta, shift, errors


def keep_rows(
    projection: Projection,
    keep: np.ndarray,
    drop: np.ndarray,
    mean: np.ndarray,
    gram: Gram | None,
    bias_compensation: bool,
    names: _weights.NameScope,
    where: str,
) -> dict[str, float]:
    """Keep input rows ``keep`` of ``projection``'s weight, and make up for rows ``drop``: refit (with ``gram``)
    or fold their mean output into the bias (with ``bias_compensation``). ``mean`` is the input's per-channel mean;
    ``where`` starts the error message. Returns the refit's residuals (empty without it)."""
    original = _edit.weight_array(projection.weight)
    w = original.astype(np.float64)
    rows, errors = w[keep], {}
    if gram is not None:
        try:
            rows, shift, errors = refit(gram, mean, w, keep, drop)
        except CalibrationError as error:
            raise KilnError(f"{where}: {error}") from error
        projection = _edit.add_to_bias(projection, shift, names)
    elif bias_compensation:
        projection = _edit.add_to_bias(projection, mean[drop] @ w[drop], names)
    _edit.replace_constant(projection.matmul, 1, np.ascontiguousarray(rows.astype(original.dtype)), names)
    return errors
