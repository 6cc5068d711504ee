"""Convolutions in channels-last layout (NHWC activations, HWIO weights) for CPU targets.

ONNX convolutions are NCHW. Inner loops over the output channels of an NHWC convolution read a weight row
``W[ry, rx, c, :]`` and write an output row ``Y[n, y, x, :]`` contiguously, so they vectorize (kiln's
:mod:`kiln.targets.tvm.gemm` rule schedules them as a matrix product of the input pixels and a weight panel); in NCHW
the same loops stride by a whole image plane. EfficientNet-Lite0: 290 ms untuned in NCHW, 15.6 ms in NHWC before any
schedule, against ONNX Runtime's 7.7 ms.

:func:`channels_last` rewrites ``main``:

1. ``FoldConstant``, then a ``Clip`` with constant bounds (which TVM's importer emits as opaque ``call_tir`` of
   ``maximum`` and ``minimum`` on a scalar, after a NaN check of the bounds that folding removes) becomes the
   Relax ops ``maximum`` and ``minimum``, whose layout ``ConvertLayout`` can follow. Left opaque, every ReLU6 would
   sit between two transposes.
   Likewise ``quantize`` and ``dequantize`` with one scale and zero point for the whole tensor (QDQ models'
   activations), which ``ConvertLayout`` cannot follow, become their elementwise arithmetic (``round(x / s) + z``
   clamped by ``maximum``/``minimum`` and cast to the code type; ``(q - z) * s``), the operations TVM legalizes
   them to. Left as they are, every
   quantized activation of EfficientNet-Lite0 went NHWC -> NCHW -> NHWC: 16 of its 41 ms. A dequantize of such a
   quantize with the same scale and zero point (a QDQ pair) reads the clamped float codes, not their 8-bit cast:
   the two casts, exact on whole numbers within the code range, are gone from every convolution's epilogue.
2. ``ConvertLayout`` turns every ``conv2d`` into NHWC/HWIO: a transpose where a tensor enters or leaves the
   convolutional part (the image in, the pooled features out), the elementwise ops in between following the layout.
3. ``FoldConstant`` again, so that the weights are stored in HWIO, not transposed at run time.
"""

from __future__ import annotations

from typing import Any

from kiln.targets.tvm import relax_build


def channels_last(mod: Any) -> Any:
    """``mod`` with NHWC convolutions (module docstring); unchanged when it has none."""
    import tvm
    from tvm import relax

    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    if not any(isinstance(e, relax.Call) and e.op == conv2d for e in _calls(mod["main"])):
        return mod
    mod = relax.transform.FoldConstant()(mod)
    mod = _clip_as_ops(mod)
    mod = _qdq_as_ops(mod)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    return relax.transform.FoldConstant()(mod)


def _calls(func: Any) -> list:
    from tvm import relax

    found: list = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def _clip_as_ops(mod: Any) -> Any:
    """``call_tir(maximum*|minimum*, (x, scalar constant))`` -> ``relax.op.maximum|minimum(x, constant)``."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @relax.expr_functor.mutator
    class ClipAsOps(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if call.op != call_tir:
                return call
            name = call.args[0].name_hint.rstrip("0123456789")
            args = call.args[1].fields
            bound = args[-1] if len(args) == 2 else None
            value = getattr(bound, "value", None) if isinstance(bound, tvm.ir.expr.GenericConst) else None
            if name not in ops or value is None or len(value.shape) != 0:
                return call
            return ops[name](args[0], bound)

    return relax_build.rewrite_main(mod, ClipAsOps(mod))


def _qdq_as_ops(mod: Any) -> Any:
    """Per-tensor ``quantize``/``dequantize`` (scalar constant scale and zero point) -> elementwise Relax ops."""
    import numpy as np
    import tvm
    from tvm import relax

    quantize, dequantize, astype = (tvm.ir.Op.get(f"relax.{name}") for name in ("quantize", "dequantize", "astype"))

    def scalar(expr: Any) -> float | None:
        values = expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None
        return None if values is None or values.size != 1 else values.reshape(()).item()

    @relax.expr_functor.mutator
    class QdqAsOps(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.codes: list[tuple[Any, float, float]] = []  # (clamped float codes, scale, zero point)

        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if call.op not in (quantize, dequantize):
                return call
            x, scale, zero = call.args
            s, z = scalar(scale), scalar(zero)
            if s is None or z is None or str(call.attrs.out_dtype) not in ("uint8", "int8", "float32"):
                return call
            s_const, z_const = relax.const(np.float32(s)), relax.const(np.float32(z))
            if call.op == dequantize:
                if str(call.attrs.out_dtype) != "float32":
                    return call
                codes = self._float_codes(x, s, z)
                if codes is None:
                    codes = relax.op.astype(x, "float32")
                return relax.op.multiply(relax.op.subtract(codes, z_const), s_const)
            info = np.iinfo(str(call.attrs.out_dtype))
            value = relax.op.add(relax.op.round(relax.op.divide(x, s_const)), z_const)
            low, high = relax.const(np.float32(info.min)), relax.const(np.float32(info.max))
            # ConvertLayout cannot follow clip
            clamped = self.builder_.emit(relax.op.minimum(relax.op.maximum(value, low), high))
            self.codes.append((clamped, s, z))
            return relax.op.astype(clamped, str(call.attrs.out_dtype))

        def _float_codes(self, x: Any, s: float, z: float) -> Any:
            """The clamped float codes ``x`` was cast from, when ``x`` is a quantize rewritten here with scale ``s``
            and zero point ``z`` (casting them to 8 bits and back changes no value); else None."""
            bound = self.lookup_binding(x) if isinstance(x, relax.Var) else None
            if not isinstance(bound, relax.Call) or bound.op != astype:
                return None
            return next((c for c, cs, cz in self.codes if c.same_as(bound.args[0]) and (cs, cz) == (s, z)), None)

    return relax_build.rewrite_main(mod, QdqAsOps(mod))
