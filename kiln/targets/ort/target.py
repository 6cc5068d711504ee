"""``ort-cpu``: the ONNX model with the session settings it was verified with, in ``session.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort

from kiln.targets.base import Target
from kiln.targets.ort.runner import OrtRunner, make_session

SESSION_FILE = "session.json"

#: Settings written for a CPU deployment: full graph optimisation, ONNX Runtime's default thread pool.
CPU_SETTINGS: dict[str, Any] = {
    "providers": ["CPUExecutionProvider"],
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "intra_op_num_threads": 0,
    "session_config": {},
}


def _settings(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / SESSION_FILE).read_text())


def session(out_dir: str | Path) -> ort.InferenceSession:
    """An ONNX Runtime session for a compiled output directory, with its saved settings applied."""
    out_dir = Path(out_dir)
    return make_session(out_dir / "model.onnx", settings=_settings(out_dir))


class OrtCpuTarget(Target):
    name = "ort-cpu"
    summary = "ONNX Runtime on CPU: model.onnx + session.json"

    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        (out_dir / SESSION_FILE).write_text(json.dumps(CPU_SETTINGS, indent=2) + "\n")
        return {"session": CPU_SETTINGS}

    def load(self, out_dir: Path) -> OrtRunner:
        return OrtRunner(session(out_dir))
