"""Verification: does the compiled model still compute what the original did?

Both models run in ONNX Runtime on the same verification feeds, one batch at a time. For every output kiln keeps
the max absolute difference and the cosine between the flattened reference and candidate outputs; when the model
is a zoo model its task metric (perplexity, embedding cosine, top-1 agreement) is computed too. A
:class:`Tolerance` (declared by each recipe) turns that into pass or fail.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.compiler.metrics import Metric, MetricResult
from kiln.errors import VerificationError, describe
from kiln.targets.base import Feed, Runner
from kiln.targets.ort.runner import OrtRunner


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What a compiled model may lose and still be accepted.

    ``min_output_cosine`` applies to every output; ``max_metric_loss`` bounds the task metric's relative loss
    (e.g. 0.01 = perplexity up by at most 1%, or agreement down by at most 1%), overridable per metric name.
    """

    min_output_cosine: float = 0.99
    max_metric_loss: float = 0.01
    metric_loss: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def metric_limit(self, name: str) -> float:
        return self.metric_loss.get(name, self.max_metric_loss)


@dataclasses.dataclass
class OutputStats:
    """Running max |ref - new| and cosine(ref, new) of one output over all batches."""

    max_abs_diff: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    new_sq: float = 0.0

    def update(self, ref: np.ndarray, new: np.ndarray) -> None:
        if ref.shape != new.shape:
            raise VerificationError(f"output shape changed: reference {list(ref.shape)}, compiled {list(new.shape)}")
        ref64 = ref.astype(np.float64).ravel()
        new64 = new.astype(np.float64).ravel()
        if ref64.size:
            self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(ref64 - new64))))
        self.dot += float(ref64 @ new64)
        self.ref_sq += float(ref64 @ ref64)
        self.new_sq += float(new64 @ new64)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_sq) * math.sqrt(self.new_sq)
        if denom == 0:
            return 1.0 if self.ref_sq == self.new_sq else 0.0
        return self.dot / denom


@dataclasses.dataclass
class VerificationReport:
    """The outcome of one verification run."""

    feeds: int
    seconds: float
    outputs: dict[str, dict[str, float]]
    metric: MetricResult | None
    failures: list[str]
    #: Outputs of the original that a pass removed on purpose, so not compared.
    removed_outputs: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "feeds": self.feeds,
            "seconds": self.seconds,
            "outputs": self.outputs,
            "metric": self.metric.to_dict() if self.metric else None,
            "passed": self.passed,
            "failures": self.failures,
            "removed_outputs": self.removed_outputs,
        }


def verify(
    reference: Runner | str | Path,
    candidate: Runner | str | Path,
    feeds: Iterable[Feed],
    *,
    metric: Metric | None = None,
    tolerance: Tolerance | None = None,
    removed_outputs: Collection[str] = (),
) -> VerificationReport:
    """Run both models on ``feeds`` and judge the candidate against ``tolerance``.

    Models are runners of any target, or paths of ONNX files (run with ONNX Runtime on CPU). The candidate may lack
    the outputs in ``removed_outputs`` (removed on purpose by a pass, e.g. a pruned layer's KV cache); every other
    output of the reference must be there and is compared. The candidate gets only the feed entries it has inputs
    for, since removing an output may remove the input that fed it.
    """
    tolerance = tolerance or Tolerance()
    start = time.perf_counter()
    ref_runner = reference if isinstance(reference, Runner) else OrtRunner.from_path(reference)
    try:
        new_runner = candidate if isinstance(candidate, Runner) else OrtRunner.from_path(candidate)
    except Exception as e:
        raise VerificationError(f"ONNX Runtime cannot load the compiled model: {describe(e)}") from None
    lost = set(ref_runner.output_names) - set(new_runner.output_names)
    if lost - set(removed_outputs):
        raise VerificationError(f"compiled model lost outputs: {sorted(lost - set(removed_outputs))}")
    names = [n for n in ref_runner.output_names if n not in lost]
    if not names:
        raise VerificationError("the compiled model shares no output with the original")
    new_inputs = set(new_runner.input_names)
    stats = {name: OutputStats() for name in names}
    count = 0
    for feed in feeds:
        ref_out = ref_runner(feed)
        try:
            new_out = new_runner({k: v for k, v in feed.items() if k in new_inputs})
        except Exception as e:
            raise VerificationError(f"the compiled model fails in ONNX Runtime: {describe(e)}") from None
        for name in names:
            stats[name].update(ref_out[name], new_out[name])
        if metric is not None:
            metric.update(feed, ref_out, new_out)
        count += 1
    if count == 0:
        raise VerificationError("the verification set is empty")
    result = metric.result() if metric is not None else None
    failures = []
    for name, s in stats.items():
        if not s.cosine >= tolerance.min_output_cosine:
            failures.append(f"output {name!r} cosine {s.cosine:.5f} < {tolerance.min_output_cosine}")
    if result is not None:
        limit = tolerance.metric_limit(result.name)
        if not result.relative_loss <= limit:
            failures.append(
                f"{result.name} {result.reference:.4g} -> {result.candidate:.4g} "
                f"({result.relative_loss:+.2%} loss, tolerance {limit:.2%})"
            )
    return VerificationReport(
        feeds=count,
        seconds=time.perf_counter() - start,
        outputs={n: {"max_abs_diff": s.max_abs_diff, "cosine": s.cosine} for n, s in stats.items()},
        metric=result,
        failures=failures,
        removed_outputs=sorted(lost),
    )


#: Random verification inputs larger than this (elements per input) are refused rather than allocated.
MAX_RANDOM_INPUT_ELEMENTS = 2**26

_RANDOM_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
}


def random_feeds(
    model: ir.Model, *, count: int = 4, seed: int = 0, shapes: Mapping[str, list[int]] | None = None
) -> list[Feed]:
    """Random inputs for a model kiln knows nothing about: floats ~ N(0, 1), integers in [0, 10), booleans.

    Symbolic dimensions take size 1 unless ``shapes`` fixes the input's shape.
    """
    rng = np.random.default_rng(seed)
    shapes = dict(shapes or {})
    feeds = []
    specs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    for _ in range(count):
        feed = {}
        for value in specs:
            if value.dtype not in _RANDOM_DTYPES:
                raise VerificationError(
                    f"cannot make random data for input {value.name!r} of type {value.dtype}; give calibration data"
                )
            shape = shapes.get(value.name)
            if shape is None:
                if value.shape is None:
                    raise VerificationError(f"input {value.name!r} has no shape; give --input-shape or data")
                shape = [d if isinstance(d, int) else 1 for d in value.shape]
            elements = math.prod(shape)
            if elements > MAX_RANDOM_INPUT_ELEMENTS:
                raise VerificationError(
                    f"input {value.name!r} of shape {list(shape)} has {elements} elements, too many for random "
                    f"verification data (max {MAX_RANDOM_INPUT_ELEMENTS}); give --input-shape or calibration data"
                )
            dtype = _RANDOM_DTYPES[value.dtype]
            if np.issubdtype(dtype, np.floating):
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype is np.bool_:
                feed[value.name] = rng.random(shape) < 0.5
            else:
                feed[value.name] = rng.integers(0, 10, size=shape).astype(dtype)
        feeds.append(feed)
    return feeds
