"""Kernel micro-benchmark: batch-1 GEMV (``[1, K] @ [K, N]``) in each weight format, beside its bandwidth bound.

Why the rotation. A single 576x576 4-bit matrix is 170 KB: timed alone it sits in the 32 MB last-level cache and the
kernel looks many times faster than it can be inside a model, whose weights (hundreds of MB) stream from DRAM.
So each format is timed on a model holding R distinct weight matrices of the shape, all applied to the same input
(R parallel nodes, outputs concatenated), with R chosen so the weights of one run exceed ``footprint_llc`` times the
last-level cache. Time per GEMV is the run time divided by R; it includes ONNX Runtime's per-node overhead and the
Concat of the R small outputs, as a real model pays them too.

Formats. fp32 ``MatMul``; ONNX Runtime's own ``MatMulNBitsQuantizer`` output (4-bit with ``accuracy_level=4``,
2-bit with the LUT kernel enabled by session config ``mlas.use_lut_gemm=1``); and the node kiln's ``quantize.rtn``
emits for the same shape. Measured on ONNX Runtime 1.32: the LUT kernel runs only when K % 32, N % 128 and
K % block_size are all 0; otherwise 2-bit falls back to a generic kernel 50-200x slower, so 2-bit uses blocks of 64
(SmolLM2's K = 576 is 9 x 64, not a multiple of 128) and rows where the LUT cannot run say so.

Each quantizer is run on one real matrix of the shape to get its exact node (attributes, initializer shapes and
dtypes); the R copies get random codes and scales, which kernel speed does not depend on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper
from rich.progress import Progress

from kiln import testing
from kiln.bench import bandwidth as bw
from kiln.bench.baselines import LUT_SESSION_CONFIG, nbits_module
from kiln.bench.interleaved import time_interleaved
from kiln.compiler.pipeline import Pipeline
from kiln.compiler.timing import TIMING_SESSION_CONFIG
from kiln.passes import create

#: GEMV shapes (K, N): a square 4096 matrix and the four SmolLM2-135M shapes.
SHAPES: dict[str, tuple[int, int]] = {
    "4096x4096": (4096, 4096),
    "576x576 (SmolLM2 q, o)": (576, 576),
    "576x1536 (SmolLM2 gate, up)": (576, 1536),
    "1536x576 (SmolLM2 down)": (1536, 576),
    "576x49152 (SmolLM2 LM head)": (576, 49152),
}
#: Node copies per model are capped so session creation stays quick on the smallest shapes.
MAX_COPIES = 2048


@dataclasses.dataclass(frozen=True)
class KernelFormat:
    """One way of storing and running a [K, N] weight; ``template`` builds its single-matrix model."""

    name: str
    template: Callable[[int, int], onnx.ModelProto]
    session_config: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lut_block_size: int = 0

    def note(self, k: int, n: int) -> str:
        """Why the intended kernel may not run at this shape ('' when it does)."""
        block = self.lut_block_size
        if not block:
            return ""
        failing = [
            f"{name} % {m} != 0" for name, value, m in (("K", k, 32), ("N", n, 128), ("K", k, block)) if value % m
        ]
        return f"no LUT kernel ({', '.join(dict.fromkeys(failing))}): generic 2-bit kernel" if failing else ""


def _fp32_model(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, n), dtype=np.float32) / np.float32(math.sqrt(k))).astype(np.float32)
    x = testing.value("x", [1, k])
    w = testing.initializer("w", weight)
    node = ir.node("MatMul", [x, w], name="gemv")
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(testing.FLOAT)
    node.outputs[0].shape = ir.Shape([1, n])
    return ir.serde.serialize_model(testing.model([x], [node.outputs[0]], [node], [w], name="gemv"))


def fp32_template(k: int, n: int) -> onnx.ModelProto:
    return _fp32_model(k, n)


def ort_nbits_template(bits: int, block_size: int, accuracy_level: int) -> Callable[[int, int], onnx.ModelProto]:
    """ONNX Runtime's ``MatMulNBitsQuantizer`` (its default RTN: asymmetric, with zero points)."""

    def build(k: int, n: int) -> onnx.ModelProto:
        quantizer = nbits_module().MatMulNBitsQuantizer(
            _fp32_model(k, n), bits=bits, block_size=block_size, accuracy_level=accuracy_level
        )
        quantizer.process()
        return quantizer.model.model

    return build


