"""Random small ONNX graphs for the fuzz tests, drawn by hypothesis and built with ``onnx.helper``.

A graph is drawn as a plain description (a :class:`Spec`: family, dims, layer list, how weights are stored) and
built from it deterministically, so hypothesis shrinks a failure to a short, readable spec. Shapes are tracked while
building, so every graph is fully typed and passes the ONNX checker as generated.

Two families cover the ops exporters emit for transformers and CNNs:

* ``seq``: ``x`` of shape ``[B, S, D]`` (or ``[B, D]``) through MatMul, Gemm (with Reshape around it), bias Add, Mul,
  Relu, LayerNormalization, Softmax, a head split (Reshape + Transpose and back), a residual MLP and an
  attention block (Q/K/V projections, ``Q @ K^T``, scaled Softmax, ``@ V``, output projection);
* ``conv``: ``x`` of shape ``[B, C, H, W]`` through Conv (dense or depthwise, optional bias), Relu, per-channel
  Add and Mul, then Flatten and a MatMul or Gemm head.

``B`` is sometimes the symbolic dimension ``"batch"``; weights are initializers or ``Constant`` nodes.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import onnx.helper as oh
from hypothesis import strategies as st

SEQ_LAYERS = ("matmul", "gemm", "bias", "mul", "relu", "layernorm", "softmax", "heads", "mlp", "attention")
CONV_LAYERS = ("conv", "depthwise", "relu", "bias", "mul")
FLOAT = onnx.TensorProto.FLOAT


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to build: ``dims`` are (B, S, D) for ``seq`` (S = 0: rank 2) and (B, C, H, W) for ``conv``."""

    family: str
    dynamic_batch: bool
    dims: tuple[int, ...]
    layers: tuple[tuple[str, int], ...]  # (layer kind, its size parameter)
    head: str  # conv only: "matmul" or "gemm"
    constant_nodes: bool  # weights as Constant nodes instead of initializers
    opset: int
    seed: int


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """A random graph description: 1 to 5 layers of tiny sizes (every dim <= 64)."""
    family = draw(st.sampled_from(["seq", "seq", "conv"]))
    if family == "seq":
        dims = (
            draw(st.integers(1, 3)),
            draw(st.sampled_from([0, 1, 2, 5])),
            draw(st.sampled_from([4, 8, 16, 32, 64])),
        )
        kinds = SEQ_LAYERS if dims[1] else tuple(k for k in SEQ_LAYERS if k not in ("heads", "attention"))
        sizes = st.sampled_from([8, 16, 32, 64])
    else:
        dims = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(3, 6)), draw(st.integers(3, 6)))
        kinds = CONV_LAYERS
        sizes = st.sampled_from([1, 3])  # conv kernel size
    layers = draw(st.lists(st.tuples(st.sampled_from(kinds), sizes), min_size=1, max_size=5))
    return Spec(
        family=family,
        dynamic_batch=draw(st.booleans()),
        dims=dims,
        layers=tuple(layers),
        head=draw(st.sampled_from(["matmul", "gemm"])),
        constant_nodes=draw(st.booleans()),
        opset=draw(st.sampled_from([17, 21])),
        seed=draw(st.integers(0, 2**16)),
    )


