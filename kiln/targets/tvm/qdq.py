"""QDQ matmuls and 1x1 convolutions as integer ones on CPU targets: int8 codes multiplied in integers, not
dequantized to float.

Math. kiln's static int8 (and ONNX Runtime's QDQ format) computes a quantized matmul as::

    Y = MatMul(DequantizeLinear(xq, sx, zx), DequantizeLinear(wq, sw, zw))
      = sum_k (xq[m, k] - zx) * sx * (wq[k, n] - zw[n]) * sw[n]
      = sx * sw[n] * sum_k (xq[m, k] - zx) * (wq[k, n] - zw[n])

with per-tensor activation parameters ``sx, zx`` and per-column (or per-tensor) weight parameters ``sw, zw``. The sum
is exact in int32 (|terms| <= 255^2, so K up to 33000). Left as it is, TVM's importer dequantizes both sides and
multiplies float32; :func:`integer_matmuls` rewrites the ONNX graph to the last line::

    Y = Mul(Cast(MatMulInteger(xq, wq, zx, zw), float), sx * sw)

which the importer turns into ``matmul(astype(xq, int32) - zx, astype(wq, int32) - zw)`` in int32. Both operands
fit in int16 (an 8-bit code minus an 8-bit zero point), so :func:`narrow` then gives the matmul int16 operands and
an int32 result, a constant weight whose centered codes fit in int8 (symmetric int8, kiln's default) staying int8:
a quarter of the bytes of the folded float weight, widened to int16 in registers; on AVX2 kiln's gemm rule
(:mod:`kiln.targets.tvm.gemm`)
sums pairs of products with ``vpmaddwd``, 16 multiply-adds per instruction against 8 per float32 fused
multiply-add. The rescale ``* sx * sw``, the bias and the next layer's QuantizeLinear stay elementwise and fuse into
the matmul's epilogue.

A 1x1 convolution at stride 1 without padding is the same product at every pixel (rows are pixels, K the input
channels): :func:`integer_convs` rewrites it to ``Mul(Cast(ConvInteger(...)), sx * sw) [+ bias]``. TVM's importer
has no ``ConvInteger``; :func:`importer_converters` adds one (``conv2d`` of the centered codes in int32), which
:func:`narrow` gives int16 operands, and after :mod:`kiln.targets.tvm.layout` the NHWC convolution is a matmul that
the gemm rule's ``vpmaddwd`` tiles take. Int8 EfficientNet-Lite0 (32 such convolutions; its depthwise ones and its
first, 3-channel one stay float): 6.98 -> 5.63 ms against ONNX Runtime fp32's 6.59 in the same run.

Only MatMul with a constant 2-D weight and Conv with a constant 1x1 kernel over an even number of input channels
are rewritten (other convolutions and activation x activation products keep the importer's float path); a pattern
with blocked quantization, a non-scalar activation scale, or a weight scale that is not per output column (channel)
is left alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, rewrite
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from kiln.targets.tvm import relax_build

_CODES = (ir.DataType.UINT8, ir.DataType.INT8)


def _params(node: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Scale and zero point (None when absent) of a DequantizeLinear; a non-constant one is None too. The codes are
    not read: a weight's stay on disk (external data) until the model is serialized."""
    values = [node.inputs[i] if i < len(node.inputs) else None for i in (1, 2)]
    return tuple(None if v is None or v.const_value is None else v.const_value.numpy() for v in values)


def _axis(node: ir.Node, rank: int) -> int:
    attr = node.attributes.get("axis")
    return (1 if attr is None else attr.as_int()) % rank


class QdqMatMulToInteger(RewriteRuleClassBase):
    """``MatMul(DQ(xq, sx, zx), DQ(wq, sw, zw))`` with a constant weight -> ``Mul(Cast(MatMulInteger(...)), sx*sw)``.

    Built with ``remove_nodes=False``: one dequantized activation often feeds Q, K and V, and the matched nodes are
    dropped once unused.
    """

    def pattern(self, op: Any, xq: ir.Value, wq: ir.Value) -> ir.Value:
        x = op.DequantizeLinear(xq, _allow_other_inputs=True, _outputs=["x"])
        w = op.DequantizeLinear(wq, _allow_other_inputs=True, _outputs=["w"])
        return op.MatMul(x, w)

    def check(self, context: Any, xq: ir.Value, wq: ir.Value, x: ir.Value, w: ir.Value, **_: Any) -> MatchResult:
        return _check_operands(MatchResult(), xq, wq, x, w, rank=2, channel_axis=1)

    def rewrite(self, op: Any, xq: ir.Value, wq: ir.Value, x: ir.Value, w: ir.Value, **_: Any) -> ir.Value:
        dx, dw = x.producer(), w.producer()
        (sx, zx), (sw, zw) = _params(dx), _params(dw)
        scale = (np.float32(sx.reshape(())) * sw.astype(np.float32)).astype(np.float32)
        # MatMulInteger takes the zero points as they are: a scalar, or one per column of the weight
        inputs = [xq, wq, dx.inputs[2] if zx is not None else None, dw.inputs[2] if zw is not None else None]
        while inputs[-1] is None:
            inputs.pop()
        acc = op.MatMulInteger(*inputs)
        return op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.initializer(ir.tensor(scale), name=f"{w.name}.scale"))


