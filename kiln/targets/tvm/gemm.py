"""kiln's CPU schedule for matrix products of many rows and channels-last convolutions: prefill, encoders,
batched attention, CNNs.

Untuned, TVM runs a legalized ``matmul`` or ``conv2d`` on a CPU as plain single-threaded scalar loops (dlight's CPU
rules cover matrix-vector products and reductions only): MiniLM at 128 tokens took 1270 ms against ONNX Runtime's
22 ms, EfficientNet-Lite0 290 ms against 7 ms. :func:`gemm_rule` is a dlight rule that schedules such a function
(one reduction block, elementwise blocks after it: bias, GELU, ReLU6, residual) the way a BLAS micro-kernel
computes it::

    parallel over (batch loops B uses, column tile J):
        panel[K, NR] = B[:, J : J + NR]                   # copied once per tile, contiguous
        for each row tile I:
            acc[MR, NR] = 0                               # MR x NR/8 AVX2 registers
            for k in K:
                acc[r, :] += A[I + r, k] * panel[k, :]    # one broadcast per row, NR/8 loads, fused multiply-adds
            out[I : I + MR, J : J + NR] = epilogue(acc)   # bias, activation, residual: fused, vectorized

The accumulators stay in registers (the tile's loops are unrolled and its lanes vectorized), so each B vector
feeds MR fused multiply-adds and each A value NR of them. Reading B through the contiguous panel instead of in
place (rows of NR floats, N apart) cut MiniLM's 128x1536x384 from 1.29 to 0.88 ms. B may be an activation too
(attention's ``Q K^T`` and ``P V``, batched over heads).

A channels-last convolution (:mod:`kiln.targets.tvm.layout`) has the same shape: rows are output pixels, columns
output channels, K the window times the input channels, B the HWIO weight; in a depthwise one A is read as vectors
too (:mod:`kiln.targets.tvm.depthwise`'s rule, ahead of this one, takes those with whole vectors of channels).
The output's rows of pixels are loops B does not use, so they run inside a column tile (its panel copied once)
unless the tiles are too few for the threads.

Where B is a constant weight, its panels are not copied per call: the copy is marked as a layout rewrite, which
:func:`kiln.targets.tvm.relax_build.prepack_weights` computes once at compile time (MiniLM 21.8 -> 20.5 ms).

Measured with ``tools/tvm_bench.py`` (untuned, 2 threads, interleaved with ONNX Runtime fp32 in one process):
MiniLM 20.3 ms against ONNX Runtime's 23.5 ms; EfficientNet-Lite0 6.80 ms against 6.66 ms, its depthwise
convolutions scheduled by :mod:`kiln.targets.tvm.depthwise`.
"""

from __future__ import annotations

import math
from typing import Any

#: float32 lanes of one AVX2 register.
LANES = 8
#: (rows MR, columns NR) of a tile, in order of preference; the first whose columns divide N is taken (rows need not
#: divide M: the last row tile is then partial). Measured on MiniLM's 128x384x1536 (2 threads): 6x16 1.38 ms,
#: 4x24 1.44, 4x16 1.55, 2x32 1.66, 8x8 1.74, 3x32 2.50.
TILES = ((6, 16), (4, 16), (4, 24), (2, 40), (12, 8))
#: Below this many terms per output (K), a tile whose rows divide M is preferred: with few multiply-adds per tile, a
#: partial last tile costs more than the 4x16 tile's lower reuse. EfficientNet-Lite0's 1x1 convs with K of 16 to 40
#: and its first conv (K = 27), each timed alone: 6x16 with a partial tile 0.21-0.65 ms, 4x16 1.5-1.9x faster;
#: with K of 80 and more 4x16 is 0-8% slower than 6x16.
SHORT_K = 64


def tile_shape(n: int, m: int = 0, k: int = 0) -> tuple[int, int] | None:
    """(MR, NR) for an output of ``m`` rows and ``n`` columns summing ``k`` terms each (``m`` and ``k`` only matter
    below SHORT_K); None when ``n`` is no multiple of 8."""
    fits = [(mr, nr) for mr, nr in TILES if n % nr == 0]
    if 0 < k < SHORT_K:
        fits = [t for t in fits if m % t[0] == 0] + fits
    return fits[0] if fits else None


