"""ONNX Runtime targets: ``ort-cpu``, ``ort-mobile`` and ``ort-cuda``, each a model plus ``session.json``."""

from kiln.targets.ort.cuda import OrtCudaTarget
from kiln.targets.ort.mobile import OrtMobileTarget
from kiln.targets.ort.runner import OrtRunner, make_session
from kiln.targets.ort.settings import Provider, SessionSettings
from kiln.targets.ort.target import OrtCpuTarget, session

__all__ = [
    "OrtCpuTarget",
    "OrtCudaTarget",
    "OrtMobileTarget",
    "OrtRunner",
    "Provider",
    "SessionSettings",
    "make_session",
    "session",
]
