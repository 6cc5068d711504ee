"""``Pipeline``: run passes in order, checking the model between them and timing each.

A pass that leaves an invalid graph is caught right after it runs, with its name in the error, rather than
surfacing later as an opaque ONNX Runtime failure. Checks use onnx_ir's checker and shape-inference passes, which
strip large weights before calling the ONNX C API, so they stay cheap on large models.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from kiln.errors import KilnError, describe
from kiln.passes._base import KilnPass

logger = logging.getLogger("kiln")


class PipelineError(KilnError):
    """A pass failed or produced a model that does not check."""


@dataclasses.dataclass
class PassRecord:
    """What one pass did: for ``report.json``."""

    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pass_name(pass_: ir.passes.PassBase) -> str:
    """The registry name of a kiln pass, else the class name (plain onnx_ir passes work in a pipeline too)."""
    return getattr(pass_, "registry_name", type(pass_).__name__)


def _options_dict(pass_: ir.passes.PassBase) -> dict[str, Any]:
    options = getattr(pass_, "options", None)
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


class Pipeline:
    """An ordered list of passes run in place on a model, with a check after each pass that changed it.

    ``on_pass`` is called with each :class:`PassRecord` as soon as its pass finishes (for progress display).
    """

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        *,
        check: bool = True,
        infer_shapes: bool = True,
        on_pass: Callable[[PassRecord], None] | None = None,
    ) -> None:
        for pass_ in passes:
            if not isinstance(pass_, ir.passes.PassBase):
                raise TypeError(f"Pipeline takes onnx_ir passes, got {type(pass_).__name__}")
            if not pass_.in_place:
                raise TypeError(f"{type(pass_).__name__} is not in place; kiln pipelines run passes in place")
        self.passes = list(passes)
        self.check = check
        self.infer_shapes = infer_shapes
        self.on_pass = on_pass

    def __call__(self, model: ir.Model) -> list[PassRecord]:
        """Run every pass on ``model`` (in place) and return what each did."""
        records = []
        for pass_ in self.passes:
            name = pass_name(pass_)
            logger.info("pass %s", name)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except KilnError:
                raise
            except ir.passes.PreconditionError as e:
                raise PipelineError(f"pass {name!r} cannot run on this model: {describe(e)}") from e
            except Exception as e:
                raise PipelineError(f"pass {name!r} failed: {describe(e)}") from e
            if result.modified:
                self._check(name, model)
            record = PassRecord(
                name=name,
                options=_options_dict(pass_),
                seconds=time.perf_counter() - start,
                modified=result.modified,
                details=dict(pass_.details) if isinstance(pass_, KilnPass) else {},
            )
            logger.info("pass %s: %.2fs, modified=%s", name, record.seconds, record.modified)
            records.append(record)
            if self.on_pass is not None:
                self.on_pass(record)
        return records

    def _check(self, name: str, model: ir.Model) -> None:
        if self.infer_shapes:
            infer_types(model)
        if self.check:
            try:
                check_structure(model)
            except Exception as e:
                raise PipelineError(f"pass {name!r} produced an invalid model: {describe(e)}") from e


def infer_types(model: ir.Model) -> None:
    """ONNX shape inference, merged into ``model`` by whole type: sequences and optionals stay what they are.

    onnx_ir's ShapeInferencePass merges the element dtype only, which types a sequence-valued value that had no
    type yet (a Loop body's If output) as a tensor, and ONNX Runtime then refuses the model. Here a value takes the
    inferred type when it has none or only the inferred type's element dtype differs, and the inferred shape when it
    is known. A model inference fails on is left unchanged, as onnx_ir's pass does.
    """

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False, data_prop=True)

    try:
        inferred = ir.serde.deserialize_model(_c_api_utils.call_onnx_api(infer, model))
    except Exception as e:  # ONNX's inference raises arbitrary errors on graphs it does not understand
        logger.debug("shape inference failed, model left as it is: %s", describe(e))
        return
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=True):
        inferred_values = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = inferred_values.get(name)
            if new is None:
                continue
            if new.type is not None and value.type != new.type:
                value.type = new.type
            if new.shape is not None and value.shape != new.shape:
                value.shape = new.shape


def check_structure(model: ir.Model) -> None:
    """The ONNX checker on the graph, without reading weights.

    onnx_ir's helper moves large initializers out of the serialized proto; external-data tensors small enough to
    stay in it are dropped here too, since their relative paths cannot be resolved from a proto in memory (they
    are checked when the model is saved and loaded back).
    """

    def check(proto: onnx.ModelProto) -> None:
        kept = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        onnx.checker.check_model(proto)

    # Pinned onnx-ir 1.1.0: the same helper its CheckerPass and ShapeInferencePass use.
    _c_api_utils.call_onnx_api(check, model)
