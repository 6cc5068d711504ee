"""Tiny graphs for tests of kiln and of passes users write against kiln's API.

Graphs are built with onnx_ir, fully typed (inputs, outputs and weights), so they pass the ONNX checker and run in
ONNX Runtime as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT


def value(name: str, shape: Sequence[int | str], dtype: ir.DataType = FLOAT) -> ir.Value:
    """A typed graph value."""
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def initializer(name: str, array: np.ndarray) -> ir.Value:
    """A value holding ``array`` as a constant, ready for ``Graph(initializers=...)``."""
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))


def model(
    inputs: Sequence[ir.Value],
    outputs: Sequence[ir.Value],
    nodes: Sequence[ir.Node],
    initializers: Sequence[ir.Value] = (),
    *,
    opset: int = 21,
    name: str = "tiny",
) -> ir.Model:
    """A model with the default opset ``opset`` (ir_version 10)."""
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": opset}, name=name)
    return ir.Model(graph, ir_version=10, producer_name="kiln.testing")


def mlp(sizes: Sequence[int], *, batch: int | str = "batch", seed: int = 0, opset: int = 21) -> ir.Model:
    """x -> MatMul -> Add(bias) -> Relu -> ... -> y, one layer per consecutive pair in ``sizes``.

    The last layer has no Relu. Weights are N(0, 1/sqrt(fan_in)) so activations stay O(1).
    """
    rng = np.random.default_rng(seed)
    x = value("x", [batch, sizes[0]])
    current, nodes, inits = x, [], []
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        w = initializer(f"w{i}", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        b = initializer(f"b{i}", (0.1 * rng.standard_normal(n)).astype(np.float32))
        inits += [w, b]
        mm = ir.node("MatMul", [current, w], name=f"matmul{i}")
        add = ir.node("Add", [mm.outputs[0], b], name=f"add{i}")
        nodes += [mm, add]
        current = add.outputs[0]
        if i < len(sizes) - 2:
            relu = ir.node("Relu", [current], name=f"relu{i}")
            nodes.append(relu)
            current = relu.outputs[0]
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"h{i}"
    current.name = "y"
    current.type = ir.TensorType(FLOAT)
    current.shape = ir.Shape([batch, sizes[-1]])
    return model([x], [current], nodes, inits, opset=opset, name="mlp")


def write_matmul_chain(directory: str | Path, *, layers: int, dim: int, seed: int = 0) -> Path:
    """Write ``directory/model.onnx``: ``layers`` MatMuls of ``dim`` x ``dim`` fp32 weights in external data.

    Weights are generated and written one at a time and referenced as external tensors, so a model larger than
    memory is written without ever holding more than one weight (nor a large ModelProto) in memory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    x = value("x", ["batch", dim])
    current, nodes, inits, offset = x, [], [], 0
    with open(directory / data_name, "wb") as data:
        for i in range(layers):
            weight = (rng.standard_normal((dim, dim), dtype=np.float32) / np.float32(np.sqrt(dim))).astype(np.float32)
            data.write(weight.tobytes())
            tensor = ir.ExternalTensor(
                data_name, offset, weight.nbytes, FLOAT, shape=ir.Shape([dim, dim]), name=f"w{i}", base_dir=directory
            )
            offset += weight.nbytes
            w = ir.Value(name=f"w{i}", const_value=tensor, type=ir.TensorType(FLOAT), shape=ir.Shape([dim, dim]))
            inits.append(w)
            node = ir.node("MatMul", [current, w], name=f"matmul{i}")
            current = node.outputs[0]
            current.name = f"h{i}"
            current.type, current.shape = ir.TensorType(FLOAT), ir.Shape(["batch", dim])
            nodes.append(node)
    current.name = "y"
    path = directory / "model.onnx"
    ir.save(model([x], [current], nodes, inits, name="matmul_chain"), path)
    return path


