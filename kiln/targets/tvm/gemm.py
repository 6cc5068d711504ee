"""kiln's CPU schedule for matrix products of many rows: prefill, encoders, batched attention.

Untuned, TVM runs a legalized ``matmul`` on a CPU as plain single-threaded scalar loops (dlight's CPU rules
cover matrix-vector products and reductions only), which made MiniLM at 128 tokens 57x slower than ONNX Runtime
(1270 ms against 22 ms), 98% of it in matmuls. :func:`gemm_rule` is a dlight rule that schedules such a function
(a matmul block, any batch loops before its two spatial ones, elementwise blocks after it: bias, GELU, residual)
the way a BLAS micro-kernel computes it::

    parallel over (batch, column tile J):
        panel[K, NR] = B[:, J : J + NR]                   # copied once per tile, contiguous
        for each row tile I:
            acc[MR, NR] = 0                               # MR x NR/8 AVX2 registers
            for k in K:
                acc[r, :] += A[I + r, k] * panel[k, :]    # one broadcast per row, NR/8 loads, fused multiply-adds
            out[I : I + MR, J : J + NR] = epilogue(acc)   # bias, activation, residual: fused, vectorized

The accumulators stay in registers (the tile's loops are unrolled and its lanes vectorized), so each B vector
feeds MR fused multiply-adds and each A value NR of them. Reading B through the contiguous panel instead of in
place (rows of NR floats, N apart) cut MiniLM's 128x1536x384 from 1.29 to 0.88 ms. B may be an activation too
(attention's ``Q K^T`` and ``P V``). MiniLM at 128 tokens: 24.1 ms against ONNX Runtime's 23.6 ms, untuned.
"""

from __future__ import annotations

from typing import Any

#: float32 lanes of one AVX2 register.
LANES = 8
#: (rows MR, columns NR) of a tile, in order of preference; the first whose columns divide N is taken (rows need not
#: divide M: the last row tile is then partial). Measured on MiniLM's 128x384x1536 (2 threads): 6x16 1.38 ms,
#: 4x24 1.44, 4x16 1.55, 2x32 1.66, 8x8 1.74, 3x32 2.50.
TILES = ((6, 16), (12, 8))


def tile_shape(n: int) -> tuple[int, int] | None:
    """(MR, NR) for an output of ``n`` columns; None when ``n`` is no multiple of 8."""
    return next(((mr, nr) for mr, nr in TILES if n % nr == 0), None)


def gemm_rule() -> Any:
    """The dlight rule (a class built on first use, so that importing kiln does not import TVM)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Gemm(CPUScheduleRule):
        """A matmul block with spatial loops ``[batch..., i, j]`` and one reduction ``k``, where ``j`` indexes the
        last axis of the output and of one operand (B, read as vectors) and not of the other (A, broadcast)."""

        def apply(self, func: tirx.PrimFunc, target: Any, tunable: bool) -> s_tir.Schedule | None:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
            if not infos or not 1 <= len(infos) <= 2 or (len(infos) == 2 and not infos[1].is_injective()):
                return None
            main, epilogue = infos[0], (infos[1] if len(infos) == 2 else None)
            kinds = "".join(it.kind for it in main.iters)
            if len(kinds) < 3 or kinds[-1] != "R" or kinds[:-1] != "S" * (len(kinds) - 1):
                return None
            operand = _vector_operand(sch, main)
            if operand is None or not all(isinstance(it.dom, int) for it in main.iters):
                return None
            *batch, i, j, k = (it.loop_rv for it in main.iters)
            shape = tile_shape(main.iters[-2].dom)
            if shape is None:
                return None
            rows, columns = shape
            block = main.block_rv
            row_tile, row = sch.split(i, [None, rows])
            column_tile, register, lane = sch.split(j, [None, columns // LANES, LANES])
            sch.reorder(*batch, column_tile, row_tile, k, row, register, lane)
            tile = sch.fuse(*batch, column_tile)
            sch.parallel(tile)
            panel = sch.cache_read(block, operand, "global")
            sch.transform_layout(
                panel, ("write", 0), lambda *ix: (*ix[:-2], ix[-1] // columns, ix[-2], ix[-1] % columns)
            )
            sch.compute_at(panel, tile)
            sch.vectorize(sch.get_loops(panel)[-1])
            if epilogue is None:
                out = sch.cache_write(block, 0, "local")
                sch.reverse_compute_at(out, row_tile)
            else:
                out = epilogue.block_rv
                sch.reverse_compute_at(out, row_tile)
                sch.set_scope(block, 0, "local")
            out_column = sch.get_loops(out)[-1]
            _, out_lane = sch.split(out_column, [None, LANES])
            sch.vectorize(out_lane)
            sch.vectorize(lane)
            sch.unroll(register)
            sch.unroll(row)
            sch.decompose_reduction(block, k)
            return sch

    return Gemm()


def _vector_operand(sch: Any, info: Any) -> int | None:
    """The index of B among the block's two inputs: the one whose last index is the innermost spatial iterator,
    which must also be the output's last index (B read as contiguous vectors, A as scalars); None if there is none
    or both are."""
    block = sch.get(info.block_rv)
    j = block.iter_vars[-2].var
    if len(block.reads) != 2 or len(block.writes) != 1 or not _last_index_is(block.writes[0], j):
        return None
    vectors = [i for i, r in enumerate(block.reads) if _last_index_is(r, j)]
    return vectors[0] if len(vectors) == 1 else None


def _last_index_is(region: Any, var: Any) -> bool:
    last = region.region[-1]
    return int(last.extent) == 1 and last.min.same_as(var)
