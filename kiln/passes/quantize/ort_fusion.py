"""Which quantized layers ONNX Runtime actually runs on integer kernels.

A QDQ model only pays off once ONNX Runtime's graph optimizer fuses each ``DequantizeLinear -> op ->
QuantizeLinear`` group into an integer kernel (``QLinearConv``, ``QLinearMatMul``, ``MatMulIntegerToFloat``,
``QGemm``...). Whether it does depends on details (zero-point types, bias types, what follows the op), so kiln
checks rather than assumes: it lets ONNX Runtime write the optimized graph (``optimized_model_filepath`` at
``ORT_ENABLE_EXTENDED``, the level that applies the QDQ fusions without the hardware-specific layout changes
of ``ORT_ENABLE_ALL``) and reads it back. A fused node keeps the name of the node it replaced, so each
quantized layer can be looked up by name (a node fused twice, such as a MatMul that became a Gemm first, is
named ``<name>/<fusion>``).
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxruntime as ort

from kiln.compiler import io

#: ONNX Runtime operators that compute on 8-bit integers.
INTEGER_OPS = frozenset(
    {
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QAttention",
        "QGemm",
    }
)


def is_integer_op(op_type: str) -> bool:
    """Whether ``op_type`` is one of ONNX Runtime's integer kernels (every ``QLinear*`` op is)."""
    return op_type.startswith("QLinear") or op_type in INTEGER_OPS


@dataclasses.dataclass
class FusionReport:
    """The optimized graph's integer kernels, and which of the named layers run on one."""

    integer_ops: dict[str, int]
    fused: list[str]
    unfused: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"integer_ops": self.integer_ops, "fused": len(self.fused), "unfused": self.unfused}


def optimized_graph(model: ir.Model, level: str = "ORT_ENABLE_EXTENDED") -> list[tuple[str, str]]:
    """(op_type, name) of every node of the main graph ONNX Runtime runs for ``model`` at ``level``."""
    with tempfile.TemporaryDirectory(prefix="kiln-ort-opt-") as tmp:
        source = io.save(model, Path(tmp) / "model.onnx")
        target = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = str(target)
        # Weights go to a side file, so models over 2 GB can be written too.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        optimized = ir.load(target)
        return [(node.op_type, node.name or "") for node in optimized.graph]


def fusion_report(model: ir.Model, layers: Iterable[str], level: str = "ORT_ENABLE_EXTENDED") -> FusionReport:
    """Count the integer kernels ONNX Runtime runs for ``model`` and check each named layer is one of them."""
    nodes = optimized_graph(model, level)
    integer_names = {name.split("/")[0] for op, name in nodes if is_integer_op(op)}
    counts = collections.Counter(op for op, _ in nodes if is_integer_op(op))
    fused, unfused = [], []
    for name in layers:
        (fused if name in integer_names else unfused).append(name)
    return FusionReport(dict(sorted(counts.items())), fused, unfused)
