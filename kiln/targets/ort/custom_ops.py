"""kiln's own operator domains, and how each ONNX Runtime build runs them.

A pass that emits an operator ONNX has no name for (a shift-add matmul, say) registers its domain here with up to
two implementations of each op:

* an **ONNX function** (a ``FunctionProto`` of standard ops): portable and always correct, runs in every ONNX
  Runtime build, mobile and minimal builds included (ORT inlines it when it loads or converts the model);
* **native kernels**: a ``register_kernels(SessionOptions)`` hook that makes a kernel library known to a session
  (e.g. ``options.register_custom_ops_library(path)``). It is faster, but exists only where the library was built,
  and ``mobile`` says whether mobile builds include it.

When a target builds a model that uses a registered domain, it attaches the function forms to the model (so the
file stays self-contained and runnable anywhere) and lists the domain in ``session.json`` when native kernels
exist; ONNX Runtime prefers a registered kernel over inlining the function. An op with neither form cannot be
deployed and the target says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import onnx
import onnxruntime as ort

from kiln.errors import KilnError
from kiln.targets.ort.content import STANDARD_DOMAINS, iter_nodes


@dataclasses.dataclass(frozen=True)
class CustomDomain:
    """A kiln operator domain: its ops' ONNX-function forms, and optional native kernels."""

    name: str
    #: Op type -> its ONNX-function form (``FunctionProto.domain`` must be ``name``, ``.name`` the op type).
    functions: Mapping[str, onnx.FunctionProto] = dataclasses.field(default_factory=dict)
    #: Registers native kernels for the domain's ops in a session; ``None`` when there are none.
    register_kernels: Callable[[ort.SessionOptions], None] | None = None
    #: The native kernels are built into ONNX Runtime Mobile packages too.
    mobile: bool = False

    def __post_init__(self) -> None:
        for op_type, function in self.functions.items():
            if (function.domain, function.name) != (self.name, op_type):
                raise ValueError(
                    f"function for {self.name}.{op_type} is named {function.domain}.{function.name}; they must match"
                )


_DOMAINS: dict[str, CustomDomain] = {}


def register(domain: CustomDomain) -> CustomDomain:
    """Make ``domain`` known to every ONNX Runtime target; registering the same name twice replaces it."""
    _DOMAINS[domain.name] = domain
    return domain


def unregister(name: str) -> None:
    """Forget a domain (tests register throwaway domains)."""
    _DOMAINS.pop(name, None)


def get(name: str) -> CustomDomain | None:
    """The registered domain ``name``, or ``None``."""
    return _DOMAINS.get(name)


def register_kernels(name: str, options: ort.SessionOptions) -> None:
    """Register domain ``name``'s native kernels in a session (``session.json`` lists it)."""
    domain = _DOMAINS.get(name)
    if domain is None or domain.register_kernels is None:
        raise KilnError(
            f"the model needs native kernels of custom-op domain {name!r}, which no imported kiln module registers "
            "(import the pass that emits it first)"
        )
    domain.register_kernels(options)


def prepare(model: onnx.ModelProto, *, mobile: bool = False) -> tuple[list[str], list[str]]:
    """Attach the function forms of kiln ops ``model`` uses; refuse ops no ONNX Runtime build can run.

    Returns the domains whose native kernels sessions must register, and one note per op that runs in its ONNX
    function form. ``mobile``: only kernels that mobile builds include count as native.
    """
    local = {(f.domain, f.name) for f in model.functions}
    native: set[str] = set()
    notes: dict[tuple[str, str], str] = {}
    for node in iter_nodes(model.graph):
        key = (node.domain, node.op_type)
        if node.domain in STANDARD_DOMAINS or key in notes:
            continue
        domain = get(node.domain)
        if domain is None:
            if key not in local:
                raise KilnError(_unknown_op(node, mobile))
            continue
        has_kernels = domain.register_kernels is not None and (domain.mobile or not mobile)
        function = domain.functions.get(node.op_type)
        if function is None and not has_kernels:
            where = "for ONNX Runtime Mobile" if mobile and domain.register_kernels else "at all"
            raise KilnError(
                f"node {node.name!r} ({node.domain}.{node.op_type}): kiln has no native kernel {where} and no "
                "ONNX-function form for this op"
            )
        if function is not None and key not in local:
            _attach(model, function)
            local.add(key)
        if has_kernels:
            native.add(node.domain)
        else:
            why = (
                "its native kernels are not in mobile builds" if domain.register_kernels else "it has no native kernel"
            )
            notes[key] = f"{node.domain}.{node.op_type} runs as its ONNX-function form ({why})"
    return sorted(native), list(notes.values())


def _attach(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Add ``function`` to the model, with the opset imports its body needs."""
    imported = {o.domain: o.version for o in model.opset_import}
    for opset in function.opset_import:
        if opset.domain not in imported:
            model.opset_import.append(onnx.helper.make_opsetid(opset.domain, opset.version))
        elif imported[opset.domain] != opset.version:
            raise KilnError(
                f"function {function.domain}.{function.name} imports {opset.domain or 'ai.onnx'} version "
                f"{opset.version}, the model version {imported[opset.domain]}"
            )
    model.functions.append(function)


def _unknown_op(node: onnx.NodeProto, mobile: bool) -> str:
    what = f"node {node.name!r} ({node.domain}.{node.op_type})"
    if node.domain == "ai.onnx.contrib":
        where = (
            "built into the mobile app (ONNX Runtime built with --use_extensions); Python-defined PyOps cannot run on "
            "mobile at all"
            if mobile
            else "registered in every session"
        )
        return (
            f"{what} is an onnxruntime-extensions op: it needs that custom-op library {where}, and kiln has no "
            "ONNX-function form for it"
        )
    return (
        f"{what} uses custom-op domain {node.domain!r}, which neither a kiln custom-op domain nor a model-local "
        "function implements; ONNX Runtime cannot run it"
    )
