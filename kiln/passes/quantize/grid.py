"""Group-wise integer grids for weight-only quantization: the numeric core that RTN, AWQ and GPTQ share.

A weight ``W`` is taken in MatMul orientation, ``[K, N]``: K input features (the reduction axis) by N output
columns. Along K it is cut into groups of ``group_size`` consecutive rows; every (group, column) pair gets its own
scale ``s`` (and, when asymmetric, zero point ``z``). ``group_size=0`` means per-channel: one group spanning all of
K. When ``K % group_size != 0`` the last group is shorter (ragged); nothing is padded here, the output formats in
:mod:`kiln.passes.quantize.pack` pad as they need.

Conventions, for ``b`` bits (2..8). They are the ones ONNX Runtime's MatMulNBits quantizer (MLAS) uses, so its
output serves as an oracle in the tests:

* asymmetric, unsigned codes ``q`` in ``[0, 2^b - 1]``::

      lo = min(min(w), 0),  hi = max(max(w), 0)          # 0 stays exactly representable
      s = (hi - lo) / (2^b - 1),  z = clip(round(-lo / s), 0, 2^b - 1)
      q = clip(round(w / s + z), 0, 2^b - 1),  w' = (q - z) * s

* symmetric, signed codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, zero point 0::

      m = the group's value of largest magnitude, with its sign (the negative one on a tie)
      s = m / -2^(b-1)        # m lands exactly on -2^(b-1), so all 2^b levels are used;
                              # s is negative when m > 0 (DequantizeLinear and MatMulNBits accept that)
      q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1),  w' = q * s

``round`` is round-half-up (``floor(x + 0.5)``), applied to ``w * (1 / s) + z`` computed in float32 (for the
symmetric grid with ``z = 2^(b-1)``, removed afterwards), as MLAS does, so float32 near-ties go the same way. A
group whose scale is 0 (all its weights are 0) gets reciprocal 0, hence code ``z`` (or 0), and reconstructs to
exactly 0: no NaN or inf (a subnormal scale whose reciprocal overflows is treated the same way; its weights are
below 1e-37). Everything is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

# Elements per column chunk when quantizing, so temporaries stay near 64 MB of float32 whatever the weight size.
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """How a weight is quantized: bit width, group length along K (0 = per-channel), symmetric or not."""

    bits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(
                f"group_size must be 0 (one group per output column) or a positive integer, got {self.group_size!r}"
            )

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> np.dtype:
        """int8 for signed codes, uint8 for unsigned ones: every bit width up to 8 fits."""
        return np.dtype(np.int8 if self.symmetric else np.uint8)

    def group_len(self, k: int) -> int:
        """Rows per group for a weight with ``k`` rows."""
        return k if self.group_size == 0 else self.group_size

    def n_groups(self, k: int) -> int:
        """Groups along K, counting a ragged last group."""
        return -(-k // self.group_len(k)) if k else 0


@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes of a ``[K, N]`` weight with their per-group scales and zero points.

    ``codes`` is ``[K, N]`` in ``spec.code_dtype``; ``scales`` is ``[n_groups, N]`` (float32, or the float16 of a
    float16 weight); ``zero_points`` is ``[n_groups, N]`` uint8, or ``None`` when symmetric (zero point 0).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    spec: GridSpec

    @property
    def k(self) -> int:
        return self.codes.shape[0]

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    @property
    def group_len(self) -> int:
        return self.spec.group_len(self.k)


def concatenate_columns(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights of the same rows and grid, quantized column block by column block, as one ``[K, sum N]`` weight."""
    first = parts[0]
    if any(p.spec != first.spec or p.k != first.k for p in parts):
        raise ValueError("column blocks must share their rows and grid")
    zero_points = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts], axis=1)
    return QuantizedWeight(
        np.concatenate([p.codes for p in parts], axis=1),
        np.concatenate([p.scales for p in parts], axis=1),
        zero_points,
        first.spec,
    )


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """floor(x + 0.5), exactly: ``x - floor(x)`` is exact in float32, ``x + 0.5`` is not."""
    f = np.floor(x)
    return f + (x - f >= 0.5)