def write_llama(
    directory: str | Path,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int = 0,
    seed: int = 0,
) -> Path:
    """Write ``directory/model.onnx``: a Llama-shaped decoder with random fp32 weights in external data.

    ``input_ids`` [batch, seq] -> embedding Gather -> ``layers`` x (RMSNorm, Q/K/V/O projections with multi-head
    attention, RMSNorm, SiLU-gated MLP of width ``intermediate``, residuals) -> RMSNorm -> LM head -> ``logits``.
    Ops are spelled as exporters write them before fusion (RMSNorm as Mul/ReduceMean/Add/Sqrt/Reciprocal, SiLU as
    Sigmoid*Mul); rotary embeddings and the causal mask are left out, since they hold no weights. Like
    :func:`write_matmul_chain`, weights are generated and written one at a time, so the model may exceed memory.
    ``kv_heads`` (0: ``heads``) makes grouped-query attention: K and V have ``kv_heads`` heads, repeated to
    ``heads`` by Unsqueeze -> Expand -> Reshape as exporters write ``repeat_kv``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    nodes: list[ir.Node] = []
    inits: list[ir.Value] = []
    offset = 0

    def small(name: str, array: np.ndarray) -> ir.Value:
        inits.append(initializer(name, array))
        return inits[-1]

    def op(op_type: str, inputs: Sequence[ir.Value], name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=name)
        node.outputs[0].name = name
        nodes.append(node)
        return node.outputs[0]

    with open(directory / data_name, "wb") as data:

        def weight(name: str, shape: tuple[int, ...], *, ones: bool = False) -> ir.Value:
            nonlocal offset
            if ones:
                array = np.ones(shape, np.float32)
            else:
                array = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[0]))
            data.write(array.tobytes())
            tensor = ir.ExternalTensor(
                data_name, offset, array.nbytes, FLOAT, shape=ir.Shape(shape), name=name, base_dir=directory
            )
            offset += array.nbytes
            inits.append(ir.Value(name=name, const_value=tensor, type=ir.TensorType(FLOAT), shape=ir.Shape(shape)))
            return inits[-1]

        last_axis = small("last_axis", np.array([-1], np.int64))
        eps = small("eps", np.array(1e-5, np.float32))
        scale = small("attention_scale", np.array(1 / np.sqrt(head_dim), np.float32))
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        split_heads = small("split_heads", np.array([0, 0, heads, head_dim], np.int64))
        if kv_heads != heads:
            split_kv = small("split_kv_heads", np.array([0, 0, kv_heads, head_dim], np.int64))
            unsqueeze_axis = small("repeat_axis", np.array([2], np.int64))
            repeat = small("repeat_shape", np.array([1, kv_heads, heads // kv_heads, 1, head_dim], np.int64))
            repeated = small("repeated_shape", np.array([0, heads, -1, head_dim], np.int64))
        merge_heads = small("merge_heads", np.array([0, 0, hidden], np.int64))

        def rms_norm(x: ir.Value, prefix: str) -> ir.Value:
            mean = op("ReduceMean", [op("Mul", [x, x], f"{prefix}.square"), last_axis], f"{prefix}.mean")
            root = op("Sqrt", [op("Add", [mean, eps], f"{prefix}.add_eps")], f"{prefix}.sqrt")
            normed = op("Mul", [x, op("Reciprocal", [root], f"{prefix}.rstd")], f"{prefix}.normed")
            return op("Mul", [normed, weight(f"{prefix}.weight", (hidden,), ones=True)], f"{prefix}.out")

        def heads_of(x: ir.Value, perm: list[int], name: str) -> ir.Value:
            return op("Transpose", [op("Reshape", [x, split_heads], f"{name}.split")], f"{name}.heads", perm=perm)

        def kv_heads_of(x: ir.Value, perm: list[int], name: str) -> ir.Value:
            """[batch, seq, kv * d] -> [batch, heads, seq, d] (repeated), then ``perm``."""
            if kv_heads == heads:
                return heads_of(x, perm, name)
            split = op("Transpose", [op("Reshape", [x, split_kv], f"{name}.split")], f"{name}.kv", perm=[0, 2, 1, 3])
            grown = op("Expand", [op("Unsqueeze", [split, unsqueeze_axis], f"{name}.unsqueeze"), repeat], f"{name}.x")
            return op("Transpose", [op("Reshape", [grown, repeated], f"{name}.repeated")], f"{name}.heads", perm=perm)

        input_ids = value("input_ids", ["batch", "seq"], ir.DataType.INT64)
        h = op("Gather", [weight("embed_tokens", (vocab, hidden)), input_ids], "embed")
        for i in range(layers):
            p = f"layers.{i}"
            x = rms_norm(h, f"{p}.input_norm")
            widths = {"q": hidden, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
            proj = {n: op("MatMul", [x, weight(f"{p}.{n}_proj", (hidden, w))], f"{p}.{n}") for n, w in widths.items()}
            q = heads_of(proj["q"], [0, 2, 1, 3], f"{p}.q")
            k = kv_heads_of(proj["k"], [0, 2, 3, 1] if kv_heads == heads else [0, 1, 3, 2], f"{p}.k")
            v = kv_heads_of(proj["v"], [0, 2, 1, 3] if kv_heads == heads else [0, 1, 2, 3], f"{p}.v")
            scores = op("Mul", [op("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scores")
            context = op("MatMul", [op("Softmax", [scores], f"{p}.probs", axis=-1), v], f"{p}.context")
            merged = op("Reshape", [op("Transpose", [context], f"{p}.t", perm=[0, 2, 1, 3]), merge_heads], f"{p}.m")
            attention = op("MatMul", [merged, weight(f"{p}.o_proj", (hidden, hidden))], f"{p}.o")
            h = op("Add", [h, attention], f"{p}.attention_residual")
            x = rms_norm(h, f"{p}.post_attention_norm")
            gate = op("MatMul", [x, weight(f"{p}.gate_proj", (hidden, intermediate))], f"{p}.gate")
            up = op("MatMul", [x, weight(f"{p}.up_proj", (hidden, intermediate))], f"{p}.up")
            silu = op("Mul", [gate, op("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
            down = op(
                "MatMul",
                [op("Mul", [silu, up], f"{p}.gated"), weight(f"{p}.down_proj", (intermediate, hidden))],
                f"{p}.down",
            )
            h = op("Add", [h, down], f"{p}.mlp_residual")
        logits = op("MatMul", [rms_norm(h, "norm"), weight("lm_head", (hidden, vocab))], "logits")
    logits.type, logits.shape = ir.TensorType(FLOAT), ir.Shape(["batch", "seq", vocab])
    path = directory / "model.onnx"
    ir.save(model([input_ids], [logits], nodes, inits, name="llama"), path)
    return path