def kiln_rtn_template(bits: int, group_size: int, accuracy_level: int) -> Callable[[int, int], onnx.ModelProto]:
    """kiln's ``quantize.rtn`` (asymmetric, MatMulNBits format)."""

    def build(k: int, n: int) -> onnx.ModelProto:
        model = ir.serde.deserialize_model(_fp32_model(k, n))
        options = {"bits": bits, "group_size": group_size, "accuracy_level": accuracy_level, "min_elements": 0}
        Pipeline([create("quantize.rtn", options)])(model)
        return ir.serde.serialize_model(model)

    return build


def default_formats() -> list[KernelFormat]:
    """The formats of the memory-bound comparison."""
    return [
        KernelFormat("ORT fp32 MatMul", fp32_template),
        KernelFormat("ORT MatMulNBits 4-bit acc4", ort_nbits_template(4, 128, 4)),
        KernelFormat("ORT MatMulNBits 2-bit LUT", ort_nbits_template(2, 64, 0), LUT_SESSION_CONFIG, lut_block_size=64),
        KernelFormat("kiln rtn 4-bit acc4", kiln_rtn_template(4, 128, 4)),
        KernelFormat("kiln rtn 8-bit acc4", kiln_rtn_template(8, 128, 4)),
        KernelFormat("kiln rtn 2-bit LUT", kiln_rtn_template(2, 64, 0), LUT_SESSION_CONFIG, lut_block_size=64),
    ]


def _compute_node(model: onnx.ModelProto) -> onnx.NodeProto:
    nodes = [node for node in model.graph.node if node.op_type in ("MatMul", "MatMulNBits")]
    if len(nodes) != 1:
        raise ValueError(f"expected one MatMul or MatMulNBits node, found {[n.op_type for n in model.graph.node]}")
    return nodes[0]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the constant inputs (weights, scales, zero points) of the model's single compute node."""
    node = _compute_node(model)
    inits = {t.name: t for t in model.graph.initializer}
    return sum(numpy_helper.to_array(inits[name]).nbytes for name in node.input if name in inits)


def _random_like(array: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    if array.dtype == np.uint8:
        return rng.integers(0, 256, size=array.shape, dtype=np.uint8)
    if array.ndim == 2 and array.shape[0] == k:  # an fp32 weight [K, N]
        return (rng.standard_normal(array.shape, dtype=np.float32) / np.float32(math.sqrt(k))).astype(array.dtype)
    return rng.uniform(1e-3, 1e-2, size=array.shape).astype(array.dtype)  # scales


def replicate(template: onnx.ModelProto, copies: int, k: int, *, seed: int = 0) -> onnx.ModelProto:
    """A model applying ``copies`` distinct random instances of the template's node to one input ``x`` [1, K].

    Output ``y`` is the concatenation of the copies' outputs along the last axis.
    """
    rng = np.random.default_rng(seed)
    node = _compute_node(template)
    inits = {t.name: numpy_helper.to_array(t) for t in template.graph.initializer}
    x_name = node.input[0]
    nodes, initializers, outputs = [], [], []
    for index in range(copies):
        inputs = []
        for name in node.input:
            if name in inits:
                fresh = f"{name}_{index}"
                initializers.append(numpy_helper.from_array(_random_like(inits[name], rng, k), fresh))
                inputs.append(fresh)
            else:
                inputs.append(name)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.append(f"y_{index}")
        copy.name = f"gemv_{index}"
        nodes.append(copy)
        outputs.append(f"y_{index}")
    nodes.append(helper.make_node("Concat", outputs, ["y"], axis=-1, name="concat"))
    graph = helper.make_graph(
        nodes,
        "gemv_rotation",
        [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, None])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=list(template.opset_import))
    model.ir_version = template.ir_version
    return model


