"""Tiny transformer graphs for the pruning tests, spelled as torch.onnx writes them (before any fusion)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import kiln
from kiln import testing
from kiln.compiler.calibration import CalibrationData

FLOAT = ir.DataType.FLOAT


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[ir.Node] = []
        self.inits: list[ir.Value] = []

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        self.inits.append(testing.initializer(name, array))
        return self.inits[-1]

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 1.0) -> ir.Value:
        array = scale * self.rng.standard_normal(shape) / np.sqrt(shape[0])
        return self.const(name, array.astype(np.float32))

    def op(self, op_type: str, inputs: list[ir.Value], name: str, **attributes: object) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]


def bert(
    *, layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64, seed: int = 0, concat: bool = False
) -> ir.Model:
    """Post-LN encoder: x [batch, seq, hidden] -> layers x (MHA with biases, Add, LayerNorm, GELU MLP, Add, LN) -> y.

    The split-heads Reshape uses an explicit head count (as a decode export does), as one constant or, with
    ``concat``, as a Concat of one-element pieces shared by every layer; the merge Reshape uses -1.
    """
    b = _Builder(seed)
    head_dim = hidden // heads
    if concat:
        pieces = [b.const(f"split.{i}", np.array([v], np.int64)) for i, v in enumerate((0, 0, heads, head_dim))]
        split = b.op("Concat", pieces, "split", axis=0)
    else:
        split = b.const("split", np.array([0, 0, heads, head_dim], np.int64))
    merge = b.const("merge", np.array([0, 0, -1], np.int64))
    scale = b.const("scale", np.array(1 / np.sqrt(head_dim), np.float32))
    x = testing.value("x", ["batch", "seq", hidden])
    h = x
    for i in range(layers):
        p = f"l{i}"

        def linear(inp: ir.Value, name: str, k: int, n: int, p: str = p) -> ir.Value:
            mm = b.op("MatMul", [inp, b.weight(f"{p}.{name}.w", (k, n))], f"{p}.{name}.mm")
            return b.op(
                "Add",
                [mm, b.const(f"{p}.{name}.b", (0.1 * b.rng.standard_normal(n)).astype(np.float32))],
                f"{p}.{name}",
            )

        def heads_of(v: ir.Value, name: str, perm: list[int]) -> ir.Value:
            return b.op("Transpose", [b.op("Reshape", [v, split], f"{name}.split")], f"{name}.t", perm=perm)

        q = heads_of(linear(h, "q", hidden, hidden), f"{p}.q", [0, 2, 1, 3])
        k = heads_of(linear(h, "k", hidden, hidden), f"{p}.k", [0, 2, 3, 1])
        v = heads_of(linear(h, "v", hidden, hidden), f"{p}.v", [0, 2, 1, 3])
        scores = b.op("Mul", [b.op("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scores")
        context = b.op("MatMul", [b.op("Softmax", [scores], f"{p}.probs", axis=-1), v], f"{p}.context")
        merged = b.op("Reshape", [b.op("Transpose", [context], f"{p}.ct", perm=[0, 2, 1, 3]), merge], f"{p}.merged")
        attention = linear(merged, "o", hidden, hidden)
        h = b.op(
            "LayerNormalization",
            [
                b.op("Add", [attention, h], f"{p}.res1"),
                b.const(f"{p}.ln1.g", np.ones(hidden, np.float32)),
                b.const(f"{p}.ln1.b", np.zeros(hidden, np.float32)),
            ],
            f"{p}.ln1",
            axis=-1,
        )
        up = b.op("Gelu", [linear(h, "fc1", hidden, intermediate)], f"{p}.gelu")
        h = b.op(
            "LayerNormalization",
            [
                b.op("Add", [linear(up, "fc2", intermediate, hidden), h], f"{p}.res2"),
                b.const(f"{p}.ln2.g", np.ones(hidden, np.float32)),
                b.const(f"{p}.ln2.b", np.zeros(hidden, np.float32)),
            ],
            f"{p}.ln2",
            axis=-1,
        )
    y = b.op("Mul", [h, b.const("out_scale", np.array(1.0, np.float32))], "y")
    y.type, y.shape = ir.TensorType(FLOAT), ir.Shape(["batch", "seq", hidden])
    return testing.model([x], [y], b.nodes, b.inits, opset=21, name="bert")


def llama(directory: Path, **sizes: int) -> ir.Model:
    """:func:`kiln.testing.write_llama` (pre-norm, SwiGLU, explicit head counts in Reshape), loaded."""
    defaults = {"layers": 3, "hidden": 32, "intermediate": 48, "vocab": 40, "heads": 4}
    path = testing.write_llama(directory, **(defaults | sizes))
    return ir.load(path)


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` in ONNX Runtime (CPU, all optimizations off so numbers are the graph's own)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="kiln-test-") as tmp:
        kiln.save(model, Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        return session.run(None, feed)


def set_weight(model: ir.Model, name: str, array: np.ndarray) -> None:
    """Replace initializer ``name``'s content (e.g. zero a projection so its unit contributes nothing)."""
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(array.astype(np.float32), name=name)


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def row_cosines(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``got`` with the same row of ``expected`` (e.g. sentence embeddings)."""
    return (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)


def minilm_refit_cosines(
    path: Path, make_pass: Callable[[bool, CalibrationData], ir.passes.PassBase]
) -> dict[bool, float]:
    """Mean embedding cosine to the original MiniLM at ``path`` on 2 verification batches after the pass
    ``make_pass(refit, calibration)`` (8 calibration feeds), for ``refit`` False and True."""
    from kiln import zoo

    feeds = zoo.get("minilm-l6").verification_feeds("full", limit=2)
    reference = [run(kiln.load(path), feed)[0] for feed in feeds]
    calibration = CalibrationData.from_zoo("minilm-l6", limit=8)
    cosines = {}
    for refit in (False, True):
        model = kiln.load(path)
        kiln.Pipeline([make_pass(refit, calibration)])(model)
        got = [run(model, feed)[0] for feed in feeds]
        cosines[refit] = float(np.mean([row_cosines(g, r) for g, r in zip(got, reference, strict=True)]))
    return cosines
