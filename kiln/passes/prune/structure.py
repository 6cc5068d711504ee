"""Transformer structure discovery: blocks, their attention and MLP sublayers, and the residual stream.

Found from ops and dataflow alone, never from node names, so it works on graphs from torch.onnx's dynamo and legacy
exporters alike. The anchors are:

* **attention core**: a ``Softmax`` whose input comes (through Add/Mul/Where of masks and scales) from a MatMul of
  two activations (the scores ``Q K^T``), and whose output feeds, as the left operand, a second activation MatMul
  (the context ``P V``);
* **projections**: a ``MatMul`` with a constant 2-D weight ``W`` [K, N], optionally followed by ``Add`` of a
  constant bias [N]. Walking back over float activations from the scores' operands and from ``V`` reaches the Q, K
  and V projections; walking forward from the context reaches the output projection O;
* **residual Add**: the ``Add`` of O's output with another activation ``h``: ``h' = h + O(...)``. When ``h`` itself
  is the input of the Q projection, normalization comes after the Add (post-LN, BERT) and the sublayer's output is
  the ``LayerNormalization`` of ``h'``; otherwise (pre-LN, Llama) the sublayer's output is ``h'``;
* **MLP**: the next residual ``Add`` of that output with a projection (the down projection, ``fc2``), whose input
  comes back through activations to one (``fc1``) or two (SwiGLU ``gate`` and ``up``) projections.

Graph inputs met on the way back from K and V are the KV cache of a decode graph (``past``), and values on that way
that are graph outputs are its ``present`` outputs. A graph in which no attention core is found, or whose parts do
not chain into blocks, gets a :class:`StructureError` saying what is missing.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import onnx_ir as ir

from kiln.errors import KilnError
from kiln.passes import _weights

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_ACTIVATIONS = ("Sigmoid", "Gelu", "Relu", "Tanh", "Erf", "HardSigmoid", "Elu", "Softplus", "Mish", "HardSwish")
#: A backward or forward walk visiting more nodes than this is not inside one sublayer.
_WALK_LIMIT = 400


class StructureError(KilnError):
    """The graph's transformer structure is not recognized."""


@dataclasses.dataclass
class Projection:
    """``y = x @ W (+ b)`` with constant ``W`` [K, N] (and bias [N])."""

    matmul: ir.Node
    bias_add: ir.Node | None = None

    @property
    def weight(self) -> ir.Value:
        return self.matmul.inputs[1]

    @property
    def bias(self) -> ir.Value | None:
        if self.bias_add is None:
            return None
        return next(v for v in self.bias_add.inputs if v is not self.matmul.outputs[0])

    @property
    def input(self) -> ir.Value:
        return self.matmul.inputs[0]

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        k, n = _weights.constant_tensor(self.weight).shape.numpy()
        return int(k), int(n)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.matmul.name,
            "weight": self.weight.name,
            "shape": list(self.shape),
            "bias": bool(self.bias),
        }


@dataclasses.dataclass
class Attention:
    """Multi-head attention: projections, head layout and, in decode graphs, the KV cache."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection
    softmax: ir.Node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: KV-cache graph inputs (key, value) and outputs, in a decode graph.
    past: list[ir.Value] = dataclasses.field(default_factory=list)
    present: list[ir.Value] = dataclasses.field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "q": self.q.describe(),
            "k": self.k.describe(),
            "v": self.v.describe(),
            "o": self.o.describe(),
            "softmax": self.softmax.name,
            "past": [v.name for v in self.past],
            "present": [v.name for v in self.present],
        }


@dataclasses.dataclass
class MLP:
    """Feed-forward: ``down(act(up(x)))`` or SwiGLU ``down(act(gate(x)) * up(x))``."""

    up: Projection
    down: Projection
    gate: Projection | None = None

    @property
    def inner(self) -> list[Projection]:
        """The projections producing the intermediate channels (their columns are the MLP's neurons)."""
        return [p for p in (self.gate, self.up) if p is not None]

    def describe(self) -> dict[str, Any]:
        out = {"up": self.up.describe(), "down": self.down.describe(), "width": self.up.shape[1]}
        if self.gate is not None:
            out["gate"] = self.gate.describe()
        return out


@dataclasses.dataclass
class Sublayer:
    """One residual branch: ``output = [Norm](residual + branch)``."""

    kind: Literal["attention", "mlp"]
    residual: ir.Value
    add: ir.Node
    branch: ir.Value
    #: Post-LN graphs: the normalization applied after the residual Add.
    norm: ir.Node | None
    attention: Attention | None = None
    mlp: MLP | None = None

    @property
    def output(self) -> ir.Value:
        return (self.norm or self.add).outputs[0]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"residual": self.residual.name, "add": self.add.name, "output": self.output.name}
        out |= self.attention.describe() if self.attention is not None else self.mlp.describe()
        return out


