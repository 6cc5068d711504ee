"""kiln's CPU schedule for depthwise convolutions in channels-last layout (MobileNet and EfficientNet blocks).

A depthwise convolution is no matrix product: output channel c reads input channel c only, so nothing is shared
across the output's pixels but the window's weights, and the input is read as vectors, like the weight.
:func:`depthwise_rule` computes it as::

    parallel over (leading loops, channel tile C of NC):        # and output rows where the tiles are few
        for each output row y, tile X of R pixels of that row:  # R divides the row: no partial tile
            acc[R, NC] = 0                                      # R x NC/8 AVX2 registers
            for ry in window rows:
                for rx in window columns (unrolled):
                    acc[r, :] += in[y*s + ry, (X + r)*s + rx, C] * w[ry, rx, C]   # r unrolled too
            out[y, X : X + R, C] = epilogue(acc)                # bias, ReLU6: fused, vectorized

With ``rx`` and ``r`` unrolled, a stride-1 window reads pixel ``X + r + rx`` once for all the ``(r, rx)`` that
share it (LLVM merges the equal loads). Zero padding stays a condition on the pixel's row and column.

gemm's rule (:mod:`kiln.targets.tvm.gemm`), which took these before, tiles rows in sixes with a partial last
tile, copies the weight into a panel and keeps the window loops rolled. EfficientNet-Lite0's twelve depthwise
convolutions, timed inside the model (instrumented VM, both libraries interleaved): 1.93 ms in all with gemm's rule,
1.28 ms with this one; timed alone, each function 1.1-2.2x faster in one run, 1.3-4.9x in another.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.targets.tvm.gemm import LANES, MIN_TILES, reduction_blocks

#: (pixels R, channels NC) of a tile, in order of preference; the first whose R divides the output row and whose
#: NC divides the channels is taken. Measured on EfficientNet-Lite0, each function alone: 7x8 best or within 5% of
#: the best on rows of 28, 14 and 7 pixels (2x32 ties it on 14); on rows of 56 and 112, 4x16 is 5-25% faster.
TILES = ((7, 8), (4, 16), (2, 32), (2, 16), (4, 8), (2, 8), (1, 16), (1, 8))
#: Rows of at least this many pixels prefer 4x16 tiles.
LONG_ROW = 56


def tile_shape(row: int, channels: int) -> tuple[int, int] | None:
    """(R, NC) for a row of ``row`` output pixels and ``channels`` channels; None without whole vectors."""
    order = ((4, 16), *TILES) if row >= LONG_ROW else TILES
    return next(((r, nc) for r, nc in order if row % r == 0 and channels % nc == 0), None)


def depthwise_rule() -> Any:
    """The dlight rule (a class built on first use, so that importing kiln does not import TVM)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Depthwise(CPUScheduleRule):
        """A block with spatial loops ``[leading..., x, c]`` then reductions (the window), whose output, weight and
        input are all indexed by ``c`` last (the input by ``c`` plus reductions of extent 1): each channel of the
        output is a function of the same channel of the input. Elementwise blocks after it fuse into the tile."""

        def apply(self, func: tirx.PrimFunc, target: Any, tunable: bool) -> s_tir.Schedule | None:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            found = reduction_blocks(sch)
            if found is None:
                return None
            infos, spatial = found
            main = infos[0]
            if not _channelwise(sch, main, spatial):
                return None
            shape = tile_shape(main.iters[spatial - 2].dom, main.iters[spatial - 1].dom)
            if shape is None:
                return None
            pixels, channels = shape
            block = main.block_rv
            if len(infos) == 2:
                out = infos[1].block_rv
                sch.set_scope(block, 0, "local")
            else:
                out = sch.cache_write(block, 0, "local")
            loops = sch.get_loops(block)
            extents = [int(sch.get(lp).extent) for lp in loops]
            leading, (x, c), window = loops[: spatial - 2], loops[spatial - 2 : spatial], loops[spatial:]
            x_tile, pixel = sch.split(x, [None, pixels])
            c_tile, register, lane = sch.split(c, [None, channels // LANES, LANES])
            # the loop nest's first loops (a batch) and the channel tiles in parallel; the output's rows too when
            # those are too few for the threads (a 32-channel layer has 2 tiles of 16)
            c_tiles = extents[spatial - 1] // channels
            n_outer = next(
                (n for n in range(len(leading) + 1) if c_tiles * math.prod(extents[:n]) >= MIN_TILES), len(leading)
            )
            outer, rows = leading[:n_outer], leading[n_outer:]
            sch.reorder(*outer, c_tile, *rows, x_tile, *window, pixel, register, lane)
            sch.parallel(sch.fuse(*outer, c_tile))
            sch.reverse_compute_at(out, x_tile)
            _, out_lane = sch.split(sch.get_loops(out)[-1], [None, LANES])
            sch.vectorize(out_lane)
            sch.vectorize(lane)
            sch.unroll(register)
            sch.unroll(pixel)
            for loop in window[1:]:
                sch.unroll(loop)
            sch.decompose_reduction(block, window[0])
            return sch

    return Depthwise()


def _channelwise(sch: Any, info: Any, spatial: int) -> bool:
    """Whether the block's output, weight and input are each indexed by the last spatial iterator ``c`` last (the
    input's index may add reductions of extent 1: a group of one channel), and only the input uses the pixel ``x``."""
    import tvm
    from tvm import tirx

    block = sch.get(info.block_rv)
    if len(block.reads) != 2 or len(block.writes) != 1:
        return False
    iters = block.iter_vars
    x, c = iters[spatial - 2].var, iters[spatial - 1].var
    analyzer = tvm.sym.Analyzer()
    for it in iters[spatial:]:
        if int(it.dom.extent) == 1:
            analyzer.bind(it.var, tvm.ir.Range.from_min_extent(it.dom.min, 1))

    def last_is_c(region: Any) -> bool:
        last = region.region[-1]
        return int(last.extent) == 1 and analyzer.can_prove_equal(last.min, c)

    def uses_x(region: Any) -> bool:
        return any(v.same_as(x) for r in region.region for v in tirx.analysis.undefined_vars(r.min))

    if not last_is_c(block.writes[0]) or not all(last_is_c(r) for r in block.reads):
        return False
    return sorted(uses_x(r) for r in block.reads) == [False, True]
