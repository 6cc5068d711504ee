"""ONNX -> Relax -> a compiled library, with MetaSchedule records where tuned and default rules elsewhere.

Flow (TVM 0.27): ``from_onnx`` with every weight as a Relax constant (so ``FoldConstant`` sees them and the
library carries them: there is no separate parameter file to keep in sync) -> kiln's scheduled matrix-vector kernels
for matmuls of a few rows (:mod:`kiln.targets.tvm.gemv`, CPU only) -> channels-last convolutions
(:mod:`kiln.targets.tvm.layout`, CPU only) -> :func:`legalize` (TVM's ``zero`` pipeline with polynomial
``erf``/``exp``) -> the tuning database's schedules (``MetaScheduleApplyDatabase``) -> :func:`default_rules` for the
functions still unscheduled (on a CPU kiln's depthwise convolution rule, :mod:`kiln.targets.tvm.depthwise`, and
matmul/convolution rule, :mod:`kiln.targets.tvm.gemm`, then dlight's GEMV and reduction rules, then kiln's
elementwise rule, :mod:`kiln.targets.tvm.elementwise`; what none matches stays plain loops) -> ``tvm.compile``.
On a GPU, dlight's fallback rule binds every remaining loop nest to blocks and threads, since an unbound one cannot
run there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import onnx

from kiln.errors import KilnError, describe
from kiln.targets.tvm import depthwise, elementwise, gemm

logger = logging.getLogger("kiln")


def llvm_target(mtriple: str, mcpu: str, mattr: tuple[str, ...] = (), num_cores: int = 0) -> Any:
    """A TVM LLVM target with an explicit triple (without one, TVM ignores ``mcpu`` and emits generic x86)."""
    import tvm

    spec: dict[str, Any] = {"kind": "llvm", "mtriple": mtriple}
    if mcpu:
        spec["mcpu"] = mcpu
    if mattr:
        spec["mattr"] = list(mattr)
    if num_cores:
        spec["num-cores"] = num_cores
    return tvm.target.Target(spec)


#: Limits every NVIDIA GPU since Volta shares; MetaSchedule's thread binding and shared-memory rules need them
#: (48 KiB is the static shared memory a block gets without opting in to more).
CUDA_LIMITS = {
    "max_threads_per_block": 1024,
    "max_shared_memory_per_block": 49152,
    "thread_warp_size": 32,
    "registers_per_block": 65536,
}


def cuda_target(arch: str, host: Any) -> Any:
    """A TVM CUDA target for ``arch`` (``sm_90``) whose host code is compiled for ``host`` (an LLVM target)."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch, **CUDA_LIMITS, "host": host})


def default_rules(target: Any) -> list[Any]:
    """The untuned schedule rules for ``target``'s kind, most specific first (on a CPU, kiln's own rules first)."""
    from tvm.s_tir import dlight

    if target.kind.name == "cuda":
        gpu = dlight.gpu
        return [gpu.Matmul(), gpu.GEMV(), gpu.LowBatchGEMV(), gpu.Reduction(), gpu.GeneralReduction(), gpu.Fallback()]
    return [
        depthwise.depthwise_rule(),
        gemm.gemm_rule(),
        dlight.cpu.GEMV(),
        _shared_rows_reduction(),
        elementwise.elementwise_rule(),
    ]


def _shared_rows_reduction() -> Any:
    """dlight's CPU Reduction rule, only where every block iterates over the same rows.

    The rule parallelizes the last block's leading spatial loop and computes every earlier block inside it. When a
    reduction has fewer rows than that loop (RMSNorm of one token: a sum over 576 values, then 576 outputs), the sum
    is recomputed for every output: 138 us instead of about 1 us, 61 times per SmolLM2 decode step. Such functions
    stay plain loops, which compute each block once.
    """
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    class SharedRowsReduction(dlight.cpu.Reduction):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            from tvm import s_tir

            try:
                infos = normalize_prim_func(s_tir.Schedule(func))
            except Exception:  # not a function dlight can analyse: leave it to the rule's own checks
                infos = None
            if infos and len({_leading_rows(info) for info in infos}) > 1:
                return None
            return super().apply(func, target, tunable)

    return SharedRowsReduction()


def _leading_rows(info: Any) -> Any:
    """The product of a block's leading spatial extents (a string where one is symbolic)."""
    rows = 1
    for it in info.iters:
        if it.kind != "S":
            break
        extent = getattr(it.dom, "value", None)
        if extent is None:
            return str(it.dom)
        rows *= int(extent)
    return rows


def rewrite_main(mod: Any, rewriter: Any) -> Any:
    """``mod`` with ``main`` rewritten by ``rewriter`` (a ``PyExprMutator`` built on ``mod``), dead bindings dropped."""
    from tvm import relax

    rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(mod["main"]))
    return relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get())