def copies_for(weight_bytes_per_matrix: int, footprint_bytes: int) -> int:
    """How many distinct matrices make one run's weights exceed ``footprint_bytes`` (2..MAX_COPIES)."""
    return max(2, min(MAX_COPIES, math.ceil(footprint_bytes / max(weight_bytes_per_matrix, 1)) + 1))


@dataclasses.dataclass(frozen=True)
class KernelRow:
    """One format at one shape: time per GEMV beside the bandwidth bound."""

    shape: str
    k: int
    n: int
    format: str
    copies: int
    weight_bytes: int
    median_us: float
    p90_us: float
    bound_us: float
    repeats: int
    note: str

    @property
    def bytes_moved(self) -> int:
        return bw.gemv_bytes(self.k, self.n, self.weight_bytes)

    @property
    def achieved_gb_s(self) -> float:
        return self.bytes_moved / (self.median_us * 1e-6) / 1e9

    @property
    def of_bound(self) -> float:
        """bound / measured: 1.0 means the kernel runs at the measured bandwidth."""
        return self.bound_us / self.median_us

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {
            "bytes_moved": self.bytes_moved,
            "achieved_gb_s": self.achieved_gb_s,
            "of_bound": self.of_bound,
        }


def _session(model: onnx.ModelProto, threads: int, config: Mapping[str, str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    for key, value in {**TIMING_SESSION_CONFIG, **config}.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernel_bench(
    bandwidth: bw.Bandwidth,
    *,
    shapes: Mapping[str, tuple[int, int]] = SHAPES,
    formats: Sequence[KernelFormat] | None = None,
    footprint_llc: float = 3.0,
    threads: int = 2,
    repeats: int = 30,
    warmup: int = 3,
    progress: Progress | None = None,
) -> list[KernelRow]:
    """Time every format at every shape, round-robin per shape, each beside ``bytes / bandwidth.best``."""
    formats = list(formats if formats is not None else default_formats())
    footprint = int(footprint_llc * bw.llc_bytes())
    rows: list[KernelRow] = []
    task = progress.add_task("kernels: building", total=len(shapes) * len(formats)) if progress else None
    for label, (k, n) in shapes.items():
        runs, built = {}, {}
        for fmt in formats:
            if progress is not None and task is not None:
                progress.update(task, description=f"kernels: {label} {fmt.name}")
            template = fmt.template(k, n)
            per_matrix = weight_bytes(template)
            copies = copies_for(per_matrix, footprint)
            session = _session(replicate(template, copies, k), threads, fmt.session_config)
            feed = {session.get_inputs()[0].name: np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)}
            runs[fmt.name] = lambda s=session, f=feed: s.run(None, f)
            built[fmt.name] = (fmt, copies, per_matrix)
            if progress is not None and task is not None:
                progress.advance(task)
        latency = time_interleaved(runs, warmup=warmup, repeats=repeats, progress=progress, label=f"timing {label}")
        for name, (fmt, copies, per_matrix) in built.items():
            lat = latency[name]
            bound = bw.bound_seconds(bw.gemv_bytes(k, n, per_matrix), bandwidth.best) * 1e6
            rows.append(
                KernelRow(
                    shape=label,
                    k=k,
                    n=n,
                    format=name,
                    copies=copies,
                    weight_bytes=per_matrix,
                    median_us=lat.median_ms * 1e3 / copies,
                    p90_us=lat.p90_ms * 1e3 / copies,
                    bound_us=bound,
                    repeats=lat.repeats,
                    note=fmt.note(k, n),
                )
            )
        del runs
    if progress is not None and task is not None:
        progress.remove_task(task)
    return rows
