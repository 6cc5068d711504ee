"""What every deployment target provides: a build step and a uniform runner.

A :class:`Target` turns a verified-to-be ``model.onnx`` in an output directory into a deployable artifact (ONNX
Runtime session settings, an ``.ort`` file, a TVM library) written beside it, and loads that artifact back as a
:class:`Runner`. Every runner takes and returns the same input and output names as the ONNX model, so verification,
``kiln run`` and the benchmarks treat all targets alike.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

Feed = Mapping[str, np.ndarray]


class Runner(abc.ABC):
    """A loaded model: ``runner(feed)`` returns every output by name."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run one batch."""


class Target(abc.ABC):
    """A deployment target registered under ``name`` (the value of ``--target``)."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def check(self) -> None:
        """Raise :class:`kiln.errors.KilnError` if this target cannot be built on this machine (before any work)."""
        return None

    @abc.abstractmethod
    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        """Write the target's artifact into ``out_dir`` (which holds ``model_file``); return report details."""

    @abc.abstractmethod
    def load(self, out_dir: Path) -> Runner:
        """Load the artifact built in ``out_dir``."""