#: (MR, NR) of a tile of int16 products (:func:`int_tile_shape`), in order of preference; MR must divide the rows
#: (tensorize takes no partial tile). Measured on 128x384 @ 384x1536 (2 threads): 4x16 1.41 ms, 8x8 1.49, 4x8 1.58,
#: 2x32 1.97, 4x24 2.40, against 1.9-2.5 ms for the float32 tile in the same runs. 7x8 is for 7 x 7 maps (1x1
#: convolutions of int8 CNNs), where it was 10-20% faster than 1x16; on rows of 14, 2x16 beats it. Where the tile
#: found has fewer than 4 rows, the rule fuses a convolution's rows of pixels and looks again (14 x 14 -> 196 rows in
#: 4x16 tiles: 7-10% faster than 2x16 tiles over rows of 14).
INT_TILES = ((4, 16), (8, 8), (4, 8), (2, 16), (7, 8), (2, 8), (1, 16), (1, 8))


def int_tile_shape(m: int, n: int) -> tuple[int, int] | None:
    """(MR, NR) for an int16 product of ``m`` rows and ``n`` columns; None when ``n`` is no multiple of 8."""
    return next(((mr, nr) for mr, nr in INT_TILES if m % mr == 0 and n % nr == 0), None)


#: Rows are fused across a matmul's batch (a 1x1 convolution's output rows) when the last row tile would otherwise
#: waste more than this share: a 7x7 map as 49 rows in tiles of 6 instead of 7 rows of 7 pixels in tiles of 6 and 1
#: (192 -> 1152 channels: 0.206 -> 0.170 ms). Not below: each fused row's division and remainder cost more than the
#: waste of a 14x14 map (112 -> 672 channels: 0.209 ms unfused, 0.387 fused).
ROW_WASTE = 1.5
#: Parallel tiles below which the loops B does not depend on are parallelized too (at the cost of copying B's panel
#: once per iteration of them): a convolution with 16 or 32 output channels has only 1 or 2 column tiles.
MIN_TILES = 8


