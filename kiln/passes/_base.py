"""The base class every kiln pass derives from.

A kiln pass is an ordinary in-place ``onnx_ir`` pass: ``pass_(model)`` returns an ``ir.passes.PassResult``, and
``requires``/``ensures`` hold its pre- and postconditions. kiln adds three things on top:

* ``Options``: a dataclass holding the pass's options, so recipes and the CLI can validate them by name and type;
* ``context``: what a pass may need besides the model (calibration data, a seed);
* ``details``: a JSON-able dict the pass fills while it runs (per-layer errors, what it skipped and why), which the
  pipeline copies into ``report.json``. A pass that removes graph outputs on purpose (a pruned layer's KV cache)
  lists their names under ``"removed_outputs"``: verification accepts exactly those missing and compares the rest.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

if TYPE_CHECKING:
    from kiln.compiler.calibration import CalibrationData


@dataclasses.dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides the model itself."""

    calibration: CalibrationData | None = None
    seed: int = 0


class KilnPass(ir.passes.InPlacePass):
    """An in-place onnx_ir pass with typed options, a context and a details record."""

    Options: ClassVar[type] = NoOptions
    #: The pass cannot run without ``context.calibration``.
    needs_calibration: ClassVar[bool] = False

    def __init__(self, options: Any = None, context: PassContext | None = None) -> None:
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.context = context if context is not None else PassContext()
        self.details: dict[str, Any] = {}

    def requires(self, model: ir.Model) -> None:
        if self.needs_calibration and self.context.calibration is None:
            raise ir.passes.PreconditionError(f"{type(self).__name__} needs calibration data (context.calibration)")

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        self.details = {}
        return super().__call__(model_or_result)