@dataclasses.dataclass
class Block:
    """An attention sublayer and the MLP after it; either may be missing once a sublayer has been pruned."""

    index: int
    attention: Sublayer | None
    mlp: Sublayer | None

    def sublayers(self) -> tuple[Sublayer, ...]:
        return tuple(s for s in (self.attention, self.mlp) if s is not None)

    @property
    def input(self) -> ir.Value:
        return self.sublayers()[0].residual

    @property
    def output(self) -> ir.Value:
        return self.sublayers()[-1].output


@dataclasses.dataclass
class Structure:
    blocks: list[Block]
    norm: Literal["pre", "post"]

    def sublayers(self) -> Iterator[Sublayer]:
        for block in self.blocks:
            yield from block.sublayers()

    def attentions(self) -> list[Sublayer]:
        return [b.attention for b in self.blocks if b.attention is not None]

    def mlps(self) -> list[Sublayer]:
        return [b.mlp for b in self.blocks if b.mlp is not None]

    def describe(self) -> dict[str, Any]:
        attentions, mlps = self.attentions(), self.mlps()
        out: dict[str, Any] = {
            "blocks": len(self.blocks),
            "attention_sublayers": len(attentions),
            "mlp_sublayers": len(mlps),
            "norm": self.norm,
        }
        if attentions:
            attention = attentions[0].attention
            out |= {
                "hidden": attention.o.shape[1],
                "heads": attention.num_heads,
                "kv_heads": attention.num_kv_heads,
                "head_dim": attention.head_dim,
                "kv_cache": bool(attention.past),
            }
        if mlps:
            mlp = mlps[0].mlp
            out |= {"mlp": "gated" if mlp.gate is not None else "plain", "mlp_width": mlp.up.shape[1]}
        out["layers"] = [
            {"index": b.index, "input": b.input.name} | {s.kind: s.describe() for s in b.sublayers()}
            for b in self.blocks
        ]
        return out


# -- small graph predicates -------------------------------------------------------------------------------------------


def _is_float(value: ir.Value) -> bool:
    return value.dtype is None or value.dtype in _FLOAT_TYPES


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and _weights.constant_tensor(value) is not None


def _activations(node: ir.Node) -> list[ir.Value]:
    """The node's non-constant float inputs: the tensors data flows through (not shapes, masks or weights)."""
    return [v for v in node.inputs if v is not None and not _is_constant(v) and _is_float(v)]


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _projection_matmul(node: ir.Node | None) -> bool:
    if node is None or not _is_default(node) or node.op_type != "MatMul" or len(node.inputs) != 2:
        return False
    tensor = _weights.constant_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    return tensor is not None and len(tensor.shape) == 2 and not _is_constant(node.inputs[0])


def projection_of(value: ir.Value) -> Projection | None:
    """The projection producing ``value``, if ``value`` is ``x @ W`` or ``x @ W + b``."""
    node = value.producer()
    if _projection_matmul(node):
        return Projection(node)
    if node is not None and _is_default(node) and node.op_type == "Add" and len(node.inputs) == 2:
        for i in (0, 1):
            inner, bias = node.inputs[i], node.inputs[1 - i]
            if inner is not None and _projection_matmul(inner.producer()) and _is_constant(bias):
                matmul = inner.producer()
                n = _weights.constant_tensor(matmul.inputs[1]).shape[1]
                bias_shape = list(_weights.constant_tensor(bias).shape)
                if bias_shape == [n] and len(inner.uses()) == 1:
                    return Projection(matmul, node)
    return None


def _activation_matmul(node: ir.Node) -> bool:
    return _is_default(node) and node.op_type == "MatMul" and len(_activations(node)) == 2