def gemm_rule() -> Any:
    """The dlight rule (a class built on first use, so that importing kiln does not import TVM)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Gemm(CPUScheduleRule):
        """A block with spatial loops ``[batch..., i, j]`` and reductions after them, where ``j`` is the last index
        of the output and of one operand (B, read as vectors): a matmul (one reduction), or a channels-last
        convolution (``i`` the output column, ``j`` the output channel, reductions over the window and the input
        channels; in a depthwise one A is read as vectors too)."""

        def apply(self, func: tirx.PrimFunc, target: Any, tunable: bool) -> s_tir.Schedule | None:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            found = reduction_blocks(sch, min_spatial=1)
            if found is None:
                return None
            infos, spatial = found
            if spatial == 1:  # one row (its unit loop normalized away)
                return sch if _int16_gemv(sch, func, infos, target) else None
            main = infos[0]
            reductions = len(main.iters) - spatial
            operand = _vector_operand(sch, main, spatial)
            if operand is None:
                return None
            block = main.block_rv
            pairs = _int16_pairs(sch.get(block), reductions, target)
            weight = sch.get(block).reads[operand].source.dtype  # int8 or int16 where pairs
            if pairs:
                shape = int_tile_shape(main.iters[spatial - 2].dom, main.iters[spatial - 1].dom)
            else:
                terms = math.prod(it.dom for it in main.iters[spatial:])
                shape = tile_shape(main.iters[spatial - 1].dom, main.iters[spatial - 2].dom, terms)
            if shape is None:
                return None
            rows, columns = shape
            # batch loops that B's indices use (attention's heads) run in parallel with the column tiles; the others
            # (a convolution's output rows, a batch sharing one weight) run inside a column tile, so that its panel
            # of B is copied once, or, with one reduction and a wasteful last row tile, fuse with i (ROW_WASTE)
            used = _vars_in(sch.get(block).reads[operand])
            outer = [n for n, it in enumerate(main.iters[: spatial - 2]) if any(it.var.same_as(v) for v in used)]
            if len(infos) == 2:
                out = infos[1].block_rv
                sch.set_scope(block, 0, "local")
            else:
                out = sch.cache_write(block, 0, "local")
            last_rows = main.iters[spatial - 2].dom
            inner = [n for n in range(spatial - 2) if n not in outer]
            fuse = False
            if inner and reductions == 1:
                fuse = -(-last_rows // rows) * rows > ROW_WASTE * last_rows
                if pairs and rows < 4:  # int16 tiles cannot be partial: find a taller one over the fused rows
                    all_rows = last_rows * math.prod(main.iters[n].dom for n in inner)
                    taller = int_tile_shape(all_rows, main.iters[spatial - 1].dom)
                    if taller is not None and taller[0] > rows:
                        fuse, (rows, columns) = True, taller
            if fuse:
                if not _fuse_rows(sch, block, out, main.iters, outer, [*inner, spatial - 2], spatial):
                    return None
                inner, spatial = [], len(outer) + 2
                outer = list(range(len(outer)))
            loops = sch.get_loops(block)
            extents = [int(sch.get(lp).extent) for lp in loops]
            i, j = loops[spatial - 2 : spatial]
            row_tile, row = sch.split(i, [None, rows])
            column_tile, register, lane = sch.split(j, [None, columns // LANES, LANES])
            parallel = math.prod(extents[n] for n in outer) * (extents[spatial - 1] // columns)
            if parallel < MIN_TILES:  # too few tiles for the threads: B's panel copied per row of the output
                parallel *= math.prod(extents[n] for n in inner)
                outer, inner = sorted(outer + inner), []
            chunks = []
            if parallel < MIN_TILES:  # still too few: rows in chunks too (whole tiles where tensorized)
                n_tiles = -(-extents[spatial - 2] // rows)
                n_chunks = -(-MIN_TILES // parallel)
                if pairs:
                    n_chunks = next((c for c in range(n_chunks, n_tiles + 1) if n_tiles % c == 0), 1)
                if n_chunks > 1:
                    chunk, row_tile = sch.split(row_tile, [n_chunks, None])
                    chunks = [chunk]
            reduction = loops[spatial:]
            if pairs:  # k in pairs, the innermost loop: one pmaddwd per (row, 8 columns, 2 k)
                reduction = [*sch.split(reduction[0], [None, 2])]
                pair = [reduction.pop()]
            else:
                pair = []
            sch.reorder(
                *[loops[n] for n in outer],
                column_tile,
                *chunks,
                *[loops[n] for n in inner],
                row_tile,
                *reduction,
                row,
                register,
                lane,
                *pair,
            )
            tile = sch.fuse(*[loops[n] for n in outer], column_tile, *chunks)
            sch.parallel(tile)
            if pairs:
                _panel(sch, func, block, operand, tile, _pair_layout(columns))
            else:
                _panel(
                    sch, func, block, operand, tile, lambda *ix: (*ix[:-2], ix[-1] // columns, ix[-2], ix[-1] % columns)
                )
            _vector_epilogue(sch, out, row_tile)
            if not pairs:
                sch.vectorize(lane)
            sch.unroll(register)
            sch.unroll(row)
            init = sch.decompose_reduction(block, sch.get_loops(block)[2 + len(inner)])
            if pairs:
                sch.vectorize(sch.get_loops(init)[-1])
                sch.tensorize(lane, _pmaddwd_intrin(weight))
            return sch

    return Gemm()


def reduction_blocks(sch: Any, min_spatial: int = 2) -> tuple[list, int] | None:
    """The block infos of ``sch``'s function (a reduction, then at most one elementwise block) and the reduction's
    count of leading spatial iterators, when it has static extents, ``min_spatial`` or more spatial iterators and one
    or more reductions after them; else None. What kiln's matmul and depthwise rules take, before their own checks."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

    infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
    if not infos or not 1 <= len(infos) <= 2 or (len(infos) == 2 and not infos[1].is_injective()):
        return None
    iters = infos[0].iters
    kinds = "".join(it.kind for it in iters)
    spatial = len(kinds.rstrip("R"))  # the iterators after the spatial prefix are reductions
    if spatial < min_spatial or spatial == len(kinds) or kinds[:spatial] != "S" * spatial:
        return None
    return (infos, spatial) if all(isinstance(it.dom, int) for it in iters) else None


