"""kiln's CPU schedule for elementwise and layout functions: transposes, reshapes, (de)quantization of inputs.

dlight's CPU rules schedule matrix-vector products and reductions only; a fused function of elementwise ops and
transposes that no rule takes compiles as plain loops on one thread. Most are small, but some are not: the int8
EfficientNet's input quantization fused with its NCHW -> NHWC transpose took 323 us, MiniLM's four head
reshape/transposes 0.6 ms per call. :func:`elementwise_rule` inlines such a function into one loop nest and
computes it as::

    parallel over (leading loops, fused until there are enough iterations for the threads):
        for the rest of the loops:
            out[..., j : j + 8] = f(in[...])     # the last loop in vectors of 8 where 8 divides it

Functions of fewer than MIN_ELEMENTS outputs stay as they are: starting the threads costs more than they save.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.targets.tvm.gemm import LANES, MIN_TILES

#: Outputs below which a function stays single-threaded.
MIN_ELEMENTS = 4096


def elementwise_rule() -> Any:
    """The dlight rule (a class built on first use, so that importing kiln does not import TVM)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Elementwise(CPUScheduleRule):
        """A function whose blocks are all spatial and inline into one, with static extents."""

        def apply(self, func: tirx.PrimFunc, target: Any, tunable: bool) -> s_tir.Schedule | None:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not all(info.is_injective() for info in infos):
                return None
            infos = try_inline(sch, infos)
            if len(infos) != 1 or not all(isinstance(it.dom, int) for it in infos[0].iters):
                return None
            extents = [it.dom for it in infos[0].iters]
            if math.prod(extents) < MIN_ELEMENTS:
                return None
            loops = sch.get_loops(infos[0].block_rv)
            if extents[-1] % LANES == 0:
                loops[-1], lane = sch.split(loops[-1], [None, LANES])
                sch.vectorize(lane)
                extents[-1] //= LANES
            n = next((n for n in range(1, len(loops) + 1) if math.prod(extents[:n]) >= MIN_TILES), len(loops))
            sch.parallel(sch.fuse(*loops[:n]) if n > 1 else loops[0])
            return sch

    return Elementwise()
