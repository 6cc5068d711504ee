"""What every deployment target provides: a build step and a uniform runner.

A :class:`Target` turns a verified-to-be ``model.onnx`` in an output directory into a deployable artifact (ONNX
Runtime session settings, an ``.ort`` file, a TVM library) written beside it, and loads that artifact back as a
:class:`Runner`. Every runner takes and returns the same input and output names as the ONNX model, so verification,
``kiln run`` and the benchmarks treat all targets alike.

A target may take options (``Options``, a dataclass, like a pass's): recipes and the Python API give them as plain
values, and :func:`make_options` validates them by name and type before any model is loaded.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln import options

Feed = Mapping[str, np.ndarray]


def feed_for(names: Iterable[str], feed: Feed) -> Feed:
    """The entries of ``feed`` a model with inputs ``names`` reads: a pruned decode graph has fewer inputs (a dropped
    layer's KV cache) than the feed built for the original."""
    wanted = set(names)
    return {name: value for name, value in feed.items() if name in wanted}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input of a runner: its name, numpy dtype and shape (a ``str`` or ``None`` for a dynamic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


class Runner(abc.ABC):
    """A loaded model: ``runner(feed)`` returns every output by name."""

    input_names: list[str]
    output_names: list[str]

    @property
    @abc.abstractmethod
    def input_specs(self) -> list[TensorSpec]:
        """The inputs a feed must hold, so callers can build one without knowing the target."""

    @abc.abstractmethod
    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run one batch."""


@dataclasses.dataclass
class NoOptions:
    """Options of a target that takes none."""


class Target(abc.ABC):
    """A deployment target registered under ``name`` (the value of ``--target``)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options

    def check(self) -> None:
        """Raise :class:`kiln.errors.KilnError` if this target cannot be built on this machine (before any work)."""
        return None

    @abc.abstractmethod
    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        """Write the target's artifact into ``out_dir`` (which holds ``model_file``); return report details."""

    @abc.abstractmethod
    def load(self, out_dir: Path) -> Runner:
        """Load the artifact built in ``out_dir``."""


def make_options(cls: type[Target], values: Mapping[str, Any] | None) -> Any:
    """``cls.Options`` from plain values; unknown names, wrong types and invalid values are :class:`KilnError`."""
    return options.build(cls.Options, values, owner=f"target {cls.name!r}")
