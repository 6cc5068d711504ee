"""ONNX Runtime's graph optimizations done ahead of time, and a report of what they fused and what they did not.

ONNX Runtime rewrites every model when a session starts (constant folding, MatMul+Add -> Gemm, DequantizeLinear +
MatMul -> MatMulNBits, QDQ groups -> QLinear* kernels, LayerNorm/GELU/attention fusions) and can save the result.
Saving it moves that work out of every session start, and shows exactly which graph runs.

Levels (``optimize``): ``basic`` (semantics-preserving rewrites, constant folding), ``extended`` (adds the
contrib-op fusions, including the QDQ and MatMulNBits ones), ``all`` (adds layout transforms). kiln never saves
ORT's NCHWc layout transform (the ``NchwcTransformer``): it picks block sizes for the CPU it runs on (AVX2 vs
AVX-512) and x86-only ``com.microsoft.nchwc`` ops, so a graph saved with it runs only where it was made. ORT
applies it anyway when the saved model is loaded at level ``all`` on the machine that runs it, which is how kiln's
session settings load every artifact. With NCHWc excluded, a level-``all`` artifact stays portable across CPUs.

Which fusions happened is read from ONNX Runtime's own log (the graph transformers that reported a change) and
from the operator counts before and after. Why a node stayed unfused is derived by kiln from the source graph for
the patterns kiln emits: weight DequantizeLinear nodes that did not become MatMulNBits (mirroring the conditions of
ORT 1.32's DQ -> MatMulNBits selector) and activation QDQ groups that did not become QLinear* kernels.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort

from kiln.errors import KilnError
from kiln.targets.ort.content import constant_names, cpu_kernels, op_counts, op_name
from kiln.targets.ort.settings import SessionSettings

Level = Literal["basic", "extended", "all"]

ORT_LEVELS = {
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
#: Transformers never saved into an artifact (see the module docstring).
HARDWARE_SPECIFIC = ["NchwcTransformer"]

_MODIFIED = re.compile(r"GraphTransformer (\S+) modified: 1")
_NBITS_TYPES = {
    onnx.TensorProto.INT2,
    onnx.TensorProto.UINT2,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
}
_QDQ_DROPPED = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Slice", "Gather", "Flatten"}


def save_optimized(
    source: Path,
    dest: Path,
    level: Level,
    settings: SessionSettings,
    *,
    ort_format: bool = False,
) -> list[str]:
    """Write ONNX Runtime's optimized graph of ``source`` to ``dest`` (ONNX with external weights, or ORT format).

    ``settings``' session config and custom-op domains apply (they decide e.g. the accuracy level of fused
    MatMulNBits nodes). Returns the graph transformers that changed the graph, in the order they first did.
    """
    options = settings.session_options()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.optimized_model_filepath = str(dest)
    if ort_format:
        options.add_session_config_entry("session.save_model_format", "ORT")
    else:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{dest.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 1  # INFO: each transformer logs whether it modified the graph
    with _captured_stderr() as log:
        try:
            ort.InferenceSession(
                str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=HARDWARE_SPECIFIC
            )
        except Exception as e:
            raise KilnError(f"ONNX Runtime cannot optimize {source.name}: {str(e).strip().splitlines()[0]}") from None
    return list(dict.fromkeys(_MODIFIED.findall(log.text)))


class _Log:
    text = ""


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Log]:
    """Capture what native code writes to file descriptor 2; warnings and errors are passed on afterwards."""
    log = _Log()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log.text = tmp.read().decode("utf-8", errors="replace")
    passed_on = [line for line in log.text.splitlines() if re.search(r"\[(W|E|F):", line)]
    if passed_on:
        sys.stderr.write("\n".join(passed_on) + "\n")


def fusion_report(
    source: onnx.ModelProto, optimized: onnx.ModelProto, level: Level, transformers: list[str]
) -> dict[str, Any]:
    """What ONNX Runtime fused, and why the QDQ and weight-DequantizeLinear nodes left in ``optimized`` stayed."""
    before, after = op_counts(source), op_counts(optimized)
    return {
        "level": level,
        "transformers": transformers,
        "ops_before": before,
        "ops_after": after,
        "ops_removed": {op: n - after.get(op, 0) for op, n in before.items() if n > after.get(op, 0)},
        "ops_added": {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)},
        "unfused": _unfused(source, optimized, level),
    }


def _unfused(source: onnx.ModelProto, optimized: onnx.ModelProto, level: Level) -> list[dict[str, Any]]:
    """Remaining DequantizeLinear nodes grouped by the reason they stayed."""
    graph = source.graph
    producers = {out: node for node in graph.node for out in node.output}
    users: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    outputs = {o.name for o in graph.output}
    constants = constant_names(graph)
    kernels = cpu_kernels()
    context = _Context(producers, users, outputs, constants, kernels, level)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for node in optimized.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        original = producers.get(node.output[0])
        if original is None or original.op_type != "DequantizeLinear":
            continue  # made by ORT, not left over from the source graph
        if original.input[0] in constants and not _in_qdq_group(original, context):
            reason = _weight_reason(original, context)
        else:
            reason = _activation_reason(original, context)
        if reason is not None:
            groups[reason].append(original.name or original.output[0])
    return [{"reason": reason, "nodes": nodes} for reason, nodes in groups.items()]


class _Context:
    """The source graph's edges, as the reason finders need them."""

    def __init__(
        self,
        producers: dict[str, onnx.NodeProto],
        users: dict[str, list[onnx.NodeProto]],
        outputs: set[str],
        constants: dict[str, onnx.TensorProto],
        kernels: frozenset[tuple[str, str]] | None,
        level: Level,
    ) -> None:
        self.producers, self.users, self.outputs = producers, users, outputs
        self.constants, self.kernels, self.level = constants, kernels, level

    def single_user(self, name: str) -> onnx.NodeProto | None:
        users = self.users[name]
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _in_qdq_group(dq: onnx.NodeProto, ctx: _Context) -> bool:
    """A weight DequantizeLinear whose reader also dequantizes its activation: a QLinear* candidate."""
    for user in ctx.users[dq.output[0]]:
        others = [name for name in user.input if name and name != dq.output[0] and name not in ctx.constants]
        if any(getattr(ctx.producers.get(name), "op_type", "") == "DequantizeLinear" for name in others):
            return True
    return False