class DynamicQuantizeMatMulToInteger(RewriteRuleClassBase):
    """``com.microsoft.DynamicQuantizeMatMul(A, Wq, s[, z][, bias])`` (kiln's ``int8-dynamic``), which TVM's importer
    lacks, -> its standard form ``Mul(Cast(MatMulInteger(DynamicQuantizeLinear(A), Wq, z_a, z)), s_a * s) [+ bias]``
    (``quantize.dynamic-int8``'s "onnx" format)."""

    def pattern(self, op: Any, a: ir.Value, codes: ir.Value, scale: ir.Value) -> ir.Value:
        return op.DynamicQuantizeMatMul(
            a, codes, scale, _domain="com.microsoft", _allow_other_inputs=True, _outputs=["y"]
        )

    def rewrite(self, op: Any, a: ir.Value, codes: ir.Value, scale: ir.Value, y: ir.Value) -> ir.Value:
        node = y.producer()
        zero, bias = (node.inputs[i] if len(node.inputs) > i else None for i in (3, 4))
        a_q, a_scale, a_zero = op.DynamicQuantizeLinear(a, _outputs=3)
        inputs = [a_q, codes, a_zero] + ([zero] if zero is not None else [])
        # the weight's scales, then the activation's: each multiply has the output's shape, so both fuse into the
        # matmul's epilogue (a_scale * scale would be a separate [N] loop inside the matmul's function, which kiln's
        # gemm rule does not take)
        product = op.Mul(op.Mul(op.Cast(op.MatMulInteger(*inputs), to=ir.DataType.FLOAT), scale), a_scale)
        return product if bias is None else op.Add(product, bias)


class QdqConvToInteger(RewriteRuleClassBase):
    """``Conv(DQ(xq, sx, zx), DQ(wq, sw, zw)[, b])``, a 1x1 convolution with a constant weight, ->
    ``Mul(Cast(ConvInteger(xq, wq, zx, zw)), sx*sw) [+ b]``: the per-pixel matmul of the module docstring, with
    the weight's output channels first. Only 1x1 kernels at stride 1 without padding: there the convolution is a
    matrix product whose operand rows are contiguous pairs of input channels (an even count), which kiln's gemm
    rule sums with ``vpmaddwd``; other convolutions keep the importer's float path."""

    def pattern(self, op: Any, xq: ir.Value, wq: ir.Value) -> ir.Value:
        x = op.DequantizeLinear(xq, _allow_other_inputs=True, _outputs=["x"])
        w = op.DequantizeLinear(wq, _allow_other_inputs=True, _outputs=["w"])
        return op.Conv(x, w, _allow_other_inputs=True, _outputs=["y"])

    def check(
        self, context: Any, xq: ir.Value, wq: ir.Value, x: ir.Value, w: ir.Value, y: ir.Value, **_: Any
    ) -> MatchResult:
        result = MatchResult()
        conv = y.producer()
        codes = wq.const_value
        if codes is None or len(codes.shape) != 4 or tuple(codes.shape[2:]) != (1, 1):
            return result.fail(f"{conv.name}: weight is not a constant 1x1 kernel")
        if codes.shape[1] % 2:
            return result.fail(f"{conv.name}: odd input channel count {codes.shape[1]}")
        attrs = {name: conv.attributes[name].value for name in conv.attributes}
        if attrs.get("group", 1) != 1 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return result.fail(f"{conv.name}: grouped or auto-padded")
        if any(v != 1 for v in attrs.get("strides", [])) or any(attrs.get("pads", [])):
            return result.fail(f"{conv.name}: strided or padded")
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].dtype != ir.DataType.FLOAT:
            return result.fail(f"{conv.name}: bias is not float32")
        return _check_operands(result, xq, wq, x, w, rank=4, channel_axis=0)

    def rewrite(self, op: Any, xq: ir.Value, wq: ir.Value, x: ir.Value, w: ir.Value, y: ir.Value, **_: Any) -> ir.Value:
        conv, dx, dw = y.producer(), x.producer(), w.producer()
        (sx, zx), (sw, zw) = _params(dx), _params(dw)
        channels = [1, -1, 1, 1]
        scale = (np.float32(sx.reshape(())) * sw.astype(np.float32)).reshape(channels if sw.size > 1 else ())
        # zero weight zero points (symmetric int8) are left out: ONNX Runtime's ConvInteger takes no per-channel ones
        keep_zw = zw is not None and bool(np.any(zw))
        inputs = [xq, wq, dx.inputs[2] if zx is not None else None, dw.inputs[2] if keep_zw else None]
        while inputs[-1] is None:
            inputs.pop()
        kept = {k: v for k, v in conv.attributes.items() if k in ("dilations", "kernel_shape")}
        acc = op.ConvInteger(*inputs, **{k: v.value for k, v in kept.items()})
        scaled = op.Mul(
            op.Cast(acc, to=ir.DataType.FLOAT),
            op.initializer(ir.tensor(scale.astype(np.float32)), name=f"{w.name}.scale"),
        )
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if bias is None:
            return scaled
        shape = op.initializer(ir.tensor(np.array(channels, dtype=np.int64)), name=f"{w.name}.bias_shape")
        return op.Add(scaled, op.Reshape(bias, shape))