@dataclasses.dataclass
class _Walk:
    projections: list[Projection]
    graph_inputs: list[ir.Value]
    graph_outputs: list[ir.Value]


def _walk_back(start: ir.Value, stop: ir.Value | None = None) -> _Walk:
    """Projections reached going back from ``start`` over float activations (stopping at each projection)."""
    walk = _Walk([], [], [])
    seen: set[ir.Value] = set()
    queue = collections.deque([start])
    while queue:
        value = queue.popleft()
        if value in seen or value is stop:
            continue
        seen.add(value)
        if len(seen) > _WALK_LIMIT:
            raise StructureError(f"walking back from {start.name!r} does not reach a projection within a sublayer")
        if value.is_graph_output():
            walk.graph_outputs.append(value)
        projection = projection_of(value)
        if projection is not None:
            walk.projections.append(projection)
            continue
        if value.is_graph_input():
            walk.graph_inputs.append(value)
            continue
        producer = value.producer()
        if producer is not None:
            queue.extend(_activations(producer))
    return walk


def _walk_forward(start: ir.Value, found: Any) -> ir.Node | None:
    """The first node downstream of ``start`` (breadth-first over float activations) with ``found(node, idx)``."""
    seen: set[ir.Value] = set()
    queue = collections.deque([start])
    while queue:
        value = queue.popleft()
        if value in seen:
            continue
        seen.add(value)
        if len(seen) > _WALK_LIMIT:
            return None
        for use in value.uses():
            if found(use.node, use.idx):
                return use.node
            queue.extend(o for o in use.node.outputs if _is_float(o))
    return None


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """The ``Q K^T`` MatMul feeding a Softmax through masks and scales."""
    seen: set[ir.Value] = set()
    queue = collections.deque(_activations(softmax))
    while queue:
        value = queue.popleft()
        producer = value.producer()
        if value in seen or producer is None or len(seen) > 16:
            continue
        seen.add(value)
        if _activation_matmul(producer):
            return producer
        if producer.op_type in ("Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity"):
            queue.extend(_activations(producer))
    return None


def _head_dim(projection: Projection) -> int | None:
    """The last dim of the Reshape splitting a projection's output into heads, from its output shape or constants."""
    for use in projection.output.uses():
        node = use.node
        if node.op_type != "Reshape" or use.idx != 0:
            continue
        shape = node.outputs[0].shape
        if shape is not None and len(shape) == 4 and isinstance(shape[-1], int):
            return shape[-1]
        target = _weights.constant_array(node.inputs[1])
        if target is not None and target.size == 4 and target[-1] > 0:
            return int(target[-1])
        producer = node.inputs[1].producer()
        if producer is not None and producer.op_type == "Concat" and producer.inputs:
            last = _weights.constant_array(producer.inputs[-1])
            if last is not None and last.size == 1 and last.item() > 0:
                return int(last.item())
    return None


def _unique(projections: list[Projection], what: str, where: str) -> Projection:
    nodes = {p.matmul: p for p in projections}
    if len(nodes) != 1:
        found = ", ".join(repr(n.name) for n in nodes) or "none"
        raise StructureError(f"attention at Softmax {where!r}: expected one {what} projection, found {found}")
    return next(iter(nodes.values()))


