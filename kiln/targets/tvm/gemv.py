"""kiln's own CPU kernels for matrix-vector products (decode): float, MatMulNBits and shift-add weights.

dlight's CPU GEMV rule only schedules reductions along the contiguous axis, and ONNX's ``MatMul(x, W)`` with ``W``
[K, N] reduces along the strided one, so an untuned decode step ran every projection as plain scalar loops (SmolLM2
W4: 413 ms per token against ONNX Runtime's 18 ms). These kernels are written for that shape, ``x`` [M, K] with a
few rows (M <= :data:`MAX_ROWS`) times a constant weight, and come scheduled:

* **Layout**: the weight is re-laid out at compile time into tiles of :data:`TILE` output columns, tile-major
  (``[N / TILE, K, TILE]``), so each thread streams its tiles' bytes contiguously; N is padded to whole tiles.
* **Schedule**: tiles in parallel; in a tile, K in order and the TILE columns as TILE/8 registers of 8 lanes
  (AVX2), so the reduction needs no horizontal sums and no gathers.
* **Low-bit weights** stay packed (``bits`` 2, 4 or 8): a 32-bit word per column holds the codes of ``32 / bits``
  consecutive rows, so one load of 8 words feeds ``32 / bits`` rows of a register, each row a shift and a mask in
  the lanes (no byte-to-lane shuffles: 1.35x faster than a byte layout at SmolLM2's shapes). The product is
  computed per group of ``block`` rows without dequantizing a weight::

      y[n] = sum_g ( s[g, n] * sum_{k in g} x[k] * q[k, n]  -  s[g, n] * z[g, n] * sum_{k in g} x[k] )

  which costs a convert and a fused multiply-add per weight; the scale and zero point apply once per group.
  Measured (2 threads, weights rotated out of cache): 576x1536 4-bit in 31 us, 4096x4096 in 0.47 ms.
* **Shift-add weights** (``ai.kiln.ShiftAddMatMul``, ``W = sum_i 2^e_i * s_i`` with sign planes ``s_i``) stay as
  sign bits, 32 rows per word: per plane and group, each activation is added with its sign (a shift brings the
  bit to the lanes' sign and a blend picks ``x`` or ``-x``: no multiplication), and the group's sum is scaled by
  ``2^e`` once. 576x1536 with 3 planes in 138 us: each sign costs about a third of a 4-bit weight, so 3 planes
  cost more than 4 bits on this CPU (a table-lookup variant with 256-entry tables of 8 activations, gathered per
  lane, was no faster: 131 us). On x86 with AVX2 ``tvm-llvm`` calls kiln's C table-lookup kernel instead
  (:mod:`kiln.targets.tvm.shiftadd_lut`: 16-entry tables looked up with byte shuffles; SmolLM2 decode 16.0 ms per
  token against 26.0 ms on this kernel); ``shiftadd_kernel = "sign"`` keeps this one.

Numbers are those of ONNX Runtime's MatMulNBits up to float rounding (sums in a different order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from kiln.runtime_ops import shiftadd
from kiln.targets.tvm import shiftadd_lut

#: Output columns per tile: 8 AVX2 registers of 8 float32 accumulators.
TILE = 64
#: Lanes of one register.
LANES = 8
#: Rows of x up to which a matmul runs as these kernels (dequantizing a weight per row is cheaper than a float copy
#: of it up to a few rows; a prefill of 128 tokens is not a matrix-vector product).
MAX_ROWS = 4


def padded(n: int) -> int:
    """N rounded up to whole tiles."""
    return -(-n // TILE) * TILE


def tile_major(w: np.ndarray) -> np.ndarray:
    """``[K, N]`` -> ``[N_pad / TILE, K, TILE]`` (columns padded with zeros)."""
    k, n = w.shape
    out = np.zeros((k, padded(n)), dtype=w.dtype)
    out[:, :n] = w
    return np.ascontiguousarray(out.reshape(k, -1, TILE).transpose(1, 0, 2))


@dataclasses.dataclass
class PackedWeight:
    """A MatMulNBits weight as the kernel reads it: codes ``[K_pad, N]`` (uint8), scales and zero points ``[G, N]``."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block: int
    k: int
    kind = "packed"

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads: packed codes, scales and offsets."""
        return self.codes.size * self.bits // 8 + 2 * self.scales.nbytes

    @property
    def fits(self) -> bool:
        """Groups of whole 32-bit words (MatMulNBits' block sizes, powers of two from 16, always are)."""
        return self.block % (32 // self.bits) == 0

    def kernel(self, rows: int, n_pad: int) -> tuple[tuple, Callable[[], Any]]:
        """(a key naming the kernel's shape, a maker of the scheduled PrimFunc) for ``rows`` rows of x."""
        key = (self.kind, rows, self.k, n_pad, self.bits, self.block)
        return key, lambda: nbits_gemv(rows, self.k, n_pad, self.bits, self.block)

    def dequantize(self) -> np.ndarray:
        """The float32 ``[K, N]`` weight (the float fallback for matmuls with many rows)."""
        rows = np.arange(self.k) // self.block
        return (self.codes[: self.k].astype(np.float32) - self.zero_points[rows]) * self.scales[rows]

    def kernel_inputs(self) -> list[np.ndarray]:
        """(codes ``[N_pad / TILE, K_pad * bits / 32, TILE]`` uint32, scales and scale * zero point ``[N_pad / TILE,
        G, TILE]``): word ``[t, w, c]`` holds the codes of rows ``w * 32 / bits ...`` of column ``t * TILE + c``,
        row by row from the low bits."""
        scales = tile_major(self.scales.astype(np.float32))
        offsets = tile_major((self.scales * self.zero_points).astype(np.float32))
        return [_words(tile_major(self.codes), self.bits), scales, offsets]


@dataclasses.dataclass
class SignPlanes:
    """An ``ai.kiln.ShiftAddMatMul`` weight as the kernel reads it (``W = sum_i 2^e_i * s_i``, module
    :mod:`kiln.runtime_ops.shiftadd`)."""

    weight: shiftadd.PackedWeight
    kind = "shiftadd"

    @property
    def k(self) -> int:
        return self.weight.k

    @property
    def n(self) -> int:
        return self.weight.n

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    @property
    def fits(self) -> bool:
        """Groups of whole 32-row words (the kernel's unit): group sizes 32, 64, 128..."""
        return self.weight.group_size % 32 == 0

    def dequantize(self) -> np.ndarray:
        return shiftadd.dequantize(self.weight).astype(np.float32)

    def kernel(self, rows: int, n_pad: int) -> tuple[tuple, Callable[[], Any]]:
        bits, group = self.weight.bits, self.weight.group_size
        return (self.kind, rows, self.k, n_pad, bits, group), lambda: shiftadd_gemv(rows, self.k, n_pad, bits, group)

    def kernel_inputs(self) -> list[np.ndarray]:
        """(sign words ``[N_pad / TILE, bits, K_pad / 32, TILE]`` uint32, bit ``j`` of word ``w`` set where row
        ``32 w + j`` of the plane is +1; scales ``[N_pad / TILE, bits * G, TILE]``, plane-major)."""
        w = self.weight
        groups = shiftadd.n_groups(w.k, w.group_size)
        k_pad = groups * w.group_size
        positive = np.zeros((w.bits, k_pad, w.n), dtype=np.uint8)
        positive[:, : w.k] = (shiftadd.signs(w) > 0).transpose(1, 2, 0)
        planes = np.stack([_words(tile_major(plane), 1) for plane in positive], axis=1)
        scales = shiftadd.scales(w.exponents, w.mantissa_bits).astype(np.float32)  # [N, bits, G]
        return [planes, tile_major(scales.reshape(w.n, -1).T)]


def _words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Tile-major codes ``[T, K_pad, TILE]`` -> uint32 words ``[T, K_pad * bits / 32, TILE]``: word ``w`` of a
    column holds rows ``w * 32 / bits ...`` from the low bits up."""
    per = 32 // bits
    t, k_pad, _ = codes.shape
    fields = codes.astype(np.uint32).reshape(t, k_pad // per, per, TILE)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[:, None]
    return np.bitwise_or.reduce(fields << shifts, axis=2)


def float_gemv(m: int, k: int, n_pad: int) -> Any:
    """Scheduled PrimFunc ``y[m, n_pad] = x[m, k] @ W`` with W tile-major ``[n_pad / TILE, k, TILE]``."""
    from tvm import te

    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n_pad // TILE, k, TILE), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((m, n_pad), lambda i, j: te.sum(x[i, r] * w[j // TILE, r, j % TILE], axis=r), name="y")
    return _schedule_tiles(te.create_prim_func([x, w, y]), "y", inner=None)


def nbits_gemv(m: int, k: int, n_pad: int, bits: int, block: int) -> Any:
    """Scheduled PrimFunc ``y = x @ dequantize(codes)`` on :meth:`PackedWeight.kernel_inputs` (module docstring)."""
    import tvm
    from tvm import te

    per = 32 // bits
    groups = -(-k // block)
    x = te.placeholder((m, k), "float32", name="x")
    codes = te.placeholder((n_pad // TILE, groups * block // per, TILE), "uint32", name="codes")
    scales = te.placeholder((n_pad // TILE, groups, TILE), "float32", name="scales")
    offsets = te.placeholder((n_pad // TILE, groups, TILE), "float32", name="offsets")
    mask = tvm.tirx.const((1 << bits) - 1, "uint32")
    padded_x = _padded_rows(x, groups * block)

    def code(row: Any, j: Any) -> Any:
        word = codes[j // TILE, row // per, j % TILE]
        return ((word >> (row % per * bits).astype("uint32")) & mask).astype("float32")

    kk = te.reduce_axis((0, block), name="kk")
    part = te.compute(
        (m, groups, n_pad),
        lambda i, g, j: te.sum(padded_x[i, g * block + kk] * code(g * block + kk, j), axis=kk),
        "part",
    )
    kx = te.reduce_axis((0, block), name="kx")
    sums = te.compute((m, groups), lambda i, g: te.sum(padded_x[i, g * block + kx], axis=kx), name="sums")
    g = te.reduce_axis((0, groups), name="g")
    y = te.compute(
        (m, n_pad),
        lambda i, j: te.sum(
            scales[j // TILE, g, j % TILE] * part[i, g, j] - offsets[j // TILE, g, j % TILE] * sums[i, g], axis=g
        ),
        name="y",
    )
    return _schedule_tiles(te.create_prim_func([x, codes, scales, offsets, y]), "y", inner="part", word_rows=per)


def shiftadd_gemv(m: int, k: int, n_pad: int, bits: int, group: int) -> Any:
    """Scheduled PrimFunc ``y = x @ W`` on :meth:`SignPlanes.kernel_inputs`: per plane and group, the activations
    added with the plane's signs (``x`` or ``-x`` picked by the sign bit: no multiplication), then the group's sum
    scaled by ``2^e``."""
    import tvm
    from tvm import te

    groups = -(-k // group)
    x = te.placeholder((m, k), "float32", name="x")
    words = te.placeholder((n_pad // TILE, bits, groups * group // 32, TILE), "uint32", name="words")
    scales = te.placeholder((n_pad // TILE, bits * groups, TILE), "float32", name="scales")
    padded_x = _padded_rows(x, groups * group)

    def signed(i: Any, q: Any, row: Any, j: Any) -> Any:
        word = words[j // TILE, q // groups, row // 32, j % TILE]
        # bit (row % 32) moved to the sign: a shift and a blend on the sign bit per 8 lanes
        negative = tvm.tirx.reinterpret("int32", word << (31 - row % 32).astype("uint32")) >= 0
        value = padded_x[i, row]
        return te.if_then_else(negative, -value, value)

    kk = te.reduce_axis((0, group), name="kk")
    part = te.compute(
        (m, bits * groups, n_pad),
        lambda i, q, j: te.sum(signed(i, q, q % groups * group + kk, j), axis=kk),
        name="part",
    )
    q = te.reduce_axis((0, bits * groups), name="q")
    y = te.compute((m, n_pad), lambda i, j: te.sum(scales[j // TILE, q, j % TILE] * part[i, q, j], axis=q), name="y")
    return _schedule_tiles(te.create_prim_func([x, words, scales, y]), "y", inner="part", word_rows=32)


def _padded_rows(x: Any, rows: int) -> Any:
    """``x`` [m, k] with zero columns up to ``rows`` (a ragged last group), computed once before the tiles: a bound
    check inside the kernel's inner loop cost 40% of its time."""
    import tvm
    from tvm import te

    m, k = (int(d) for d in x.shape)
    if rows == k:
        return x
    zero = tvm.tirx.const(0, "float32")
    return te.compute((m, rows), lambda i, r: te.if_then_else(r < k, x[i, te.min(r, k - 1)], zero), name="padded_x")


def _schedule_tiles(func: Any, out: str, inner: str | None, word_rows: int = 1) -> Any:
    """Tiles of TILE columns in parallel, lanes vectorized, accumulators in registers; ``inner`` (a per-group
    partial product) computed per tile and group in registers, its rows unrolled ``word_rows`` at a time (the rows
    one word of codes holds)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock(out)
    i, j, r = sch.get_loops(block)
    tile, column = sch.split(j, [None, TILE])
    register, lane = sch.split(column, [None, LANES])
    sch.reorder(tile, i, r, register, lane)
    sch.parallel(tile)
    sch.reverse_compute_at(sch.cache_write(block, 0, "local"), tile)
    if inner is not None:
        part = sch.get_sblock(inner)
        sch.compute_at(part, r)
        *_, p_column, p_row = sch.get_loops(part)
        p_register, p_lane = sch.split(p_column, [None, LANES])
        p_word, p_bits = sch.split(p_row, [None, word_rows])
        sch.reorder(p_word, p_bits, p_register, p_lane)
        sch.set_scope(part, 0, "local")
        sch.vectorize(p_lane)
        sch.unroll(p_register)
        sch.unroll(p_bits)
        sch.decompose_reduction(part, p_word)
    sch.vectorize(lane)
    sch.unroll(register)
    sch.decompose_reduction(block, r)
    return sch.mod["main"].with_attr({"tirx.is_scheduled": True, "op_pattern": 8})


def use_kernels(
    mod: Any, packed: Mapping[str, PackedWeight | SignPlanes], inputs: int, enabled: bool = True, lut: bool = False
) -> tuple[Any, dict[str, int]]:
    """Route ``main``'s matmuls by a constant (or packed) weight with at most MAX_ROWS rows of x to these kernels
    (CPU schedules: ``enabled=False`` on a GPU, where only the parameters are bound). With ``lut``, shift-add
    weights go to kiln's C table-lookup kernel instead (:mod:`kiln.targets.tvm.shiftadd_lut`, counted as
    ``shiftadd_lut``): the library then needs it registered where it runs.

    ``packed`` names the parameters of ``main`` that stand for MatMulNBits or ShiftAddMatMul weights (see
    :func:`kiln.targets.tvm.lower.prepare`); those still used by a matmul with more rows get their float weights
    bound as constants, and every such parameter leaves the signature, so ``main`` takes the model's ``inputs``
    first parameters only. Returns the module and counts of rewritten matmuls by kind.
    """
    import tvm
    from tvm import relax

    matmul, permute = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def __init__(self) -> None:
            super().__init__(mod)
            self.kernels: dict[tuple, Any] = {}
            self.counts: dict[str, int] = {"packed": 0, "shiftadd": 0, "shiftadd_lut": 0, "float": 0}

        def weight(self, expr: Any) -> tuple[str, Any] | None:
            """(kind, PackedWeight or SignPlanes) or ("float", [K, N] array) for a weight these kernels take."""
            if isinstance(expr, tvm.ir.expr.Var) and expr.name in packed:
                return packed[expr.name].kind, packed[expr.name]
            transposed = False
            bound = self.lookup_binding(expr) if isinstance(expr, tvm.ir.expr.Var) else None
            if isinstance(bound, relax.Call) and bound.op == permute and bound.args[0].ty.ndim == 2:
                # a 2-D permute_dims is the transpose (axes None or [1, 0]) or the identity ([0, 1])
                axes = bound.attrs.axes
                transposed, expr = axes is None or [int(a) for a in axes] == [1, 0], bound.args[0]
            value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.expr.GenericConst) else None
            if isinstance(value, tvm.runtime.Tensor) and value.dtype == "float32" and len(value.shape) == 2:
                array = value.numpy()
                return "float", array.T if transposed else array
            return None

        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if not enabled or call.op != matmul:
                return call
            x, w = call.args
            found = self.weight(w)
            shape = getattr(x.ty, "shape", None)
            if found is None or x.ty.dtype != "float32" or not isinstance(shape, relax.expr.ShapeExpr):
                return call
            dims = [d.value if isinstance(d, tvm.ir.prim.expr.IntImm) else None for d in shape.values]
            if len(dims) < 2 or None in dims:
                return call
            rows, k = int(np.prod(dims[:-1])), dims[-1]
            kind, weight = found
            weight_k, n = weight.shape if kind == "float" else (weight.k, weight.n)
            use_lut = kind == "shiftadd" and lut and shiftadd_lut.fits(weight.weight)
            if rows > MAX_ROWS or weight_k != k or (kind != "float" and not use_lut and not weight.fits):
                return call
            flat = x if len(dims) == 2 else self.builder_.emit(relax.op.reshape(x, (rows, k)))
            if use_lut:
                args = [relax.const(a) for a in shiftadd_lut.kernel_inputs(weight.weight)]
                out_type = relax.TensorType((rows, n), "float32")
                out = relax.call_dps_packed(shiftadd_lut.FUNCTION, [flat, *args], out_type)
                self.counts["shiftadd_lut"] += 1
                return out if len(dims) == 2 else relax.op.reshape(self.builder_.emit(out), (*dims[:-1], n))
            n_pad = padded(n)
            if kind == "float":
                key, make = ("float", rows, k, n_pad), lambda: float_gemv(rows, k, n_pad)
                args = [relax.const(tile_major(weight))]
            else:
                key, make = weight.kernel(rows, n_pad)
                args = [relax.const(a) for a in weight.kernel_inputs()]
            if key not in self.kernels:
                name = "kiln_gemv_" + "_".join(map(str, key))
                self.kernels[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
            out = relax.call_tir(self.kernels[key], [flat, *args], relax.TensorType((rows, n_pad), "float32"))
            if n_pad != n:
                out = relax.op.strided_slice(self.builder_.emit(out), axes=[1], begin=[0], end=[n])
            if len(dims) > 2:
                out = relax.op.reshape(self.builder_.emit(out), (*dims[:-1], n))
            self.counts[kind] += 1
            return out

    rewriter = Rewriter()
    main = mod.get_global_var("main")
    func = rewriter.visit_expr(mod["main"])
    used = {v.name for v in relax.analysis.free_vars(func.body)}
    kept = list(func.params[:inputs]) + [p for p in func.params[inputs:] if p.name in used]
    rewriter.builder_.update_func(main, relax.Function(kept, func.body, func.ret_ty, func.is_pure, func.attrs))
    mod = rewriter.builder_.get()
    leftover = {p.name: tvm.runtime.tensor(packed[p.name].dequantize()) for p in kept[inputs:]}
    if leftover:
        mod = relax.transform.BindParams("main", leftover)(mod)
    mod["main"] = mod["main"].with_attr("num_input", inputs)
    return relax.transform.DeadCodeElimination(["main"])(mod), rewriter.counts