def _check_operands(
    result: MatchResult, xq: ir.Value, wq: ir.Value, x: ir.Value, w: ir.Value, rank: int, channel_axis: int
) -> MatchResult:
    """The conditions on a QDQ product's dequantized operands that a matmul and a convolution share: 8-bit codes, a
    per-tensor activation, a constant weight of ``rank`` dimensions quantized per tensor or per output channel
    (``channel_axis``: a matmul's columns, a convolution's first axis)."""
    dx, dw = x.producer(), w.producer()
    for node in (dx, dw):
        if node.attributes.get("block_size") is not None and node.attributes["block_size"].as_int():
            return result.fail(f"{node.name}: blocked quantization")
        if node.inputs[1].dtype != ir.DataType.FLOAT:
            return result.fail(f"{node.name}: scale is not float32")
    sx, zx = _params(dx)
    # an unannotated activation has its zero point's type (DequantizeLinear requires them equal)
    if (xq.dtype or (None if zx is None else ir.DataType.from_numpy(zx.dtype))) not in _CODES:
        return result.fail(f"{dx.name}: activation codes are not 8-bit")
    if wq.dtype not in _CODES:
        return result.fail(f"{dw.name}: weight codes are not 8-bit")
    if sx is None or sx.size != 1 or (len(dx.inputs) > 2 and dx.inputs[2] is not None and zx is None):
        return result.fail(f"{dx.name}: activation scale or zero point not a constant scalar")
    if zx is not None and zx.size != 1:
        return result.fail(f"{dx.name}: activation zero point not a scalar")
    codes, (sw, zw) = wq.const_value, _params(dw)
    if codes is None or len(codes.shape) != rank or sw is None:
        return result.fail(f"{dw.name}: weight is not a constant {rank}-D tensor")
    if len(dw.inputs) > 2 and dw.inputs[2] is not None and zw is None:
        return result.fail(f"{dw.name}: weight zero point not constant")
    if sw.size != 1 and (sw.shape != (codes.shape[channel_axis],) or _axis(dw, rank) != channel_axis):
        return result.fail(f"{dw.name}: weight scale is neither per tensor nor per output channel")
    if zw is not None and zw.size != sw.size:
        return result.fail(f"{dw.name}: weight zero point and scale differ in shape")
    return result


#: Ops TVM's ONNX importer lacks that :func:`importer_converters` adds.
CONVERTED_OPS = ("ConvInteger",)


def importer_converters() -> dict[str, Any]:
    """Converters for :data:`CONVERTED_OPS`, for :func:`kiln.targets.tvm.relax_build.import_onnx`: ``ConvInteger``
    (a standard op since opset 10) as ``conv2d`` of its codes minus their zero points in int32, which
    :func:`narrow` gives int16 operands."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    def centered(bb: Any, codes: Any, zero: Any, channels: bool) -> Any:
        value = relax.op.astype(codes, "int32")
        if zero is None:
            return value
        zero = bb.normalize(relax.op.astype(zero, "int32"))
        dims = [int(d) for d in zero.ty.shape]
        # a scalar (or one value) for the data; one per output channel for the weight, broadcast over [M, C, kH, kW]
        shape = [-1] + [1] * (len(codes.ty.shape) - 1) if channels and math.prod(dims) > 1 else []
        if dims != shape:  # narrow() recognizes a zero point that is an astype of a constant, so only where needed
            zero = relax.op.reshape(zero, shape)
        return relax.op.subtract(value, zero)

    class ConvInteger(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v10(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            zeros = [inputs[i] if len(inputs) > i else None for i in (2, 3)]
            data = centered(bb, inputs[0], zeros[0], channels=False)
            weight = centered(bb, inputs[1], zeros[1], channels=True)
            return onnx_frontend.Conv._impl_v11(bb, [bb.normalize(data), bb.normalize(weight), None], attr, params)

    return {"ConvInteger": ConvInteger}


def integer_matmuls(model: ir.Model) -> int:
    """Rewrite every eligible QDQ MatMul of ``model``'s main graph in place (module docstring); return the count."""
    return _apply(model, QdqMatMulToInteger.rule(remove_nodes=False))