def _attention(softmax: ir.Node) -> tuple[Attention, ir.Node] | None:
    """The attention around ``softmax`` and the residual Add after its output projection; None if not attention."""
    scores = _scores_matmul(softmax)
    if scores is None:
        return None
    context = _walk_forward(softmax.outputs[0], lambda node, idx: _activation_matmul(node) and idx == 0)
    if context is None:
        return None
    where = softmax.name
    q = _unique(_walk_back(scores.inputs[0]).projections, "query", where)
    k_walk = _walk_back(scores.inputs[1])
    v_walk = _walk_back(context.inputs[1])
    k = _unique(k_walk.projections, "key", where)
    v = _unique(v_walk.projections, "value", where)
    o_node = _walk_forward(context.outputs[0], lambda node, idx: _projection_matmul(node) and idx == 0)
    if o_node is None:
        raise StructureError(f"attention at Softmax {where!r}: no output projection after the context MatMul")
    o = projection_of(o_node.outputs[0]) or Projection(o_node)
    if o.bias_add is None:
        with_bias = [u.node for u in o_node.outputs[0].uses()]
        if len(with_bias) == 1:
            o = projection_of(with_bias[0].outputs[0]) or o
    adds = [
        u.node
        for u in o.output.uses()
        if u.node.op_type == "Add" and _is_default(u.node) and len(_activations(u.node)) == 2
    ]
    if len(adds) != 1:
        raise StructureError(f"attention at Softmax {where!r}: no residual Add after output projection {o_node.name!r}")
    head_dim = _head_dim(q)
    if head_dim is None:
        raise StructureError(f"attention at Softmax {where!r}: cannot tell the head size from the Reshape after Q")
    heads, kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    if q.shape[1] != heads * head_dim or k.shape[1] != kv_heads * head_dim or kv_heads == 0 or heads % kv_heads:
        raise StructureError(
            f"attention at Softmax {where!r}: projection widths {q.shape[1]} (Q) and {k.shape[1]} (K) are not "
            f"whole numbers of heads of size {head_dim}"
        )
    past = [*k_walk.graph_inputs, *v_walk.graph_inputs]
    present = [*k_walk.graph_outputs, *v_walk.graph_outputs]
    return Attention(q, k, v, o, softmax, heads, kv_heads, head_dim, past, present), adds[0]


def _post_norm(add: ir.Node) -> ir.Node | None:
    uses = add.outputs[0].uses()
    if len(uses) == 1 and uses[0].node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
        return uses[0].node
    return None


def _mlp_after(stream: ir.Value, norm: Literal["pre", "post"]) -> Sublayer | None:
    """The MLP sublayer whose residual Add reads ``stream`` directly."""
    for use in stream.uses():
        add = use.node
        if add.op_type != "Add" or not _is_default(add) or len(_activations(add)) != 2:
            continue
        branch = add.inputs[1 - use.idx]
        down = projection_of(branch)
        if down is None:
            continue
        inner = {p.matmul: p for p in _walk_back(down.input, stop=stream).projections}
        if not 1 <= len(inner) <= 2:
            continue
        projections = list(inner.values())
        gate = None
        if len(projections) == 2:
            gated = [p for p in projections if any(u.node.op_type in _ACTIVATIONS for u in p.output.uses())]
            if len(gated) != 1:
                continue
            gate = gated[0]
            projections.remove(gate)
        post = _post_norm(add) if norm == "post" else None
        if norm == "post" and post is None:
            continue
        mlp = MLP(up=projections[0], down=down, gate=gate)
        return Sublayer("mlp", stream, add, branch, post, mlp=mlp)
    return None


def _mlp_before(stream: ir.Value, norm: Literal["pre", "post"]) -> Sublayer | None:
    """The MLP sublayer whose output is ``stream``."""
    producer = stream.producer()
    if producer is None:
        return None
    add = producer
    if norm == "post":
        if producer.op_type not in ("LayerNormalization", "SimplifiedLayerNormalization") or not producer.inputs:
            return None
        add = producer.inputs[0].producer()
    if add is None or add.op_type != "Add" or not _is_default(add):
        return None
    for residual in _activations(add):
        mlp = _mlp_after(residual, norm)
        if mlp is not None and mlp.add is add:
            return mlp
    return None


def _stand_in_after(stream: ir.Value, norm: Literal["pre", "post"]) -> ir.Value | None:
    """What a dropped sublayer with a stand-in leaves on the stream (then normalized, post-norm): ``h + c`` with
    ``c`` a constant, or ``h + (x A (B) + b)`` with ``x`` computed from ``h`` without projections (a linear
    stand-in of ``prune.blocks``)."""
    uses = stream.uses()
    for use in uses:
        add = use.node
        if add.op_type != "Add" or not _is_default(add):
            continue
        activations = _activations(add)
        constant = len(uses) == 1 and len(activations) == 1
        if not constant and not (len(activations) == 2 and _is_stand_in(activations[1 - use.idx], stream)):
            continue
        if norm == "post":
            post = _post_norm(add)
            return None if post is None else post.outputs[0]
        return add.outputs[0]
    return None


