"""Whitening: the metric in which a truncated SVD minimizes a layer's output error, from calibration statistics.

A layer computes ``y = x W`` with ``W`` [K, N] (a Conv in its matrix view: ``x`` is a patch of ``C kh kw`` input
values, ``W`` the filters reshaped to [C kh kw, M]). Over calibration rows ``x`` with second moment
``G = E[x^T x]``, a replacement ``W'`` has the mean squared output error::

    E ||x W - x W'||^2 = tr(D^T G D) = ||S D||_F^2,    D = W - W',   for any S with S^T S = G

so, by Eckart–Young in that metric, the best rank-r ``W'`` is the truncated SVD of the *whitened* matrix, mapped
back::

    S W = U Σ V^T,    W' = A B,   A = S^-1 U_r Σ_r^(1/2),   B = Σ_r^(1/2) V_r^T
    ||S (W - A B)||_F^2 = sum_{i > r} σ_i^2                  (the tail energy of the whitened singular values)

Plain SVD (``S = I``) minimizes the weight error ``||D||_F`` instead, which equals the output error only when the
inputs are white; transformer activations are far from it (a few channels carry most of the energy, and channels
are correlated). ``Σ_r`` is split evenly between the factors so that both have similar magnitudes.

Kinds of ``S``:

* ``"cov"``: ``S = L^T`` with ``L L^T = G + λ I`` (Cholesky; SVD-LLM's whitening). The tail energy is then exactly
  the damped error ``tr(D^T G D) + λ ||D||^2``; ``λ = damp · mean(diag G)`` keeps ``S`` invertible when ``G`` is
  singular and pulls the factorization toward plain SVD in directions the calibration data barely excites.
* ``"diag"``: ``S = diag(sqrt(diag G + λ))``, the root mean square of each input channel (ASVD-style scaling with
  exponent 1/2). It weighs channels by their energy but ignores correlations between them, so the tail energy is
  the output error only for uncorrelated inputs; it needs K statistics per tensor instead of K^2.
* ``"none"``: ``S = I``, plain SVD.

Sequential refit. When earlier layers have been factored already, a layer's inputs are ``x̂``, no longer the
original ``x``, and what should be kept is the original output ``x W``. With ``G = E[x̂^T x̂]`` and
``C = E[x̂^T x]`` (collected side by side by :class:`kiln.compiler.sequential.CrossGram`), the damped error of a
replacement splits as::

    E ||x W - x̂ W'||^2 + λ ||W - W'||^2 = ||S (W* - W')||_F^2 + const,   S^T S = G + λ I,
    W* = (G + λ I)^-1 (C W + λ W)

so the best rank-r ``W'`` is the truncated SVD of ``S W*`` in the same metric as before (:meth:`Whitening.refit`):
the factors absorb part of the error the earlier layers made. With ``x̂ = x`` it is exactly the plain whitened
factorization (``C = G`` gives ``W* = W``).

Statistics are collected with :class:`Moments` reducers. For a Conv the rows are the input patches its filters
see (:class:`Patches`, im2col over the calibration batches, one sample at a time so memory holds one sample's
patches). They are collected in memory-bounded chunks, one ONNX Runtime pass over the calibration data per chunk,
and kept on disk as float32 until each weight is factored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Reducer
from kiln.compiler.sequential import refit_target
from kiln.errors import CalibrationError, KilnError

Kind = Literal["none", "diag", "cov"]


@dataclasses.dataclass(frozen=True)
class Patches:
    """How a Conv reads its input [batch, C, *spatial]: the rows of its filters' matrix view, ``C * prod(kernel)``."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    #: ONNX order: all begins, then all ends.
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"

    @classmethod
    def of(cls, node: ir.Node, kernel: tuple[int, ...]) -> Patches:
        """The geometry of a Conv node whose weight has spatial shape ``kernel``."""
        n = len(kernel)
        attrs = node.attributes
        return cls(
            kernel,
            tuple(attrs.get_ints("strides", [1] * n)),
            tuple(attrs.get_ints("dilations", [1] * n)),
            tuple(attrs.get_ints("pads", [0] * 2 * n)),
            attrs.get_string("auto_pad", "NOTSET"),
        )

    def _pads(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        n = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = []
            for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
                total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small = total // 2
                pads.append((small, total - small) if self.auto_pad == "SAME_UPPER" else (total - small, small))
            return pads
        if self.auto_pad == "VALID":
            return [(0, 0)] * n
        return list(zip(self.pads[:n], self.pads[n:]))

    def rows(self, array: np.ndarray) -> Iterator[np.ndarray]:
        """Patches of each sample of ``array`` as [positions, C * prod(kernel)], ordered like the weight's rows."""
        n = len(self.kernel)
        padded = np.pad(array, [(0, 0), (0, 0), *self._pads(array.shape[2:])])
        extent = tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))
        pick = (
            slice(None),
            *(slice(None, None, s) for s in self.strides),
            *(slice(None, None, d) for d in self.dilations),
        )
        order = (*range(1, n + 1), 0, *range(n + 1, 2 * n + 1))
        for sample in padded:
            windows = np.lib.stride_tricks.sliding_window_view(sample, extent, axis=tuple(range(1, n + 1)))[pick]
            positions = math.prod(windows.shape[1 : n + 1])
            yield windows.transpose(order).reshape(positions, -1)