def _check_weight(w: np.ndarray) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or inf; such a weight cannot be put on an integer grid")


def _grouped(w: np.ndarray, spec: GridSpec) -> np.ndarray:
    """``w`` [K, n] as float32 [n_groups, group_len, n], the ragged last group padded with zeros.

    Zero padding leaves every group's parameters unchanged: the asymmetric range always includes 0, and a 0 never
    has the largest magnitude unless the whole group is 0.
    """
    k, n = w.shape
    g = spec.group_len(k)
    n_groups = spec.n_groups(k)
    padded = np.zeros((n_groups * g, n), dtype=np.float32)
    padded[:k] = w
    return padded.reshape(n_groups, g, n)


def _column_slices(n: int, k: int) -> Iterator[slice]:
    """Column ranges of a [k, n] weight small enough to bound the temporaries of one quantization step."""
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def compute_scales(
    w: np.ndarray, spec: GridSpec, scale_dtype: np.dtype | type | None = None, shrink: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-group scales ``[n_groups, N]`` and zero points (uint8, or ``None`` when symmetric) of ``w`` [K, N].

    Scales are rounded to ``scale_dtype`` (default: float16 for a float16 weight, else float32) before zero points
    are derived from them, so codes, scales and zero points agree with what is stored. ``shrink = (a, b)`` narrows
    each group's range to ``[a lo, b hi]`` (clipping; codes outside it saturate); a symmetric grid then takes the
    larger in magnitude of ``a lo`` and ``b hi``. ``(r, r)`` gives exactly the grid of ``r w``.
    """
    _check_weight(w)
    scale_dtype = np.dtype(scale_dtype if scale_dtype is not None else _default_scale_dtype(w))
    k, n = w.shape
    n_groups = spec.n_groups(k)
    scales = np.empty((n_groups, n), dtype=scale_dtype)
    zero_points = None if spec.symmetric else np.empty((n_groups, n), dtype=np.uint8)
    for cols in _column_slices(n, k):
        lo, hi = group_range(w[:, cols], spec)
        scales[:, cols], z = scales_for_range(lo * np.float32(shrink[0]), hi * np.float32(shrink[1]), spec, scale_dtype)
        if zero_points is not None:
            zero_points[:, cols] = z
    return scales, zero_points


def group_range(w: np.ndarray, spec: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per (group, column) minimum and maximum ``[n_groups, n]`` of ``w`` [K, n]; a ragged group counts its padding."""
    grouped = _grouped(w, spec)
    return grouped.min(axis=1), grouped.max(axis=1)


def scales_for_range(
    lo: np.ndarray, hi: np.ndarray, spec: GridSpec, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (in ``scale_dtype``) and zero points (uint8, ``None`` when symmetric) for groups spanning ``[lo, hi]``."""
    if spec.symmetric:
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = extreme / np.float32(-(1 << (spec.bits - 1)))
    else:
        lo = np.minimum(lo, np.float32(0))
        hi = np.maximum(hi, np.float32(0))
        scale = (hi - lo) / np.float32(spec.qmax)
    # A float16 scale can overflow for a 2-bit range near float16's max; clamp instead of storing inf.
    finfo = np.finfo(scale_dtype)
    scale = np.clip(scale, finfo.min, finfo.max).astype(scale_dtype)
    if spec.symmetric:
        return scale, None
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = np.where(s32 != 0, -lo / s32, np.float32(0))
    return scale, np.clip(_round_half_up(z), 0, spec.qmax).astype(np.uint8)


def quantize_codes(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, spec: GridSpec) -> np.ndarray:
    """Codes ``[K, N]`` of ``w`` on a given grid: ``scales``/``zero_points`` are ``[n_groups, N]`` for ``w``'s K.

    Split from :func:`compute_scales` so that searches over scales (AWQ clipping) and column-wise updates (GPTQ)
    can quantize with parameters of their own.
    """
    _check_weight(w)
    k, n = w.shape
    n_groups = spec.n_groups(k)
    if scales.shape != (n_groups, n):
        raise ValueError(f"scales must have shape {(n_groups, n)} for a [{k}, {n}] weight, got {scales.shape}")
    if (zero_points is None) != spec.symmetric:
        raise ValueError("zero_points must be given exactly when the grid is asymmetric")
    codes = np.empty((k, n), dtype=spec.code_dtype)
    for cols in _column_slices(n, k):
        zp = None if zero_points is None else zero_points[:, cols]
        q, _ = _unsigned_codes(_grouped(w[:, cols], spec), scales[:, cols], zp, spec)
        if zero_points is None:
            q += spec.qmin
        codes[:, cols] = q.reshape(-1, q.shape[-1])[:k]
    return codes


def round_trip(grouped: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, spec: GridSpec) -> np.ndarray:
    """Grouped values [n_groups, group_len, n] (float32) put on a grid and read back: exactly what
    :func:`dequantize` of :func:`quantize_codes` gives, without making codes (for searches over scales)."""
    q, offset = _unsigned_codes(grouped, scales, zero_points, spec)
    return (q - offset) * scales.astype(np.float32)[:, None, :]


def _unsigned_codes(
    grouped: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, spec: GridSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned codes in ``[0, qmax - qmin]`` (float32) of grouped values, and the code of 0 they are offset by."""
    s32 = scales.astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        reciprocal = np.float32(1) / s32
    # Scale 0 (an all-zero group), or so small (subnormal) that 1/s overflows: the group reconstructs to 0.
    reciprocal[~np.isfinite(reciprocal)] = 0
    # Rounding happens on the unsigned code, the zero point (2^(b-1) for symmetric grids) added in float32 first,
    # as MLAS does: this decides float32 near-ties the same way it does.
    offset = np.float32(-spec.qmin) if zero_points is None else zero_points[:, None, :].astype(np.float32)
    q = np.clip(_round_half_up(grouped * reciprocal[:, None, :] + offset), 0, spec.qmax - spec.qmin)
    return q, np.asarray(offset)


def quantize(w: np.ndarray, spec: GridSpec, scale_dtype: np.dtype | type | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` [K, N] on ``spec``'s grid."""
    scales, zero_points = compute_scales(w, spec, scale_dtype)
    return QuantizedWeight(quantize_codes(w, scales, zero_points, spec), scales, zero_points, spec)


def dequantize(q: QuantizedWeight, cols: slice = slice(None)) -> np.ndarray:
    """The float32 ``[K, N]`` weight the codes stand for, ``(q - z) * s`` group by group (or some of its columns)."""
    rows = np.arange(q.k) // q.group_len
    codes = q.codes[:, cols].astype(np.float32)
    if q.zero_points is not None:
        codes -= q.zero_points[rows, cols].astype(np.float32)
    return codes * q.scales[rows, cols].astype(np.float32)


def relative_error(w: np.ndarray, q: QuantizedWeight) -> float:
    """``||W - Q(W)||_F / ||W||_F`` (0 for an all-zero weight), accumulated in float64 a column chunk at a time."""
    diff2 = norm2 = 0.0
    for cols in _column_slices(q.n, q.k):
        w64 = w[:, cols].astype(np.float64)
        norm2 += float(np.square(w64).sum())
        diff2 += float(np.square(w64 - dequantize(q, cols)).sum())
    return 0.0 if norm2 == 0.0 else float(np.sqrt(diff2 / norm2))


def _default_scale_dtype(w: np.ndarray) -> np.dtype:
    return np.dtype(np.float16 if w.dtype == np.float16 else np.float32)
