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
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln.errors import KilnError

Feed = Mapping[str, np.ndarray]


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
    values = dict(values or {})
    hints = typing.get_type_hints(cls.Options)
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KilnError(
            f"target {cls.name!r} has no option {unknown[0]!r}; its options are: {', '.join(sorted(known)) or '(none)'}"
        )
    checked = {key: _check(f"target {cls.name!r}: option {key!r}", hints[key], value) for key, value in values.items()}
    try:
        return cls.Options(**checked)
    except (TypeError, ValueError) as e:
        raise KilnError(f"target {cls.name!r}: {e}") from None


def _check(where: str, tp: Any, value: Any) -> Any:
    """``value`` if it matches annotation ``tp`` (ints pass for floats; bools never pass for numbers)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise KilnError(f"{where} must be one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return _check(where, inner, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise KilnError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(where, item, v) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(value, bool) and tp is not bool) or not isinstance(value, tp):
        raise KilnError(f"{where} must be {tp.__name__}, got {value!r}")
    return value