class Moments(Reducer):
    """Second moments of a layer's input rows: the Gram ``E[x^T x]`` (``full``) or only its diagonal ``E[x^2]``.

    Rows are the last axis of the tensor, or a Conv's input patches. Each batch's product is taken in float32 and
    accumulated in float64.
    """

    def __init__(self, full: bool, patches: Patches | None = None) -> None:
        self.full = full
        self.patches = patches
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        blocks = [array.reshape(-1, array.shape[-1])] if self.patches is None else self.patches.rows(array)
        for rows in blocks:
            rows32 = rows.astype(np.float32, copy=False)
            if self.full:
                batch = (rows32.T @ rows32).astype(np.float64)
            else:
                batch = np.einsum("ij,ij->j", rows32, rows32, dtype=np.float64)
            self.sum = batch if self.sum is None else self.sum + batch
            self.count += rows.shape[0]

    @property
    def value(self) -> np.ndarray:
        if self.sum is None or self.count == 0:
            raise CalibrationError("no calibration rows reached this tensor")
        return self.sum / self.count


#: What a statistic is of: the input tensor's name, and the Conv geometry for patch rows (None: last-axis rows).
StatKey = tuple[str, Patches | None]


class Statistics:
    """Input moments per :data:`StatKey`, collected in memory-bounded chunks and kept on disk until used."""

    def __init__(self, directory: Path, full: bool) -> None:
        self.directory = directory
        self.full = full
        self._index: dict[StatKey, int] = {}
        #: Calibration rows behind each statistic: a Gram from fewer rows than K is singular, and the whitened
        #: errors measured on it are optimistic for unseen inputs.
        self.rows: dict[StatKey, int] = {}

    def collect(
        self, calibration: CalibrationData, model: ir.Model, dims: dict[StatKey, int], memory_bytes: int
    ) -> int:
        """Collect the moments of every key (with its row length K); returns the passes over the calibration data.

        Each chunk's float64 accumulators fit in ``memory_bytes``; a larger statistic gets a chunk of its own.
        """
        chunks: list[list[StatKey]] = []
        used = memory_bytes
        for key, k in dims.items():
            size = 8 * (k * k if self.full else k)
            if used + size > memory_bytes:
                chunks.append([])
                used = 0
            chunks[-1].append(key)
            used += size
        for chunk in chunks:
            reducers = {key: Moments(self.full, key[1]) for key in chunk}
            by_tensor: dict[str, list[Reducer]] = {}
            for key, reducer in reducers.items():
                by_tensor.setdefault(key[0], []).append(reducer)
            calibration.collect(model, by_tensor)
            for key, reducer in reducers.items():
                index = self._index.setdefault(key, len(self._index))
                np.save(self.directory / f"{index}.npy", reducer.value.astype(np.float32))
                self.rows[key] = reducer.count
            del reducers, by_tensor
        return len(chunks)

    def get(self, key: StatKey) -> np.ndarray:
        """The moments of ``key`` as float64: [K, K] (full) or [K]."""
        return np.load(self.directory / f"{self._index[key]}.npy").astype(np.float64)