class _Builder:
    """Appends nodes and weights, handing out fresh names; tracks nothing but what ``build`` needs."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()

    def name(self, base: str) -> str:
        return f"{base}{next(self._ids)}"

    def const(self, array: np.ndarray, base: str = "w") -> str:
        """A weight, as an initializer or a Constant node's output."""
        name = self.name(base)
        tensor = onnx.numpy_helper.from_array(array, name)
        if self.spec.constant_nodes:
            self.nodes.append(oh.make_node("Constant", [], [name], value=tensor, name=self.name("const")))
        else:
            self.initializers.append(tensor)
        return name

    def weight(self, *shape: int, fan_in: int | None = None) -> str:
        scale = 1.0 / np.sqrt(fan_in or shape[0])
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def shape_const(self, dims: list[int]) -> str:
        # Shapes are always initializers: a Constant-node shape is folded by every exporter anyway.
        name = self.name("shape")
        self.initializers.append(onnx.numpy_helper.from_array(np.array(dims, np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(oh.make_node(op_type, inputs, [out], name=self.name(f"n_{op_type}"), **attrs))
        return out


def build(spec: Spec) -> onnx.ModelProto:
    """The model ``spec`` describes: input ``x``, output ``y``, default-domain opset ``spec.opset``."""
    b = _Builder(spec)
    batch: int | str = "batch" if spec.dynamic_batch else spec.dims[0]
    if spec.family == "seq":
        _, s, d = spec.dims
        in_shape = [batch, s, d] if s else [batch, d]
        h, d = _seq_layers(b, "x", s, d, spec.layers)
        out_shape = [batch, s, d] if s else [batch, d]
    else:
        _, c, height, width = spec.dims
        in_shape = [batch, c, height, width]
        h, features = _conv_layers(b, "x", c, height * width, spec.layers)
        flat = b.op("Flatten", [h], axis=1)
        n = 8
        if spec.head == "gemm":
            h = b.op("Gemm", [flat, b.weight(n, features, fan_in=features), b.weight(n, fan_in=1)], transB=1)
        else:
            h = b.op("MatMul", [flat, b.weight(features, n)])
        out_shape = [batch, n]
    b.nodes.append(oh.make_node("Identity", [h], ["y"], name=b.name("n_out")))
    graph = oh.make_graph(
        b.nodes,
        "fuzz",
        [oh.make_tensor_value_info("x", FLOAT, in_shape)],
        [oh.make_tensor_value_info("y", FLOAT, out_shape)],
        b.initializers,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", spec.opset)], ir_version=10)


def _seq_layers(b: _Builder, h: str, s: int, d: int, layers) -> tuple[str, int]:
    """Apply ``layers`` to ``h`` of last dimension ``d``; returns the result and its last dimension."""
    for kind, size in layers:
        if kind == "matmul":
            h, d = b.op("MatMul", [h, b.weight(d, size)]), size
        elif kind == "gemm":
            flat = b.op("Reshape", [h, b.shape_const([-1, d])]) if s else h
            trans_b = size % 16 == 0  # a deterministic mix of both weight layouts
            w = b.weight(size, d, fan_in=d) if trans_b else b.weight(d, size)
            out = b.op("Gemm", [flat, w, b.weight(size, fan_in=1)], transB=int(trans_b))
            h = b.op("Reshape", [out, b.shape_const([-1, s, size])]) if s else out
            d = size
        elif kind == "bias":
            h = b.op("Add", [h, b.weight(d, fan_in=1)])
        elif kind == "mul":
            h = b.op("Mul", [h, b.const(np.float32(0.5 + b.rng.random()).reshape(()), "scale")])
        elif kind == "relu":
            h = b.op("Relu", [h])
        elif kind == "layernorm":
            gamma = b.const((1 + 0.1 * b.rng.standard_normal(d)).astype(np.float32), "gamma")
            h = b.op("LayerNormalization", [h, gamma, b.weight(d, fan_in=1)], axis=-1, epsilon=1e-5)
        elif kind == "softmax":
            h = b.op("Softmax", [h], axis=-1)
        elif kind == "heads":
            heads = 2 if d % 2 == 0 else 1
            split = b.op("Reshape", [h, b.shape_const([0, 0, heads, d // heads])])
            there = b.op("Transpose", [split], perm=[0, 2, 1, 3])
            back = b.op("Transpose", [there], perm=[0, 2, 1, 3])
            h = b.op("Reshape", [back, b.shape_const([0, 0, d])])
        elif kind == "mlp":
            up = b.op("Relu", [b.op("MatMul", [h, b.weight(d, size)])])
            h = b.op("Add", [h, b.op("MatMul", [up, b.weight(size, d)])])
        elif kind == "attention":
            h = _attention(b, h, d)
    return h, d


def _attention(b: _Builder, h: str, d: int) -> str:
    """Multi-head self-attention with a residual connection, as exporters write it before any fusion."""
    heads = 2 if d % 2 == 0 else 1
    dh = d // heads

    def split(perm: list[int]) -> str:
        proj = b.op("MatMul", [h, b.weight(d, d)])
        return b.op("Transpose", [b.op("Reshape", [proj, b.shape_const([0, 0, heads, dh])])], perm=perm)

    q, k, v = split([0, 2, 1, 3]), split([0, 2, 3, 1]), split([0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const(np.float32(1 / np.sqrt(dh)).reshape(()), "scale")])
    context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    merged = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), b.shape_const([0, 0, d])])
    return b.op("Add", [h, b.op("MatMul", [merged, b.weight(d, d)])])


def _conv_layers(b: _Builder, h: str, c: int, pixels: int, layers) -> tuple[str, int]:
    """Apply ``layers`` to NCHW ``h`` with ``c`` channels; convolutions keep H and W ("same" padding)."""
    for kind, k in layers:
        pads = [k // 2] * 4
        if kind == "conv":
            out = 2 * c if c < 8 else c
            inputs = [h, b.weight(out, c, k, k, fan_in=c * k * k)]
            if k == 3:  # bias on some convolutions only
                inputs.append(b.weight(out, fan_in=1))
            h, c = b.op("Conv", inputs, kernel_shape=[k, k], pads=pads), out
        elif kind == "depthwise":
            h = b.op("Conv", [h, b.weight(c, 1, k, k, fan_in=k * k)], kernel_shape=[k, k], pads=pads, group=c)
        elif kind == "relu":
            h = b.op("Relu", [h])
        elif kind == "bias":
            h = b.op("Add", [h, b.weight(c, 1, 1, fan_in=1)])
        elif kind == "mul":
            h = b.op("Mul", [h, b.const((0.5 + b.rng.random((c, 1, 1))).astype(np.float32), "scale")])
    return h, c * pixels


def random_feed(spec: Spec, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """An input for ``build(spec)``; ``batch`` overrides B (the dynamic dimension)."""
    rng = np.random.default_rng(seed)
    dims = list(spec.dims)
    dims[0] = batch or dims[0]
    if spec.family == "seq" and not dims[1]:
        dims = [dims[0], dims[2]]
    return {"x": rng.standard_normal(dims).astype(np.float32)}