def integer_convs(model: ir.Model) -> int:
    """Rewrite every eligible QDQ 1x1 Conv of ``model``'s main graph in place (:class:`QdqConvToInteger`); return
    the count."""
    return _apply(model, QdqConvToInteger.rule(remove_nodes=False), "ConvInteger")


def dynamic_matmuls(model: ir.Model) -> int:
    """Rewrite every DynamicQuantizeMatMul of ``model``'s main graph to standard ops in place; return the count."""
    return _apply(model, DynamicQuantizeMatMulToInteger.rule())


def _apply(model: ir.Model, rule: Any, op_type: str = "MatMulInteger") -> int:
    before = sum(n.op_type == op_type for n in model.graph)
    rewrite(model, pattern_rewrite_rules=RewriteRuleSet([rule]))
    return sum(n.op_type == op_type for n in model.graph) - before


def narrow(mod: Any) -> Any:
    """int32 ``matmul``s and ``conv2d``s whose operands are 8-bit codes minus a constant, or constants within int16,
    get int16 operands and keep their int32 result (module docstring); ``mod`` unchanged when it has none."""
    import tvm
    from tvm import relax

    matmul, conv2d, astype, subtract, reshape = (
        tvm.ir.Op.get(f"relax.{name}") for name in ("matmul", "nn.conv2d", "astype", "subtract", "reshape")
    )
    mod = relax.transform.FoldConstant()(mod)

    @relax.expr_functor.mutator
    class Narrow(relax.PyExprMutator):
        def _bound(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                found = self.lookup_binding(expr)
                return expr if found is None else found
            return expr

        def _constant(self, expr: Any) -> np.ndarray | None:
            """The values of a constant, of ``astype`` or ``reshape`` of one (the importer's zero points), or of
            ``subtract`` of two (a weight minus its zero points, which ``FoldConstant`` leaves: it does not fold a
            scalar's ``astype``), else None."""
            bound = self._bound(expr)
            if isinstance(bound, tvm.ir.expr.GenericConst):
                return bound.value.numpy()
            if isinstance(bound, relax.Call) and bound.op in (astype, reshape):
                values = self._constant(bound.args[0])
                if values is None:
                    return None
                return values.astype(str(bound.ty.dtype)).reshape([int(d) for d in bound.ty.shape])
            if isinstance(bound, relax.Call) and bound.op == subtract:
                lhs, rhs = (self._constant(a) for a in bound.args)
                return None if lhs is None or rhs is None else (lhs - rhs).astype(str(bound.ty.dtype))
            return None

        def _small(self, expr: Any, weight: bool = False) -> Any:
            """``expr`` as int16, or None where its values might not fit; a constant ``weight`` whose values fit
            in int8 (symmetric int8 codes) as int8, which kiln's gemm rule widens in registers, so that it is
            read at half the bytes."""
            values = self._constant(expr)
            if values is not None:
                if values.dtype != np.int32 or not values.size:
                    return None
                for narrow in (np.int8, np.int16)[0 if weight else 1 :]:
                    info = np.iinfo(narrow)
                    if info.min <= values.min() and values.max() <= info.max:
                        return relax.const(values.astype(narrow))
                return None
            bound = self._bound(expr)
            if isinstance(bound, relax.Call) and bound.op == subtract:
                zero = self._constant(bound.args[1])
                fixed = zero is not None and zero.size == 1 and abs(int(zero.reshape(()))) <= 255
                if not fixed and not self._code(bound.args[1]):  # a run-time zero point: an 8-bit value too
                    return None
                bound = self._bound(bound.args[0])
            return relax.op.astype(expr, "int16") if self._code(bound) else None

        def _code(self, expr: Any) -> bool:
            """Whether ``expr`` is an 8-bit tensor cast to a wider integer type."""
            bound = self._bound(expr)
            return isinstance(bound, relax.Call) and bound.op == astype and bound.args[0].ty.dtype in ("uint8", "int8")

        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if call.op not in (matmul, conv2d) or call.ty.dtype != "int32":
                return call
            lhs, rhs = self._small(call.args[0]), self._small(call.args[1], weight=True)
            if lhs is None or rhs is None:
                return call
            if call.op == matmul:
                return relax.op.matmul(lhs, rhs, out_dtype="int32")
            a = call.attrs
            return relax.op.nn.conv2d(
                lhs,
                rhs,
                a.strides,
                a.padding,
                a.dilation,
                a.groups,
                a.data_layout,
                a.kernel_layout,
                a.out_layout,
                "int32",
            )

    return relax_build.rewrite_main(mod, Narrow(mod))