class Whitening:
    """The map ``S`` of one weight (module docstring), built from its input moments.

    ``moments`` is the Gram [K, K] for "cov", its diagonal [K] for "diag", and ignored for "none".
    """

    def __init__(self, kind: Kind, moments: np.ndarray | None = None, damp: float = 0.01) -> None:
        self.kind = kind
        self.gram: np.ndarray | None = None
        if kind == "none":
            return
        assert moments is not None
        diagonal = np.diag(moments) if kind == "cov" else moments
        if not np.isfinite(moments).all():
            raise KilnError("calibration activations are not finite (NaN or inf); cannot whiten")
        mean = float(diagonal.mean())
        lam = damp * mean if mean > 0 else 1.0
        self._lam = lam
        if kind == "cov":
            self.gram = moments
            try:
                self._lower = np.linalg.cholesky(moments + lam * np.eye(len(moments)))
            except np.linalg.LinAlgError:
                raise KilnError("the damped Gram of a layer's input is not positive definite; raise damp") from None
        else:
            self._scale = np.sqrt(diagonal + lam)

    def apply(self, w: np.ndarray) -> np.ndarray:
        """``S W`` in float64."""
        w = np.asarray(w, dtype=np.float64)
        if self.kind == "cov":
            return self._lower.T @ w
        if self.kind == "diag":
            return self._scale[:, None] * w
        return w

    def unapply(self, u: np.ndarray) -> np.ndarray:
        """``S^-1 U`` in float64."""
        if self.kind == "cov":
            return np.linalg.solve(self._lower.T, u)
        if self.kind == "diag":
            return u / self._scale[:, None]
        return u

    def refit(self, w: np.ndarray, cross: np.ndarray) -> np.ndarray:
        """The weight a rewritten model's inputs need to reproduce the original outputs (module docstring):
        ``(G + λ I)^-1 (C W + λ W)``, for "cov" built from the rewritten model's Gram ``G`` and ``C = E[x̂^T x]``."""
        if self.kind != "cov":
            raise KilnError("a least-squares refit needs the full Gram (whiten='cov')")
        assert self.gram is not None
        return refit_target(w, self.gram, cross, self._lam)

    def truncated(self, w: np.ndarray, max_rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A [K, r], B [r, N], all squared singular values of ``S W``) of the rank-``max_rank`` factorization.

        The first ``r <= max_rank`` columns of A and rows of B are the best rank-r factorization in turn.
        """
        u, sigma, vt = np.linalg.svd(self.apply(w), full_matrices=False)
        root = np.sqrt(sigma[:max_rank])
        return self.unapply(u[:, :max_rank] * root), root[:, None] * vt[:max_rank], sigma**2

    def energy(self, w: np.ndarray) -> np.ndarray:
        """Squared singular values of ``S W``, descending (cheaper than :meth:`truncated`: no vectors)."""
        return np.linalg.svd(self.apply(w), compute_uv=False) ** 2


def output_errors(gram: np.ndarray, d: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``tr((D - A_r B_r)^T G (D - A_r B_r))`` for every r from 0 to A's width, exactly, in float64.

    Expanding the square, with ``P = A^T G D`` and ``Q = A^T G A``, the rank-r error is
    ``tr(D^T G D) - 2 sum_{i<r} <b_i, p_i> + sum_{i,j<r} Q_ij <b_i, b_j>``: prefix sums over one small matrix,
    instead of one K x K x N product per rank.
    """
    d = np.asarray(d, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    gd = gram @ d
    base = float(np.einsum("kn,kn->", d, gd))
    cross = np.concatenate([[0.0], np.cumsum(np.einsum("rn,rn->r", b, a.T @ gd))])
    square = np.cumsum(np.cumsum((a.T @ gram @ a) * (b @ b.T), axis=0), axis=1)
    return base - 2 * cross + np.concatenate([[0.0], np.diag(square)])
