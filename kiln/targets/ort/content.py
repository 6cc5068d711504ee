"""Session settings chosen from what a model contains.

The same graph can run at very different speeds depending on session config entries ONNX Runtime applies at load,
so kiln picks them from the model's content and records why in ``session.json``:

* **DequantizeLinear (integer weights) + MatMul/Gemm** (``quantize.rtn`` format ``dq``): ORT fuses the pair into
  ``com.microsoft.MatMulNBits`` at level extended and above, with the accuracy level of
  ``session.qdq_matmulnbits_accuracy_level`` (4, int8 activations, is ORT's default and its fast path). kiln sets
  it explicitly, so the verified precision does not change with ORT's default.
* **2-bit MatMulNBits at accuracy level < 4** (or 2-bit weights fused at such a level): ORT's fp32 path for 2 bits
  is very slow (a 512x256 layer took 2.3 ms vs 0.03 ms with the LUT kernel on this 2-core x86 machine), so kiln
  sets ``mlas.use_lut_gemm=1`` when a layer fits that kernel (K % 32 == 0, N % 128 == 0; AVX2).
* **QDQ activations** (QuantizeLinear/DequantizeLinear pairs): ORT's defaults already fuse them into QLinear*
  kernels; ``session.qdqisint8allowed=1`` made an int8 QLinearMatMul 4x slower here, so kiln leaves it unset. The
  fusion report (:mod:`kiln.targets.ort.optimize`) says which groups stayed unfused.
"""

from __future__ import annotations

import collections
import functools
import json
import subprocess
import sys
from collections.abc import Iterator

import onnx
import onnxruntime as ort
from onnxruntime.capi import _pybind_state

#: Domains ONNX Runtime implements itself.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

_LUT_K_MULTIPLE = 32
_LUT_N_MULTIPLE = 128


#: Providers of ONNX Runtime's CPU wheel, whose kernel list is read in-process.
_CPU_BUILD_PROVIDERS = {"CPUExecutionProvider", "AzureExecutionProvider"}
_LIST_IN_CHILD = "import json, kiln.targets.ort.content as c; print(json.dumps(sorted(c._listed_cpu_kernels())))"


def _listed_cpu_kernels() -> frozenset[tuple[str, str]]:
    return frozenset(
        (d.domain, d.op_name) for d in _pybind_state.get_all_opkernel_def() if d.provider == "CPUExecutionProvider"
    )


@functools.cache
def cpu_kernels() -> frozenset[tuple[str, str]] | None:
    """(domain, op type) of every kernel the CPU execution provider of this onnxruntime has; ``None`` if this build
    cannot say.

    ``get_all_opkernel_def`` loads every provider library of the build. onnxruntime-gpu 1.31.1 on a machine without
    TensorRT (an H100, CUDA 13) fails to load its TensorRT provider there and then crashes the process (segmentation
    fault), so a build with GPU providers is asked in a child process, and a crash there means ``None``.
    """
    if set(ort.get_available_providers()) <= _CPU_BUILD_PROVIDERS:
        return _listed_cpu_kernels()
    child = subprocess.run([sys.executable, "-c", _LIST_IN_CHILD], capture_output=True, text=True, check=False)
    if child.returncode != 0:
        return None
    return frozenset((domain, op) for domain, op in json.loads(child.stdout))


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count by ``domain.op_type`` (plain op type for the default domain), most frequent first."""
    counts = collections.Counter(op_name(node) for node in iter_nodes(model.graph))
    return dict(counts.most_common())


def op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def constant_names(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors of ``graph`` by value name."""
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    return constants


def weight_dequantizers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes of constant integer weights feeding a MatMul or Gemm (ORT's MatMulNBits candidates)."""
    constants = constant_names(graph)
    users = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    found = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or node.input[0] not in constants:
            continue
        if any(user.op_type in ("MatMul", "Gemm") for user in users[node.output[0]]):
            found.append(node)
    return found


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def _two_bit_layers(model: onnx.ModelProto, dq_accuracy_level: int) -> list[tuple[int, int]]:
    """(K, N) of 2-bit matmuls that will run below accuracy level 4."""
    layers = []
    for node in iter_nodes(model.graph):
        if (node.domain, node.op_type) != ("com.microsoft", "MatMulNBits"):
            continue
        if _attr(node, "bits", 4) == 2 and _attr(node, "accuracy_level", 0) < 4:
            layers.append((_attr(node, "K", 0), _attr(node, "N", 0)))
    if dq_accuracy_level < 4:
        two_bit = {onnx.TensorProto.INT2, onnx.TensorProto.UINT2}
        constants = constant_names(model.graph)
        for node in weight_dequantizers(model.graph):
            weight = constants[node.input[0]]
            if weight.data_type in two_bit and len(weight.dims) == 2:
                layers.append((weight.dims[0], weight.dims[1]))
    return layers


def cpu_session_config(model: onnx.ModelProto, dq_accuracy_level: int) -> tuple[dict[str, str], dict[str, str]]:
    """Session config entries for ``model`` on the CPU, and why each was chosen."""
    config: dict[str, str] = {}
    notes: dict[str, str] = {}
    dequantizers = weight_dequantizers(model.graph)
    if dequantizers:
        config["session.qdq_matmulnbits_accuracy_level"] = str(dq_accuracy_level)
        notes["session.qdq_matmulnbits_accuracy_level"] = (
            f"{len(dequantizers)} DequantizeLinear+MatMul/Gemm weight pairs: ORT fuses them into MatMulNBits; "
            f"accuracy_level {dq_accuracy_level} (4 = int8 activations, ORT's fast path; 0 = fp32 "
            "activations) is the one kiln verified"
        )
    lut = [
        (k, n)
        for k, n in _two_bit_layers(model, dq_accuracy_level)
        if k % _LUT_K_MULTIPLE == 0 and n % _LUT_N_MULTIPLE == 0
    ]
    if lut:
        config["mlas.use_lut_gemm"] = "1"
        notes["mlas.use_lut_gemm"] = (
            f"{len(lut)} 2-bit matmuls below accuracy level 4 fit the LUT kernel (K % 32 == 0, N % 128 == 0); "
            "without it ORT runs 2 bits on a slow fp32 path"
        )
    return config, notes
