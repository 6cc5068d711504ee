"""What an error in a value projection costs once attention has averaged it: per-KV-head Grams of the
attention-weighted inputs, for the ``value_hessian = "attention"`` of ``quantize.gptq`` and ``shiftadd.bcq``.

Math. A value projection ``v = x W_v (+ b)`` is read only through attention: head ``h``'s output at query ``q`` is
``sum_t a[h, q, t] v[t]``. An error ``ΔW`` in the weight therefore reaches it as ``x̄[h, q] ΔW`` with
``x̄[h] = A[h] X``, the attention-weighted mean of the inputs (a bias passes through unchanged, since each row of
``A`` sums to 1). KV head ``g`` owns the projection's columns ``[g d, (g + 1) d)`` and is read by the query heads
``h`` with ``h // (H / H_kv) = g`` (grouped-query attention as torch exports ``repeat_kv``), so the squared error it
causes, summed over its query heads and over queries, is ``tr(ΔW_g^T H_g ΔW_g)`` with::

    H_g = sum_{h in heads(g)} sum_q x̄[h, q]^T x̄[h, q]

instead of the input Gram ``sum_t x[t]^T x[t]``. The two differ most where attention concentrates on a few tokens
(the first token, in the many heads that use it as an attention sink): every query reads that token's value, while
the input Gram counts it once among all tokens.

SmolLM2-135M, 3 bits in groups of 128, 32 calibration windows, perplexity on 16 (fp32 24.22). Swapping fitted
layers between GPTQ and shift-add's binary coding (one pass of statistics each) pointed here: GPTQ's value
projections in blocks 0-9 in place of shift-add's took shift-add from 33.59 to 32.86, although shift-add's were the
ones with the lower input-Gram error. Fitted against ``H_g``, every value projection: GPTQ 35.36 -> 31.02 and
shift-add (3 planes, ``mantissa_bits = 3``) 33.59 -> 31.22 (``python tools/calibration_size.py --recipe <gptq-w3 or
shiftadd-w3 without sequential, with value_hessian> 32``). With
``sequential`` refits the option gains nothing (``gptq-w3``: 29.47 ->
29.62; ``shiftadd-w3``: 30.07 -> 30.88). There the output projection after each attention is refitted to the
float outputs from the quantized values, which is a likely reason (not measured apart): it can absorb much of what a
value error costs. Nor with 16 stages at 2 bits (``gptq-w2``: 84.2 -> 84.2). So the option is for fits from one
pass of statistics, which take a fraction of a sequential fit's time.

The Grams are measured on the model before any weight is rewritten: a copy of its graph gets, per attention, the
product ``A @ X`` of the softmax's probabilities [B, H, T, T] and the projection's input [B, T, K] as an extra
output. Decode graphs (a KV cache: the probabilities span past tokens whose inputs the graph never sees) are left to
the input Gram.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.compiler.calibration import CalibrationData, Reducer
from kiln.errors import KilnError
from kiln.passes.prune.structure import StructureError, find_structure


class _HeadGrams(Reducer):
    """Per KV head, the Gram of the attention-averaged inputs of its query heads, from batches [B, H, T, K]."""

    def __init__(self, layer: str, heads: int, kv_heads: int) -> None:
        self.layer, self.heads, self.kv_heads = layer, heads, kv_heads
        self.sums: list[np.ndarray] | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        if array.ndim != 4 or array.shape[1] != self.heads:
            raise KilnError(
                f"value Gram of {self.layer!r}: attention-averaged inputs have shape {list(array.shape)}, "
                f"expected [batch, {self.heads} heads, queries, channels]"
            )
        rep = self.heads // self.kv_heads
        batch = []
        for g in range(self.kv_heads):
            rows = np.ascontiguousarray(array[:, g * rep : (g + 1) * rep]).reshape(-1, array.shape[-1])
            rows = rows.astype(np.float32, copy=False)
            batch.append((rows.T @ rows).astype(np.float64))
        self.sums = batch if self.sums is None else [a + b for a, b in zip(self.sums, batch)]
        self.count += array.shape[0] * rep * array.shape[2]

    @property
    def value(self) -> list[np.ndarray]:
        if self.sums is None or self.count == 0:
            raise KilnError(f"value Gram of {self.layer!r}: no calibration rows reached it")
        return [total / self.count for total in self.sums]


def value_grams(model: ir.Model, calibration: CalibrationData) -> tuple[dict[str, list[np.ndarray]], str | None]:
    """``({value projection's weight name: [H_g for each KV head]}, None)``, or ``({}, why not)`` when the model
    has no attention whose value projection kiln can follow (no transformer structure, or only decode graphs).

    ``model`` is not changed: the extra products are added to a copy.
    """
    copy = model.clone()
    try:
        attentions = [s.attention for s in find_structure(copy).attentions() if s.attention is not None]
    except StructureError as error:
        return {}, f"no transformer structure: {error}"
    full = [a for a in attentions if not a.past]
    if not full:
        return {}, "every attention reads a KV cache (a decode graph): the input Gram is used"
    reducers: dict[str, list[Reducer]] = {}
    grams: dict[str, _HeadGrams] = {}
    for attention in full:
        name = str(attention.v.weight.name)
        probabilities, inputs = attention.softmax.outputs[0], attention.v.input
        axes = ir.Value(name=f"{name}_value_gram_axes", const_value=ir.tensor(np.array([1], dtype=np.int64)))
        copy.graph.register_initializer(axes)
        unsqueeze = ir.node("Unsqueeze", [inputs, axes], name=f"{name}_value_gram_unsqueeze")
        product = ir.node("MatMul", [probabilities, unsqueeze.outputs[0]], name=f"{name}_value_gram_matmul")
        product.outputs[0].name = f"{name}_value_gram"
        product.outputs[0].type = inputs.type
        copy.graph.extend([unsqueeze, product])
        grams[name] = _HeadGrams(attention.v.matmul.name, attention.num_heads, attention.num_kv_heads)
        reducers[product.outputs[0].name] = [grams[name]]
    calibration.collect(copy, reducers)
    return {name: reducer.value for name, reducer in grams.items()}, None
