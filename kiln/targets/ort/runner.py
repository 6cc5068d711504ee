"""ONNX Runtime sessions and the runner wrapping them."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kiln.errors import KilnError
from kiln.targets.base import Feed, Runner, TensorSpec
from kiln.targets.ort.settings import SessionSettings

#: ONNX Runtime's type strings for the numpy dtypes runners accept.
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def make_session(
    path: str | Path,
    *,
    threads: int | None = None,
    settings: SessionSettings | Mapping[str, Any] | None = None,
) -> ort.InferenceSession:
    """A session for ``path`` with saved ``settings`` (default: CPU, all optimizations); ``threads`` overrides."""
    if settings is None:
        settings = SessionSettings()
    elif not isinstance(settings, SessionSettings):
        settings = SessionSettings.from_json(settings)
    settings.check_providers()
    providers, provider_options = settings.provider_arguments()
    if "CUDAExecutionProvider" in providers:
        _load_cuda_libraries()
    session = ort.InferenceSession(
        str(path), settings.session_options(threads=threads), providers=providers, provider_options=provider_options
    )
    # ONNX Runtime falls back to the CPU when a provider fails to start; a GPU artifact must not silently run there.
    if session.get_providers()[0] != providers[0]:
        raise KilnError(
            f"{path}: ONNX Runtime could not start {providers[0]} (the session runs on {session.get_providers()})"
        )
    return session


@functools.cache
def _load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of pip's ``nvidia-*`` packages, where onnxruntime-gpu looks for them only
    when asked (``import torch`` does the same as a side effect; a process without torch would fail to start the
    CUDA provider). Once per process; a no-op in builds without CUDA."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


class OrtRunner(Runner):
    """A model run by an ONNX Runtime session."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> OrtRunner:
        return cls(make_session(path, **kwargs))

    @property
    def input_specs(self) -> list[TensorSpec]:
        specs = []
        for arg in self.session.get_inputs():
            if arg.type not in _NUMPY_TYPES:
                raise KilnError(f"input {arg.name!r} has type {arg.type}, which kiln cannot feed")
            specs.append(TensorSpec(arg.name, np.dtype(_NUMPY_TYPES[arg.type]), tuple(arg.shape)))
        return specs

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feed))))
