"""``session.json``: the ONNX Runtime settings a compiled model was verified with, so they travel with the model.

A session's results and speed depend on more than the graph: the optimization level, the thread pools, session
config entries (``session.qdq_matmulnbits_accuracy_level`` decides the precision of the MatMulNBits nodes ORT fuses
at load; ``mlas.use_lut_gemm`` switches 2-bit kernels), the execution providers and their options, and custom-op
domains that must be registered. :class:`SessionSettings` holds all of them, is written beside the model, and
:meth:`SessionSettings.session_options` turns it back into exactly the session kiln verified. ``notes`` says why
kiln chose each setting, for the people deploying the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

from kiln.errors import KilnError

SESSION_FILE = "session.json"

LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


@dataclasses.dataclass
class Provider:
    """An execution provider and its options (values as strings, as ONNX Runtime takes them)."""

    name: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SessionSettings:
    """Everything needed to rebuild the verified session; the JSON form is :data:`SESSION_FILE`."""

    #: The artifact to load, relative to the output directory.
    model: str = "model.onnx"
    providers: list[Provider] = dataclasses.field(default_factory=lambda: [Provider("CPUExecutionProvider")])
    graph_optimization_level: str = "ORT_ENABLE_ALL"
    #: 0 lets ONNX Runtime choose (one thread per physical core).
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    session_config: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Custom-op domains whose kernels :mod:`kiln.targets.ort.custom_ops` registers in each session.
    custom_op_domains: list[str] = dataclasses.field(default_factory=list)
    #: Why each non-default setting was chosen, by setting name.
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = SESSION_FILE) -> SessionSettings:
        """Parse and validate; a malformed file is a :class:`KilnError` naming ``source``."""
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}")
            fields = dict(data)
            if "providers" in fields:
                # Plain names are accepted too: session.json files written before provider options existed.
                fields["providers"] = [
                    Provider(p) if isinstance(p, str) else Provider(p["name"], _strings(p.get("options", {})))
                    for p in fields["providers"]
                ]
            if "session_config" in fields:
                fields["session_config"] = _strings(fields["session_config"])
            settings = cls(**fields)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise KilnError(f"{source}: malformed session settings ({e})") from None
        if settings.graph_optimization_level not in LEVELS:
            raise KilnError(
                f"{source}: graph_optimization_level {settings.graph_optimization_level!r} is not one of "
                + ", ".join(LEVELS)
            )
        if not settings.providers:
            raise KilnError(f"{source}: no execution providers")
        return settings

    @classmethod
    def read(cls, out_dir: Path) -> SessionSettings:
        path = out_dir / SESSION_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise KilnError(f"{out_dir}: no {SESSION_FILE} (not an ONNX Runtime output directory)") from None
        except ValueError as e:
            raise KilnError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise KilnError(f"{path}: malformed session settings (not an object)")
        return cls.from_json(data, source=str(path))

    def write(self, out_dir: Path) -> None:
        (out_dir / SESSION_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def check_providers(self) -> None:
        """A clear error when this machine's onnxruntime lacks a provider (before ORT silently falls back)."""
        available = ort.get_available_providers()
        missing = [p.name for p in self.providers if p.name not in available]
        if missing:
            raise KilnError(
                f"these settings need execution provider {missing[0]}; this machine's onnxruntime "
                f"{ort.__version__} has providers {available}"
            )

    def session_options(self, *, threads: int | None = None) -> ort.SessionOptions:
        """The ``SessionOptions`` these settings describe; ``threads`` overrides the intra-op thread count."""
        from kiln.targets.ort import custom_ops

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.graph_optimization_level)
        intra = self.intra_op_num_threads if threads is None else threads
        if intra:
            options.intra_op_num_threads = int(intra)
        if self.inter_op_num_threads:
            options.inter_op_num_threads = int(self.inter_op_num_threads)
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, value)
        for domain in self.custom_op_domains:
            custom_ops.register_kernels(domain, options)
        return options

    def provider_arguments(self) -> tuple[list[str], list[dict[str, str]]]:
        """``providers`` and ``provider_options`` for ``ort.InferenceSession``."""
        return [p.name for p in self.providers], [dict(p.options) for p in self.providers]


def _strings(mapping: Mapping[str, Any]) -> dict[str, str]:
    """ONNX Runtime takes config and provider option values as strings; JSON may hold numbers or booleans."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"expected an object, got {mapping!r}")
    return {str(k): str(int(v) if isinstance(v, bool) else v) for k, v in mapping.items()}