def host_cpu() -> str:
    """The host CPU as LLVM names it (``znver3``, ``skylake-avx512``, ...): selects AVX2/AVX-512/VNNI code."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def import_onnx(
    proto: onnx.ModelProto, shapes: Mapping[str, list[int]], converters: Mapping[str, Any] | None = None
) -> Any:
    """The Relax module of ``proto`` (static ``shapes``); importer failures become a KilnError naming the cause.
    ``converters`` add kiln's converters (by op type) for ops the importer lacks, for this import only."""
    from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

    builtin = onnx_frontend._get_convert_map
    if converters:
        onnx_frontend._get_convert_map = lambda: {**builtin(), **converters}
    try:
        return from_onnx(proto, shape_dict={k: list(v) for k, v in shapes.items()}, keep_params_in_input=False)
    except Exception as e:  # the importer raises anything from ValueError to TVM internal errors
        raise KilnError(f"TVM's ONNX importer failed: {describe(e)}") from None
    finally:
        onnx_frontend._get_convert_map = builtin


def legalize(mod: Any, target: Any) -> Any:
    """Relax -> fused TIR functions (what tuning extracts tasks from and the schedules apply to): TVM's ``zero``
    pipeline, with ``erf`` and ``exp`` in their polynomial forms.

    ``FastMathTransform`` rewrites ``erf``, ``exp`` and ``tanh`` (softmax included), and GELU is legalized with
    ``fast_erf`` (TVM's own GELU calls ``erf``): the polynomial forms vectorize, where the C library's are scalar
    calls. Measured on 2^20 values: erf 9.2 -> 0.29 ms (max abs error 3.3e-7), exp 1.5 -> 0.25 ms (max relative
    error 1.7e-7). MiniLM's GELUs took 7 of its 35 ms; ONNX Runtime's kernels also use approximations of this order.
    """
    import tvm
    from tvm import relax, tirx, topi

    def fast_gelu(bb: Any, call: Any) -> Any:
        def gelu(x: Any) -> Any:
            half = tirx.const(0.5, x.dtype)
            return x * (half + topi.fast_erf(x * tirx.const(0.5**0.5, x.dtype)) * half)

        return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")

    passes = [
        relax.transform.FastMathTransform(),
        relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.gelu": fast_gelu}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def schedule(mod: Any, target: Any, database: Any | None) -> Any:
    """Apply tuned schedules from ``database`` (if any), then dlight defaults to the rest; on a CPU, the weight
    panels of kiln's matmul rule are laid out once here (:func:`prepack_weights`), not copied on every call."""
    from tvm import relax
    from tvm.s_tir import dlight

    cpu = target.kind.name == "llvm"
    with target:
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        if cpu:
            mod = _used_functions(relax.transform.AttachAttrLayoutFreeBuffers()(mod))
        mod = dlight.ApplyDefaultSchedule(*default_rules(target))(mod)
        if cpu:
            mod = prepack_weights(mod)
    return mod


def prepack_weights(mod: Any) -> Any:
    """Constant weights in the panel layout kiln's matmul rule reads (:mod:`kiln.targets.tvm.gemm`), computed at
    compile time: the rule marks a panel of a constant weight as a layout-rewrite block,
    ``SplitLayoutRewritePreproc`` moves those blocks into functions of their own, and ``FoldConstant`` runs them
    on the weights."""
    from tvm import relax

    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    return _used_functions(relax.transform.FoldConstant()(mod))


def _used_functions(mod: Any) -> Any:
    """``mod`` without the TIR functions no Relax function calls (``DeadCodeElimination`` keeps any that has a
    ``global_symbol``, as kiln's GEMV kernels have, and ``AttachAttrLayoutFreeBuffers`` leaves their originals)."""
    import tvm
    from tvm import relax

    used: set[str] = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: used.add(e.name_hint) if isinstance(e, tvm.ir.GlobalVar) else None
            )
    kept = {gv: f for gv, f in mod.functions_items() if isinstance(f, relax.Function) or gv.name_hint in used}
    pruned = tvm.IRModule(kept, attrs=mod.attrs)
    for name, infos in mod.global_infos.items():
        pruned.update_global_info(name, infos)
    return pruned


def compile_module(mod: Any, target: Any) -> Any:
    """The Relax VM executable of a scheduled module."""
    import tvm

    try:
        return tvm.compile(mod, target)
    except Exception as e:
        where = target.attrs.get("arch") or target.attrs.get("mtriple")
        raise KilnError(f"TVM failed to compile the model for {target.kind.name} {where}: {describe(e)}") from None


def cuda_kernels(library: Any) -> int:
    """How many CUDA kernels (``__global__`` functions) a compiled executable's device modules hold."""
    pending, kernels = [library.mod], 0
    while pending:
        module = pending.pop()
        pending.extend(module.imports)
        if module.kind == "cuda":
            kernels += str(module.inspect_source()).count("__global__")
    return kernels


def count_scheduled(mod: Any) -> tuple[int, int]:
    """(scheduled, total) TIR functions of ``mod``."""
    from tvm import tirx

    funcs = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    done = sum(1 for f in funcs if f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False)))
    return done, len(funcs)
