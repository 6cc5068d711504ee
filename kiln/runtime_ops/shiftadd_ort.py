"""Run ``ai.kiln.ShiftAddMatMul`` in ONNX Runtime on the table-lookup kernel, through onnxruntime-extensions.

ONNX Runtime's C headers are not available here, so the kernel is registered as an onnxruntime-extensions PyOp: a
Python callable ONNX Runtime invokes with numpy arrays, which calls the compiled kernel
(:mod:`kiln.runtime_ops.shiftadd_kernel`). PyOps live in the ``ai.onnx.contrib`` domain, so :func:`use_kernel`
moves a model's ShiftAddMatMul nodes there and drops the function form; :func:`session_options` loads the
extensions library into a session. A model kiln writes keeps the ``ai.kiln`` domain and its function form, and
runs on any runtime without this module.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.errors import KilnError
from kiln.runtime_ops import shiftadd, shiftadd_kernel

KERNEL_DOMAIN = "ai.onnx.contrib"
_settings: dict[str, object] = {"threads": 1, "activations": "int8"}


@functools.cache
def _extensions() -> str:
    """Declare the PyOp (once per process) and return the extensions library's path."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise KilnError("the shift-add ONNX Runtime kernel needs onnxruntime-extensions (pip install it)") from None
    int64 = PyCustomOpDef.dt_int64

    @onnx_op(
        op_type=shiftadd.OP_TYPE,
        inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_int8],
        outputs=[PyCustomOpDef.dt_float],
        attrs=dict.fromkeys(shiftadd.ATTRIBUTES, int64),
    )
    def shift_add_matmul(a: np.ndarray, planes: np.ndarray, exponents: np.ndarray, **attrs: int) -> np.ndarray:
        packed = shiftadd.PackedWeight(planes, exponents, *(attrs[name] for name in shiftadd.ATTRIBUTES))
        return shiftadd_kernel.matmul(a, packed, _settings["threads"], _settings["activations"])

    return get_library_path()


def session_options(threads: int = 1, activations: shiftadd_kernel.Activations = "int8") -> ort.SessionOptions:
    """ONNX Runtime session options that run ShiftAddMatMul nodes of ``use_kernel`` models on the kernel.

    ``activations`` picks the kernel (:func:`kiln.runtime_ops.shiftadd_kernel.matmul`): "int8" (the fast one; 8-bit
    activations per group, as MatMulNBits' accuracy_level 4) or "float" (float tables, float32 rounding only). The
    settings are the process's: every session of these options shares them.
    """
    configure(threads, activations)
    options = ort.SessionOptions()
    options.register_custom_ops_library(_extensions())
    return options


def configure(threads: int, activations: shiftadd_kernel.Activations) -> None:
    """Set the kernel's threads and activation mode for every session of this process from now on."""
    if threads < 1:
        raise KilnError(f"threads must be >= 1, got {threads}")
    if activations not in ("float", "int8"):
        raise KilnError(f"activations must be 'float' or 'int8', got {activations!r}")
    _settings["threads"], _settings["activations"] = threads, activations


def use_kernel(model: ir.Model) -> int:
    """Point ``model``'s ShiftAddMatMul nodes at the kernel (in place); returns how many were moved.

    Only float32 activations are supported by the kernel; a node with another A type is refused. A node without
    ``mantissa_bits`` (written before it existed) gets 0, its meaning then.
    """
    moved = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == shiftadd.DOMAIN and node.op_type == shiftadd.OP_TYPE:
            a = node.inputs[0]
            if a is None or a.dtype not in (None, ir.DataType.FLOAT):
                raise KilnError(f"node {node.name!r}: the shift-add kernel takes float32 activations")
            group = node.attributes.get_int("group_size")
            if group is None or group % 8:
                raise KilnError(f"node {node.name!r}: the shift-add kernel needs group_size a multiple of 8")
            if "mantissa_bits" not in node.attributes:  # written before the attribute existed: powers of two
                node.attributes["mantissa_bits"] = ir.AttrInt64("mantissa_bits", 0)
            node.domain = KERNEL_DOMAIN
            moved += 1
    if moved:
        model.functions.pop((shiftadd.DOMAIN, shiftadd.OP_TYPE, ""), None)
        model.opset_imports.pop(shiftadd.DOMAIN, None)
        model.opset_imports.setdefault(KERNEL_DOMAIN, 1)
    return moved
