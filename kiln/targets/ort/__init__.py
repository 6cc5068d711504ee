"""ONNX Runtime targets: the model plus the session settings it should run with, saved as ``session.json``."""

from kiln.targets.ort.runner import OrtRunner, make_session
from kiln.targets.ort.target import OrtCpuTarget, session

__all__ = ["OrtCpuTarget", "OrtRunner", "make_session", "session"]
