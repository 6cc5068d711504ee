"""``ort-cpu``: the model with the session settings it was verified with (``session.json``), optionally optimized.

Every ONNX Runtime target shares :class:`OrtTarget`: it attaches the ONNX-function forms of kiln custom ops the
model uses (:mod:`kiln.targets.ort.custom_ops`), picks session config entries from the model's content
(:mod:`kiln.targets.ort.content`), writes ``session.json``, and loads the artifact that file names with exactly
those settings.

``ort-cpu`` options:

* ``optimize``: ``"none"`` (default) keeps ``model.onnx`` as the artifact and lets ORT optimize at every session
  start; ``"basic"``, ``"extended"`` or ``"all"`` save ORT's optimized graph as ``model.optimized.onnx`` (+ data)
  and report which fusions happened and why nodes stayed unfused. ``"extended"`` is the level to save: it holds
  every fusion (MatMulNBits, QLinear*, LayerNorm, GELU, attention) and is portable across x86 and ARM CPUs;
  ``"all"`` adds only layout transforms, and kiln leaves out the hardware-specific one (NCHWc) either way.
* ``threads``: intra-op threads (0: ONNX Runtime's default, one per physical core).
* ``dq_accuracy_level``: the accuracy level of MatMulNBits nodes ORT fuses from DequantizeLinear + MatMul (4: int8
  activations, ORT's default and fast path; 0: as exact as the graph).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort

from kiln.targets.base import Target
from kiln.targets.ort import custom_ops
from kiln.targets.ort.content import cpu_session_config
from kiln.targets.ort.optimize import fusion_report, save_optimized
from kiln.targets.ort.runner import OrtRunner, make_session
from kiln.targets.ort.settings import SessionSettings

OPTIMIZED_FILE = "model.optimized.onnx"


def session(out_dir: str | Path, *, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session for a compiled output directory, with its saved settings applied."""
    out_dir = Path(out_dir)
    settings = SessionSettings.read(out_dir)
    return make_session(out_dir / settings.model, settings=settings, threads=threads)


def check_accuracy_level(level: int) -> None:
    if not 0 <= level <= 4:
        raise ValueError(f"dq_accuracy_level must be 0..4, got {level}")


def prepare_model(model_file: Path, *, mobile: bool = False) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The model's graph (weights stay on disk) with kiln custom ops' function forms attached and saved back.

    Returns it with the custom-op domains sessions must register and notes on ops running as functions.
    """
    proto = onnx.load(str(model_file), load_external_data=False)
    functions = len(proto.functions)
    domains, notes = custom_ops.prepare(proto, mobile=mobile)
    if len(proto.functions) != functions:
        onnx.save(proto, str(model_file))
    return proto, domains, notes


class OrtTarget(Target):
    """What every ONNX Runtime target shares: ``load`` runs the artifact ``session.json`` names, as verified."""

    def load(self, out_dir: Path) -> OrtRunner:
        return OrtRunner(session(out_dir))


@dataclasses.dataclass
class CpuOptions:
    """Options of ``ort-cpu`` (see the module docstring)."""

    optimize: Literal["none", "basic", "extended", "all"] = "none"
    threads: int = 0
    dq_accuracy_level: int = 4

    def __post_init__(self) -> None:
        check_accuracy_level(self.dq_accuracy_level)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


class OrtCpuTarget(OrtTarget):
    name = "ort-cpu"
    summary = "ONNX Runtime on CPU: model.onnx (or ORT's optimized graph) + session.json"
    Options = CpuOptions

    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        opts = self.options
        proto, domains, notes = prepare_model(model_file)
        config, reasons = cpu_session_config(proto, opts.dq_accuracy_level)
        settings = SessionSettings(
            model=model_file.name,
            intra_op_num_threads=opts.threads,
            session_config=config,
            custom_op_domains=domains,
            notes=reasons,
        )
        details: dict[str, Any] = {"options": dataclasses.asdict(opts)}
        if notes:
            details["custom_ops"] = notes
        if opts.optimize != "none":
            dest = out_dir / OPTIMIZED_FILE
            transformers = save_optimized(model_file, dest, opts.optimize, settings)
            optimized = onnx.load(str(dest), load_external_data=False)
            details["optimization"] = fusion_report(proto, optimized, opts.optimize, transformers)
            settings.model = dest.name
            settings.notes["model"] = (
                f"ONNX Runtime's graph, optimized offline at level '{opts.optimize}' without the hardware-specific "
                "NCHWc layout; ORT_ENABLE_ALL at load adds only that layout, for the CPU it runs on"
            )
        settings.write(out_dir)
        details["session"] = settings.to_json()
        return details