def _is_stand_in(branch: ir.Value, stream: ir.Value) -> bool:
    """``branch = x @ A (@ B) + b`` with constant ``A``, ``B``, ``b``, and ``x`` reached from ``stream`` through no
    projection (a normalization, or ``stream`` itself)."""
    node = branch.producer()
    if node is None or node.op_type != "Add" or not _is_default(node) or len(_activations(node)) != 1:
        return False
    (value,) = _activations(node)
    matmuls = 0
    while matmuls < 2 and (projection := projection_of(value)) is not None:
        value, matmuls = projection.input, matmuls + 1
    if matmuls == 0:
        return False
    walk = _walk_back(value, stop=stream)
    return not walk.projections and not walk.graph_inputs


def _stand_in_before(stream: ir.Value, norm: Literal["pre", "post"]) -> ir.Value | None:
    node = stream.producer()
    if norm == "post" and node is not None and node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Add" or not _is_default(node):
        return None
    return next((s for s in _activations(node) if _stand_in_after(s, norm) is stream), None)


def find_structure(model: ir.Model) -> Structure:
    """The transformer blocks of ``model``'s main graph, or a :class:`StructureError` saying what is missing.

    The residual stream is followed from the first attention sublayer, back over any MLP sublayers before it and
    forward to the last sublayer; an attention sublayer and the MLP right after it form a block.
    """
    graph = model.graph
    order = {node: i for i, node in enumerate(graph)}
    softmaxes = [n for n in graph if n.op_type == "Softmax" and _is_default(n)]
    if not softmaxes:
        raise StructureError(
            "no transformer structure: the main graph has no Softmax (attention core); fused attention ops and "
            "non-transformer models are not recognized"
        )
    found = [(softmax, _attention(softmax)) for softmax in softmaxes]
    attentions = [(softmax, result) for softmax, result in found if result is not None]
    if not attentions:
        raise StructureError(
            f"no transformer structure: none of the {len(softmaxes)} Softmax nodes sits between a scores MatMul "
            "(Q K^T) and a context MatMul (P V)"
        )
    attentions.sort(key=lambda item: order[item[0]])
    first_attention, first_add = attentions[0][1]
    residual_of_first = next(v for v in first_add.inputs if v is not first_attention.o.output)
    norm: Literal["pre", "post"] = "post" if first_attention.q.input is residual_of_first else "pre"
    by_residual: dict[ir.Value, Sublayer] = {}
    for softmax, (attention, add) in attentions:
        residual = next(v for v in add.inputs if v is not attention.o.output)
        post = _post_norm(add) if norm == "post" else None
        if norm == "post" and post is None:
            raise StructureError(f"post-norm attention at Softmax {softmax.name!r}: no normalization after its Add")
        by_residual[residual] = Sublayer("attention", residual, add, attention.o.output, post, attention=attention)

    sublayers: list[Sublayer] = []
    stream = residual_of_first
    while True:
        if (source := _stand_in_before(stream, norm)) is not None:
            stream = source
        elif (before := _mlp_before(stream, norm)) is not None:
            sublayers.insert(0, before)
            stream = before.residual
        else:
            break
    stream = residual_of_first
    while True:
        sublayer = by_residual.pop(stream, None)
        if sublayer is None and (after := _stand_in_after(stream, norm)) is not None:
            stream = after  # a sublayer pruned with a stand-in: its mean, or a linear map
            continue
        sublayer = sublayer or _mlp_after(stream, norm)
        if sublayer is None:
            break
        sublayers.append(sublayer)
        stream = sublayer.output
    if by_residual:
        softmax = next(iter(by_residual.values())).attention.softmax
        raise StructureError(
            f"attention at Softmax {softmax.name!r} is not on the residual stream that runs through the other "
            f"blocks (the stream ends at {stream.name!r})"
        )
    blocks: list[Block] = []
    for sublayer in sublayers:
        if sublayer.kind == "mlp" and blocks and blocks[-1].attention is not None and blocks[-1].mlp is None:
            blocks[-1].mlp = sublayer
        elif sublayer.kind == "attention":
            blocks.append(Block(len(blocks), sublayer, None))
        else:
            blocks.append(Block(len(blocks), None, sublayer))
    return Structure(blocks, norm)


def parameter_count(model: ir.Model) -> int:
    """Elements of all constant tensors (initializers and Constant nodes) of every graph."""
    from kiln.compiler.inspect import constant_tensors

    return sum(t.size for t in constant_tensors(model))
