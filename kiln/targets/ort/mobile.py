"""``ort-mobile``: the model in ORT format (``model.ort``) plus the operator list a reduced-size ORT build needs.

ONNX Runtime's mobile packages (``onnxruntime-android``, the ``onnxruntime-c``/``-objc`` pods) are full builds with
the ONNX and ``com.microsoft`` CPU kernels; a custom minimal build (``--minimal_build --include_ops_by_config
required_operators.config``) holds only the kernels listed in that file and loads only ORT-format models, applying
no graph optimizations of its own. So kiln optimizes while converting, like ``python -m
onnxruntime.tools.convert_onnx_models_to_ort`` does (level ``optimize``, default ``all`` without the x86-only NCHWc
layout), writes ``model.ort`` and ``required_operators.config`` (``required_operators_and_types.config`` with
``type_reduction``), and verifies the ``.ort`` file with optimizations off, as a minimal build runs it.

What cannot go to mobile is refused before conversion, with the reason:

* ops of custom domains that no mobile build implements: onnxruntime-extensions ops (``ai.onnx.contrib``) need that
  library compiled into the app, and Python-defined PyOps cannot run on a phone at all. A kiln custom op runs in its
  ONNX-function form instead when it has one (its native kernels are used only if they are built for mobile), and
  the report says so;
* ``com.microsoft`` ops without a CPU kernel (CUDA-only contrib ops);
* tensors the ORT format cannot store: 2- and 4-bit (and 4-bit float) types. Weight DequantizeLinear nodes that ORT
  fuses into MatMulNBits are fine (it packs them into bytes); one that stays unfused is refused with the fusion
  report's reason;
* models of 2 GB or more (the ORT format is one FlatBuffer, without external data).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, NoReturn

import onnx

from kiln.compiler.io import model_bytes
from kiln.errors import KilnError
from kiln.targets.ort.content import cpu_kernels, cpu_session_config, iter_nodes
from kiln.targets.ort.optimize import fusion_report, save_optimized
from kiln.targets.ort.settings import SessionSettings
from kiln.targets.ort.target import OrtTarget, check_accuracy_level, prepare_model

ORT_FILE = "model.ort"
#: Tensor types the ORT format (FlatBuffer schema of ORT 1.32) has no encoding for.
_NO_ORT_FORMAT = {
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
    onnx.TensorProto.INT2,
    onnx.TensorProto.UINT2,
    onnx.TensorProto.FLOAT4E2M1,
}
_MAX_BYTES = 2**31


@dataclasses.dataclass
class MobileOptions:
    """Options of ``ort-mobile`` (see the module docstring)."""

    optimize: Literal["basic", "extended", "all"] = "all"
    type_reduction: bool = False
    dq_accuracy_level: int = 4

    def __post_init__(self) -> None:
        check_accuracy_level(self.dq_accuracy_level)


class OrtMobileTarget(OrtTarget):
    name = "ort-mobile"
    summary = "ONNX Runtime Mobile: model.ort (ORT format) + required_operators.config for a reduced build"
    Options = MobileOptions

    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        opts = self.options
        size = model_bytes(model_file)
        if size >= _MAX_BYTES:
            raise KilnError(f"the model is {size / 2**30:.1f} GiB; an ORT-format model must stay below 2 GiB")
        proto, domains, notes = prepare_model(model_file, mobile=True)
        _check_kernels(proto)
        config, reasons = cpu_session_config(proto, opts.dq_accuracy_level)
        settings = SessionSettings(
            model=ORT_FILE,
            graph_optimization_level="ORT_DISABLE_ALL",
            session_config=config,
            custom_op_domains=domains,
            notes=reasons,
        )
        with tempfile.TemporaryDirectory(prefix="kiln-mobile-") as tmp:
            optimized_file = Path(tmp) / "optimized.onnx"
            transformers = save_optimized(model_file, optimized_file, opts.optimize, settings)
            optimized = onnx.load(str(optimized_file), load_external_data=False)
        report = fusion_report(proto, optimized, opts.optimize, transformers)
        _check_ort_format_types(optimized, report)
        save_optimized(model_file, out_dir / ORT_FILE, opts.optimize, settings, ort_format=True)
        config_file = _write_operator_config(out_dir / ORT_FILE, opts.type_reduction)
        settings.notes["graph_optimization_level"] = (
            f"model.ort was optimized at conversion (level '{opts.optimize}'); a minimal ORT build applies no "
            "optimizations at load, so kiln runs it with none"
        )
        settings.write(out_dir)
        details: dict[str, Any] = {
            "options": dataclasses.asdict(opts),
            "ort_bytes": (out_dir / ORT_FILE).stat().st_size,
            "operator_config": config_file.name,
            "optimization": report,
            "session": settings.to_json(),
        }
        if notes:
            details["custom_ops"] = notes
        return details


def _check_kernels(model: onnx.ModelProto) -> None:
    """Refuse contrib ops no CPU kernel implements: mobile builds run on the CPU provider."""
    kernels = cpu_kernels()
    if kernels is None:
        _check_kernels_by_loading(model)
        return
    for node in iter_nodes(model.graph):
        if node.domain.startswith("com.microsoft") and (node.domain, node.op_type) not in kernels:
            _refuse(node)


def _check_kernels_by_loading(model: onnx.ModelProto) -> None:
    """For onnxruntime builds that cannot list their kernels: a CPU-only session of ``model`` names the first node
    without one (other load failures are left to the checks after conversion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        found = re.search(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'", str(e))
        node = next((n for n in iter_nodes(model.graph) if found and n.name == found[2]), None)
        if node is not None:
            _refuse(node)


def _refuse(node: onnx.NodeProto) -> NoReturn:
    raise KilnError(
        f"node {node.name!r} ({node.domain}.{node.op_type}) has no CPU kernel in ONNX Runtime, so no mobile build "
        "can run it"
    )


def _check_ort_format_types(optimized: onnx.ModelProto, report: dict[str, Any]) -> None:
    """Refuse tensors the ORT format cannot store, naming why they were not fused away."""
    bad = [t for t in optimized.graph.initializer if t.data_type in _NO_ORT_FORMAT]
    if not bad:
        return
    kind = onnx.TensorProto.DataType.Name(bad[0].data_type)
    reasons = "; ".join(f"{', '.join(g['nodes'][:3])}: {g['reason']}" for g in report["unfused"]) or "none reported"
    raise KilnError(
        f"the ORT format cannot store {kind} tensors and {len(bad)} remain after optimization (e.g. "
        f"{bad[0].name!r}); unfused: {reasons}. Use quantize.rtn format='matmulnbits' for mobile"
    )


def _write_operator_config(ort_file: Path, type_reduction: bool) -> Path:
    """``required_operators[_and_types].config`` beside ``ort_file``, from ONNX Runtime's own tool."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    name = "required_operators_and_types.config" if type_reduction else "required_operators.config"
    path = ort_file.parent / name
    create_config_from_models([ort_file], path, type_reduction)
    # The tool names the model by the path it had here (kiln's temporary directory); the name is what stays true.
    path.write_text(path.read_text().replace(str(ort_file), ort_file.name))
    return path