def _int16_gemv(sch: Any, func: Any, infos: list, target: Any) -> bool:
    """Schedule a one-row int16 product ``C[j] = sum_k A[k] * B[k, j]`` (an int8-dynamic matmul at batch 1) as 1 x NR
    ``vpmaddwd`` tiles in parallel over the columns, B in panels as in the rule's matmuls; False (nothing scheduled)
    for anything else. Left to dlight's reduction rule, EfficientNet-Lite0's 1280 -> 1000 classifier took 0.8-1.0 ms
    (the float32 GEMV kernel's 0.22)."""
    main = infos[0]
    block = main.block_rv
    operand = next((n for n, r in enumerate(sch.get(block).reads) if _last_index_is(r, main.iters[0].var)), None)
    shape = int_tile_shape(1, main.iters[0].dom)
    if len(main.iters) != 2 or operand is None or shape is None or not _int16_pairs(sch.get(block), 1, target):
        return False
    columns, weight = shape[1], sch.get(block).reads[operand].source.dtype
    if len(infos) == 2:
        out = infos[1].block_rv
        sch.set_scope(block, 0, "local")
    else:
        out = sch.cache_write(block, 0, "local")
    j, k = sch.get_loops(block)
    tile, register, lane = sch.split(j, [None, columns // LANES, LANES])
    k_pairs, pair = sch.split(k, [None, 2])
    sch.reorder(tile, k_pairs, register, lane, pair)
    sch.parallel(tile)
    _panel(sch, func, block, operand, tile, _pair_layout(columns))
    _vector_epilogue(sch, out, tile)
    sch.unroll(register)
    init = sch.decompose_reduction(block, k_pairs)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lane, _pmaddwd_intrin(weight))
    return True


def _panel(sch: Any, func: Any, block: Any, operand: int, tile: Any, layout: Any) -> None:
    """B (read ``operand`` of ``block``) through a panel laid out by ``layout``: computed once at compile time for a
    constant B (:func:`kiln.targets.tvm.relax_build.prepack_weights`), else copied once per iteration of ``tile``."""
    constant = _layout_free(func, sch.get(block).reads[operand].source)  # before cache_read replaces the read
    panel = sch.cache_read(block, operand, "global")
    sch.transform_layout(panel, ("write", 0), layout)
    if constant:
        sch.annotate(panel, "meta_schedule.layout_rewrite_preproc", True)
    else:
        sch.compute_at(panel, tile)
        sch.vectorize(sch.get_loops(panel)[-1])


def _pair_layout(columns: int) -> Any:
    """[..., K, N] -> [..., N / NR, K / 2, NR, 2]: a ``vpmaddwd``'s 8 columns x 2 k are 16 contiguous values."""
    return lambda *ix: (*ix[:-2], ix[-1] // columns, ix[-2] // 2, ix[-1] % columns, ix[-2] % 2)


def _vector_epilogue(sch: Any, out: Any, loop: Any) -> None:
    """The block ``out`` (bias, activation, rescale) computed inside ``loop``, in vectors."""
    sch.reverse_compute_at(out, loop)
    _, lane = sch.split(sch.get_loops(out)[-1], [None, LANES])
    sch.vectorize(lane)


def _fuse_rows(sch: Any, block: Any, out: Any, iters: list, outer: list[int], fused: list[int], spatial: int) -> bool:
    """Fuse the spatial iterators ``fused`` (the last is i) of ``block`` into one row iterator, placed after the
    ``outer`` ones: the block's iteration space, its output buffer (local) and the iteration space of ``out``, the
    block reading it. False (nothing changed) when the buffer's axes for ``fused`` are not adjacent."""
    from tvm.tirx import IndexMap

    region = sch.get(block).writes[0].region
    axes = [next((n for n in fused if iters[n].var.same_as(r.min)), None) for r in region]
    found = [a for a, n in enumerate(axes) if n is not None]
    if [axes[a] for a in found] != fused or found != list(range(found[0], found[0] + len(fused))):
        return False
    doms = [iters[n].dom for n in fused]

    def row(values: list) -> Any:
        value = values[0]
        for v, dom in zip(values[1:], doms[1:]):
            value = value * dom + v
        return value

    def rows_of(*v: Any) -> tuple:
        return (*[v[n] for n in outer], row([v[n] for n in fused]), *v[spatial - 1 :])

    first, last = found[0], found[-1]
    sch.transform_layout(block, ("write", 0), lambda *ix: (*ix[:first], row(ix[first : last + 1]), *ix[last + 1 :]))
    sch.transform_block_layout(block, IndexMap.from_func(rows_of, ndim=len(iters)))
    sch.transform_block_layout(out, IndexMap.from_func(rows_of, ndim=spatial))
    return True


def _layout_free(func: Any, buffer: Any) -> bool:
    """Whether ``buffer`` is a parameter of ``func`` that ``AttachAttrLayoutFreeBuffers`` marked as a constant."""
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    return free is not None and any(func.params[int(i)].same_as(buffer) for i in free)


def _vars_in(region: Any) -> list:
    """The variables a buffer region's indices use."""
    from tvm import tirx

    return [v for r in region.region for v in tirx.analysis.undefined_vars(r.min)]


def _vector_operand(sch: Any, info: Any, spatial: int) -> int | None:
    """The index of B among the block's two inputs: read as vectors (its last index is the innermost spatial
    iterator, which must be the output's last index too) and the same for every row (its indices do not use the
    row iterator: a weight, or attention's K^T per head); None if no input, or both, qualify."""
    block = sch.get(info.block_rv)
    i, j = block.iter_vars[spatial - 2].var, block.iter_vars[spatial - 1].var
    if len(block.reads) != 2 or len(block.writes) != 1 or not _last_index_is(block.writes[0], j):
        return None
    found = [
        n for n, r in enumerate(block.reads) if _last_index_is(r, j) and not any(v.same_as(i) for v in _vars_in(r))
    ]
    return found[0] if len(found) == 1 else None


def _last_index_is(region: Any, var: Any) -> bool:
    last = region.region[-1]
    return int(last.extent) == 1 and last.min.same_as(var)


def _int16_pairs(block: Any, reductions: int, target: Any) -> bool:
    """Whether ``block`` sums int16 x int16 (or int16 x int8, the weight kept in 8 bits) products into int32 over one
    reduction of even length on an AVX2 target: then pairs of k are summed by one ``vpmaddwd`` (16 products per
    instruction, against 8 per float32 fused multiply-add), which :mod:`kiln.targets.tvm.qdq` makes integer matmuls
    use."""
    from tvm.target import codegen

    reads = [r.source.dtype for r in block.reads]
    if block.writes[0].source.dtype != "int32" or reads not in (["int16", "int16"], ["int16", "int8"]):
        return False
    if reductions != 1:
        return False
    k = block.iter_vars[-1].dom.extent
    return int(k) % 2 == 0 and bool(codegen.target_has_features("avx2", target))


_PMADDWD = {"int16": "kiln_avx2_pmaddwd_8x2", "int8": "kiln_avx2_pmaddwd_8x2_s8"}


def _pmaddwd_intrin(weight: str = "int16") -> str:
    """Register (once) and name the tensor intrinsic ``C[j] += A[0] * B[j, 0] + A[1] * B[j, 1]`` for 8 columns j:
    int16 A, B of ``weight`` type (int8 is widened to int16 in the register, ``vpmovsxbw``, so an 8-bit weight is
    read at 8 bits), int32 sums; one ``vpmaddwd`` of A's pair broadcast to 8 lanes and B's 16 contiguous values."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = _PMADDWD[weight]
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((8, 2), weight, offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            for j, k in T.grid(8, 2):
                with T.sblock("update"):
                    vj, vk = T.axis.remap("SR", [j, k])
                    c[vj] = c[vj] + T.cast(a[vk], "int32") * T.cast(b[vj, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((8, 2), weight, offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(pair, 8), dtype="int16x16"),
                T.Cast("int16x16", b.vload([0, 0], dtype=weight + "x16")),
                dtype="int32x8",
            )

    TensorIntrin.register(name, desc, impl)
    return name