def _weight_reason(dq: onnx.NodeProto, ctx: _Context) -> str | None:
    """Why a weight DequantizeLinear did not fuse into MatMulNBits; ``None`` if it feeds no MatMul/Gemm at all."""
    users = ctx.users[dq.output[0]]
    matmuls = [u for u in users if u.op_type in ("MatMul", "Gemm") and u.domain in ("", "ai.onnx")]
    if not matmuls:
        return None
    if ctx.level == "basic":
        return "DequantizeLinear + MatMul -> MatMulNBits runs at level 'extended' and above"
    if len(users) != 1 or dq.output[0] in ctx.outputs:
        return "the dequantized weight has several consumers; ORT fuses a DequantizeLinear used by one MatMul/Gemm"
    (matmul,) = matmuls
    if len(matmul.input) < 2 or matmul.input[1] != dq.output[0]:
        return "the dequantized weight is the MatMul's A input, not B"
    weight = ctx.constants[dq.input[0]]
    if weight.data_type not in _NBITS_TYPES:
        return f"weights are {onnx.TensorProto.DataType.Name(weight.data_type)}; MatMulNBits takes 2-, 4- or 8-bit"
    if len(weight.dims) != 2:
        return f"the weight has rank {len(weight.dims)}; MatMulNBits takes 2-D weights"
    scale = ctx.constants.get(dq.input[1])
    if scale is None or (len(dq.input) > 2 and dq.input[2] and dq.input[2] not in ctx.constants):
        return "scale or zero point is not a constant initializer"
    if scale.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        return "scales are not float or float16"
    attrs = _attrs(dq)
    block = attrs.get("block_size", 0)
    if block and attrs.get("axis", 1) != 0:
        return "blocks run along axis 1; MatMulNBits needs blocks along K (axis 0)"
    if block and (block < 16 or block & (block - 1)):
        return f"block_size {block} is not a power of two >= 16"
    if matmul.op_type == "Gemm":
        g = _attrs(matmul)
        if g.get("transA", 0) or g.get("transB", 0) or g.get("alpha", 1.0) != 1.0:
            return "Gemm with transA/transB or alpha != 1 does not fuse"
        if len(matmul.input) > 2 and matmul.input[2] and g.get("beta", 1.0) != 1.0:
            return "Gemm with beta != 1 does not fuse"
    # ORT treats a single Relu/Clip after the MatMul (after MatMul+Add -> Gemm) as made redundant by a following
    # QuantizeLinear; when none follows, its QDQ node-group selection fails and the fusion is skipped.
    after = ctx.single_user(matmul.output[0])
    if after is not None and after.op_type == "Add" and matmul.op_type == "MatMul":
        after = ctx.single_user(after.output[0])
    if after is not None and after.op_type in ("Relu", "Clip") and ctx.single_user(after.output[0]) is not None:
        return (
            "the MatMul (with its bias Add) feeds a single Relu/Clip: ORT 1.32's QDQ selector then expects a "
            "QuantizeLinear after it and skips the fusion (quantize.rtn format 'matmulnbits' does not depend on it)"
        )
    return "ONNX Runtime's DQ -> MatMulNBits selector rejected it (the conditions kiln checks all hold)"


def _activation_reason(dq: onnx.NodeProto, ctx: _Context) -> str:
    """Why an activation DequantizeLinear's group did not become a QLinear* kernel."""
    if ctx.level == "basic":
        return "QDQ -> QLinear* fusions run at level 'extended' and above"
    if dq.input[0] in ctx.outputs or dq.input[0] not in ctx.producers:
        return "the quantized tensor is a graph input or output"
    reasons = []
    for user in ctx.users[dq.output[0]]:
        consumers = [ctx.users[out] for out in user.output]
        requantized = all(c and all(n.op_type == "QuantizeLinear" for n in c) for c in consumers)
        has_kernel = user.op_type in (*_QDQ_DROPPED, "MatMul", "Gemm", "Conv") or any(
            (domain, f"QLinear{user.op_type}") in (ctx.kernels or ()) for domain in ("", "com.microsoft")
        )
        if not requantized:
            reasons.append(f"{op_name(user)}'s output is not quantized again, so ORT runs it in float")
        elif not has_kernel and ctx.kernels is None:
            reasons.append(f"this onnxruntime build cannot list its kernels: none known for {op_name(user)}")
        elif not has_kernel:
            reasons.append(f"ORT's CPU provider has no quantized kernel for {op_name(user)}")
    return "; ".join(dict.fromkeys(reasons)) or "ONNX Runtime's QDQ selectors rejected the group"
