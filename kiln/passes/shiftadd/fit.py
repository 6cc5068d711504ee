"""Binary-coding quantization (BCQ) with power-of-two scales (optionally with a few mantissa bits), fitted with
GPTQ-style error compensation.

A weight ``W`` [K, N] is cut along K into groups of ``group_size`` rows. In group ``g``, column ``n`` is::

    w ~ sum_{i < q} 2^e[g, n, i] * b_i,     b_i in {-1, +1}^group_size

so its values lie on the ``2^q`` levels ``L_j = sum_i 2^e_i (2 bit_i(j) - 1)``: picking level ``j`` for a weight
sets plane ``i``'s sign to bit ``i`` of ``j``. Exponents are integers in ``[EXPONENT_MIN, EXPONENT_MAX]``.

With ``mantissa_bits = t > 0`` each scale is an int8 code ``c = 2^t e + f`` standing for ``2^e (1 + f / 2^t)``
(:func:`kiln.runtime_ops.shiftadd.scales`): the same byte per scale, ``2^t`` scales per octave instead of one, and
a product with one costs at most ``t`` more shifts and adds. Rounding to the nearest code is in log distance, and
the search below steps codes by one, so ``t = 0`` fits as before (``rint(log2 |alpha|)``, ties aside). On the
synthetic layer of the tests (K=256, groups of 64, act-order) the relative output error at 3 planes is 0.157,
0.129, 0.117, 0.115 for ``t = 0, 1, 2, 3``; at 2 planes 0.272, 0.242, 0.227, 0.228.

Scales of a group (:func:`fit_scales`), per column, minimizing the weighted error ``sum_k d_k (w_k - w'_k)^2``.
With compensation, ``d_k = 1 / [H^-1]_kk`` taken on the rows still open when row k is reached (``1 / U[k, k]^2``
below): GPTQ's own price of row k's rounding error once the rows after it have absorbed what they can. Without
compensation, ``d = diag(H)``, the energy of input feature k. The two differ on transformer inputs, where a few
channels spike together on the same tokens (attention sinks): their ``diag(H)`` is hundreds to thousands of times
the median, yet each is predictable from the others, so compensation cancels most of their error, and fitting the
group's scales to those rows misfits the rest. On 12 SmolLM2 layer groups (blocks 0, 3 and 29; Grams of 8
calibration windows; 3 planes, t = 3, groups of 128, act-order, one refit) the geometric-mean relative output
error was 0.0032 with ``diag(H)``, 0.0027 with its square root and 0.0026 with ``1 / [H^-1]_kk``, where kiln's
3-bit GPTQ reaches 0.0030; at 2 planes 0.0112 -> 0.0098. (The full block ``(w - w')^T H_gg (w - w')`` fitted no
better than the diagonal on synthetic correlated inputs, and its small matrix products cost more than the rest of
the search.)

1. greedy start: ``alpha_i = weighted mean |r|``, ``b_i = sign(r)``, ``r -= alpha_i b_i`` for i = 1..q;
2. ``iterations`` rounds of alternating updates: alphas by weighted least squares given the signs
   (``(B^T D B) alpha = B^T D w``), rounded to powers of two in the log domain, then each exponent in turn tried at
   +-1 and kept where that lowers the error; signs as the nearest level given the exponents. The best exponents
   seen are kept.

Error compensation (:func:`bcq_gptq`): as in GPTQ (:mod:`kiln.passes.quantize.gptq`), rows are quantized in order
and the rows not yet quantized absorb each row's error through the upper Cholesky factor ``U`` of ``H^-1``
(``W[r+1:] -= U[r, r+1:]^T (w_r - q_r) / U[r, r]``). A group's exponents are fitted on its rows as updated so far,
when its first row is reached; each row then takes, per column, the nearest of the group's levels. With
``act_order``, rows are processed by decreasing ``diag(H)`` (GPTQ's act-order) and every group's exponents are
fitted first, on the original weight. On SmolLM2's layer-0 Q/K/V (one real Gram) at 3 planes, groups of 128, the
relative output error was 0.035 in natural order and 0.0205 with act-order; kiln's GPTQ at 3 bits reaches 0.0152
there (its grid has a free float scale and a zero point per group; powers of two cost the difference: on the same
weight without calibration, weight error 0.264 with power-of-two scales, 0.227 with sqrt(2) steps, 0.214 with
1/16-octave steps, against 0.217 for the 3-bit asymmetric grid).

Refits (``refits``, act-order only): static exponents are fitted on the original rows, but compensation moves each
row before it is quantized, into the gaps of levels fitted to the original distribution. Each refit runs the sweep
again with every group's exponents fitted on the rows as the previous sweep reached them. One refit lowered the
relative output error on every SmolLM2 layer tried (blocks 0 and 15, 3 planes, groups of 128): 0.0279 -> 0.0278 on
layer-0 Q, 0.0685 -> 0.0604 on layer-0 down_proj, 0.1307 -> 0.1279 on layer-15 down_proj; at 2 planes down_proj
went 0.157 -> 0.121. A second refit gained nothing. Scale fits that beat the uniform grid need finer scales than
powers of two: with float scales and one refit the same layers reach 0.0226, 0.0490 and 0.1118, on par with GPTQ's
3-bit grid (0.0207, 0.0478, 0.1128); sums of three powers of two (APoT, as ShiftAddLLM uses) get 0.0226, 0.0495,
0.1129. Scales per input row instead (ShiftAddLLM's column-wise mode, fitted on each row as compensated) were worse
at equal storage here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kiln.passes.quantize.gptq import compensated_costs, upper_inverse_cholesky
from kiln.runtime_ops import shiftadd

#: Rows updated one by one inside a group before the rest of the group gets their errors in one product.
_INNER_ROWS = 32
#: Elements of a group fitted at once: temporaries are [rows, columns, 2^q] float32, near 256 MB at 4 planes.
_FIT_CHUNK = 1 << 22


@dataclasses.dataclass
class BCQWeight:
    """A fitted weight: level codes [K, N] (bit i = plane i's sign), exponents [groups, N, q]."""

    codes: np.ndarray
    exponents: np.ndarray
    group_size: int
    mantissa_bits: int = 0

    @property
    def bits(self) -> int:
        return self.exponents.shape[-1]

    def dequantize(self) -> np.ndarray:
        """The [K, N] float32 weight the codes and exponents stand for."""
        levels = level_values(self.exponents, self.mantissa_bits)  # [groups, N, 2^q]
        k = self.codes.shape[0]
        rows = np.arange(k) // self.group_size
        return np.take_along_axis(levels[rows], self.codes[..., None].astype(np.int64), axis=-1)[..., 0]

    def pack(self) -> shiftadd.PackedWeight:
        """The op's packed layout: planes [N, q, ceil(K/8)], exponents [N, q, groups]."""
        planes = (self.codes.T[:, None, :] >> np.arange(self.bits, dtype=np.uint8)[None, :, None]) & 1
        exponents = self.exponents.transpose(1, 2, 0)
        return shiftadd.pack(planes.astype(bool), exponents, self.group_size, self.mantissa_bits)

    def columns(self, cols: slice) -> BCQWeight:
        codes, exponents = self.codes[:, cols].copy(), self.exponents[:, cols].copy()
        return BCQWeight(codes, exponents, self.group_size, self.mantissa_bits)

    @staticmethod
    def concatenate(parts: list[BCQWeight]) -> BCQWeight:
        """Fits of the same rows, made column block by column block, as one weight."""
        first = parts[0]
        if any(
            (p.group_size, p.mantissa_bits, p.bits) != (first.group_size, first.mantissa_bits, first.bits)
            for p in parts
        ):
            raise ValueError("column blocks must share their group size, planes and mantissa bits")
        codes = np.concatenate([p.codes for p in parts], axis=1)
        exponents = np.concatenate([p.exponents for p in parts], axis=1)
        return BCQWeight(codes, exponents, first.group_size, first.mantissa_bits)


def sign_matrix(bits: int) -> np.ndarray:
    """``M`` [2^q, q] with ``M[j, i] = 2 bit_i(j) - 1``: level j is ``M[j] @ alpha``."""
    j = np.arange(1 << bits)[:, None]
    return (2 * ((j >> np.arange(bits)[None, :]) & 1) - 1).astype(np.float32)


def level_values(exponents: np.ndarray, mantissa_bits: int = 0) -> np.ndarray:
    """Levels [..., 2^q] of scale codes [..., q]."""
    alphas = shiftadd.scales(exponents, mantissa_bits).astype(np.float32)
    return alphas @ sign_matrix(exponents.shape[-1]).T


class Levels:
    """A group's levels [N, 2^q] sorted per column, for nearest-level look-ups of many rows."""

    def __init__(self, levels: np.ndarray) -> None:
        n, self.count = levels.shape
        self.order = np.argsort(levels, axis=-1, kind="stable")
        self.ordered = np.take_along_axis(levels, self.order, axis=-1)
        self.midpoints = np.ascontiguousarray(((self.ordered[:, 1:] + self.ordered[:, :-1]) / 2).T)
        self.offsets = np.arange(n) * self.count

    def nearest(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(level index [rows, N], level value) nearest to ``w`` [rows, N] (exactly between two: the lower one).

        Counts the midpoints between sorted levels that lie below each weight: 2^q - 1 comparisons on contiguous
        [rows, N] arrays, an order of magnitude faster than an argmin of distances over a short trailing axis.
        """
        rank = np.zeros(w.shape, dtype=np.uint8)
        for midpoint in self.midpoints:
            rank += w > midpoint
        flat = rank + self.offsets
        return self.order.ravel()[flat].astype(np.uint8), self.ordered.ravel()[flat]


def nearest(w: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(level index [rows, N], level value) nearest to ``w`` [rows, N] given ``levels`` [N, 2^q]."""
    return Levels(levels).nearest(w)


def _error(w: np.ndarray, d: np.ndarray, exponents: np.ndarray, mantissa_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(error ``sum_r d_r (w - w')^2`` per column [N], codes [rows, N]) of ``w`` on the levels of ``exponents``."""
    codes, values = nearest(w, level_values(exponents, mantissa_bits))
    diff = w - values
    return d @ (diff * diff), codes


def _to_exponents(alphas: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """The scale codes nearest to ``|alphas|`` in log distance (for ``t = 0``: ``rint(log2 |alpha|)``)."""
    low, high = shiftadd.code_range(mantissa_bits)
    magnitude = np.maximum(np.abs(alphas).astype(np.float64), 2.0**shiftadd.EXPONENT_MIN)
    e = np.floor(np.log2(magnitude)).astype(np.int64)
    unit = 1 << mantissa_bits
    fraction = np.clip(np.floor((np.ldexp(magnitude, -e) - 1.0) * unit), 0, unit - 1).astype(np.int64)
    below = np.clip(e * unit + fraction, low, high - 1)
    v_low, v_high = shiftadd.scales(below, mantissa_bits), shiftadd.scales(below + 1, mantissa_bits)
    codes = below + (magnitude * magnitude >= v_low * v_high)
    return np.clip(codes, low, high).astype(np.int8)


def fit_scales(w: np.ndarray, d: np.ndarray, bits: int, iterations: int, mantissa_bits: int = 0) -> np.ndarray:
    """Scale codes [N, q] for the group ``w`` [rows, N] with row weights ``d`` [rows] (module docstring)."""
    low, high = shiftadd.code_range(mantissa_bits)
    n = w.shape[1]
    d = np.asarray(d, dtype=np.float32)
    d_sum = max(float(d.sum()), 1e-30)
    residual = w.astype(np.float32).copy()
    alphas = np.empty((n, bits), dtype=np.float32)
    for i in range(bits):
        alphas[:, i] = d @ np.abs(residual) / d_sum
        residual -= alphas[:, i] * np.where(residual >= 0, 1, -1)
    exponents = _to_exponents(alphas, mantissa_bits)
    best, codes = _error(w, d, exponents, mantissa_bits)
    ridge = np.float32(1e-6) * d_sum * np.eye(bits, dtype=np.float32)
    signs = sign_matrix(bits)
    for _ in range(iterations):
        planes = signs[codes]  # [rows, N, q]
        weighted = planes * d[:, None, None]
        lhs = np.einsum("rni,rnj->nij", weighted, planes) + ridge
        rhs = np.einsum("rni,rn->ni", weighted, w)
        current = _to_exponents(np.linalg.solve(lhs, rhs[..., None])[..., 0], mantissa_bits)
        error, _ = _error(w, d, current, mantissa_bits)
        for i in range(bits):
            for step in (1, -1):
                trial = current.copy()
                trial[:, i] = np.clip(trial[:, i].astype(np.int16) + step, low, high)
                trial_error, _ = _error(w, d, trial, mantissa_bits)
                better = trial_error < error
                current[better], error[better] = trial[better], trial_error[better]
        improved = error < best
        exponents[improved], best[improved] = current[improved], error[improved]
        _, codes = _error(w, d, exponents, mantissa_bits)
    return exponents


def bcq_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    iterations: int = 4,
    compensate: bool = True,
    act_order: bool = False,
    refits: int = 0,
    mantissa_bits: int = 0,
) -> BCQWeight:
    """BCQ of ``w`` [K, N] with power-of-two scales, fitted against the Gram ``hessian`` [K, K] of its input.

    ``compensate=False`` fits each group on the original rows and takes the nearest level (no error feedback).
    ``act_order`` (with compensation) quantizes rows by decreasing ``diag(H)``, as GPTQ's act-order, with every
    group's exponents fitted beforehand on the original weight ("static groups"); each of ``refits`` more sweeps
    refits them on the rows as the previous sweep had compensated them when it reached them (module docstring).
    """
    k, n = w.shape
    h = np.array(hessian, dtype=np.float64)
    diagonal = np.diag(h).copy()
    diagonal[diagonal == 0] = 1.0
    n_groups = -(-k // group_size)
    exponents = np.empty((n_groups, n, bits), dtype=np.int8)
    codes = np.empty((k, n), dtype=np.uint8)
    act_order = act_order and compensate
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(k)
    if compensate:
        h[np.diag_indices(k)] = diagonal + damp * float(diagonal.mean())
        u = upper_inverse_cholesky(h[np.ix_(order, order)]).astype(np.float32)
        row_costs = compensated_costs(u, order)  # module docstring
    else:
        row_costs = diagonal
    del h

    def fit_group(g: int, rows: np.ndarray) -> Levels:
        g0, g1 = g * group_size, min((g + 1) * group_size, k)
        step = max(1, _FIT_CHUNK // (g1 - g0))
        for c0 in range(0, n, step):
            cols = slice(c0, min(c0 + step, n))
            exponents[g, cols] = fit_scales(rows[:, cols], row_costs[g0:g1], bits, iterations, mantissa_bits)
        return Levels(level_values(exponents[g], mantissa_bits))

    def sweep(levels: dict[int, Levels]) -> np.ndarray:
        """Quantize every row into ``codes``; returns the rows (original order) as compensated when reached."""
        work = np.array(w, dtype=np.float32)[order]
        block = group_size if not act_order else 128
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            if not act_order:  # natural order: the block is group b0 // group_size, fitted on its rows as updated
                g = b0 // group_size
                levels[g] = fit_group(g, work[b0:b1])
                if not compensate:
                    codes[b0:b1] = levels[g].nearest(work[b0:b1])[0]
                    continue
            errors = np.empty((b1 - b0, n), dtype=np.float32)
            for i0 in range(b0, b1, _INNER_ROWS):
                i1 = min(i0 + _INNER_ROWS, b1)
                for r in range(i0, i1):
                    source_row = int(order[r])
                    code, value = levels[source_row // group_size].nearest(work[r : r + 1])
                    codes[source_row] = code[0]
                    error = (work[r] - value[0]) / u[r, r]
                    work[r + 1 : i1] -= u[r, r + 1 : i1, None] * error
                    errors[r - b0] = error
                work[i1:b1] -= u[i0:i1, i1:b1].T @ errors[i0 - b0 : i1 - b0]
            work[b1:] -= u[b0:b1, b1:].T @ errors
        reached = np.empty_like(work)
        reached[order] = work
        return reached

    if not act_order:
        sweep({})
        return BCQWeight(codes, exponents, group_size, mantissa_bits)
    rows = np.asarray(w, dtype=np.float32)
    for _ in range(refits + 1):
        rows = sweep({g: fit_group(g, rows[g * group_size : (g + 1) * group_size]) for g in range(n_groups)})
    return BCQWeight(codes, exponents, group_size, mantissa_bits)
