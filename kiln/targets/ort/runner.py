"""ONNX Runtime sessions and the runner wrapping them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kiln.targets.base import Feed, Runner


def make_session(
    path: str | Path, *, threads: int | None = None, settings: Mapping[str, Any] | None = None
) -> ort.InferenceSession:
    """A CPU ONNX Runtime session, optionally with saved ``settings`` (see ``session.json``)."""
    settings = dict(settings or {})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    level = settings.get("graph_optimization_level")
    if level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    threads = threads if threads is not None else settings.get("intra_op_num_threads")
    if threads:
        options.intra_op_num_threads = int(threads)
    for key, value in settings.get("session_config", {}).items():
        options.add_session_config_entry(key, str(value))
    providers = settings.get("providers", ["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), options, providers=providers)


class OrtRunner(Runner):
    """A model run by an ONNX Runtime session."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> OrtRunner:
        return cls(make_session(path, **kwargs))

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feed))))
