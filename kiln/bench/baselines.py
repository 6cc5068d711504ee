"""The peers kiln is measured against: the same fp32 model quantized by ONNX Runtime's own tools.

* ``ort-fp32``: the original model, run by ONNX Runtime (the reference every ratio is taken against).
* ``ort-dynamic``: ``quantize_dynamic`` with its defaults (int8 weights per tensor, activations quantized at run
  time).
* ``ort-static``: ``quantize_static`` in QDQ format, int8 weights per channel and uint8 activations per tensor
  (U8S8, as kiln's ``int8-static``), MinMax ranges from the *same calibration feeds* kiln's calibrating recipes
  get (a ``CalibrationDataReader`` over them). It quantizes the operators with weights (MatMul, Gemm, Conv): with
  ORT's default of every operator it supports, MiniLM's embedding cosine to fp32 fell to 0.29 (0.92 this way).
  With ORT's default int8 activations (S8S8) it wrote a SmolLM2 model that ONNX Runtime 1.32 refuses to load
  (a QuantizeLinear whose ``output_dtype`` INT8 contradicts its uint8 zero point). Its MinMax calibrator keeps
  only per-batch minima and maxima, so memory stays small. (Its ``CalibMaxIntermediateOutputs`` option must not
  be used: in ONNX Runtime 1.32 it discards the collected batches instead of reducing them.)
* ``ort-nbits``: ``MatMulNBitsQuantizer`` with its default RTN algorithm, once per weight-only setting (bits, group,
  symmetric, accuracy level) that the benchmarked kiln recipes use, so each kiln RTN row has its ORT twin.
* ``ort-gptq``: the same quantizer with ``GPTQWeightOnlyQuantConfig`` on the calibration feeds; ONNX Runtime
  writes MatMulNBits only for 4 bits, so it is built for 4-bit settings only. It runs the model once per distinct
  MatMul input per calibration feed, so it gets only the first :data:`GPTQ_MAX_FEEDS` feeds and is not in the
  default set.

ONNX Runtime's weight-only quantizers handle ``MatMul`` only (kiln's also handles ``Gemm``); a baseline whose
quantizer left every operator as it was is reported as skipped. Baselines are cached like compiled variants,
keyed by the model, the setting, the calibration data, the ONNX Runtime version and this module's source (which
holds the quantizers' settings); ``build.json`` beside each records how long it took to make.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from kiln.bench import cache
from kiln.bench.memory import PeakMemory
from kiln.errors import KilnError

KINDS = ("ort-fp32", "ort-dynamic", "ort-static", "ort-nbits", "ort-gptq")
DEFAULT_KINDS = ("ort-fp32", "ort-dynamic", "ort-static", "ort-nbits")
MODEL_FILE = "model.onnx"
BUILD_FILE = "build.json"
#: ONNX Runtime's GPTQ runs the model once per distinct MatMul input per calibration feed (121 x ~1.5 s per 512-token
#: window on SmolLM2 here), so it gets at most this many of the calibration feeds.
GPTQ_MAX_FEEDS = 2
#: ONNX Runtime's 2-bit MatMulNBits is fast only with its LUT kernel (see kiln.bench.kernels).
LUT_SESSION_CONFIG = {"mlas.use_lut_gemm": "1"}


@dataclasses.dataclass(frozen=True)
class WeightOnly:
    """A weight-only quantization setting shared by a kiln recipe and its ORT twin."""

    bits: int
    group_size: int
    symmetric: bool = False
    accuracy_level: int = 0

    @property
    def tag(self) -> str:
        text = f"w{self.bits} g{self.group_size}" + (" sym" if self.symmetric else "")
        return text + (f" acc{self.accuracy_level}" if self.accuracy_level else "")

    def unsupported(self) -> str | None:
        """Why ONNX Runtime's MatMulNBitsQuantizer cannot produce this setting, or None."""
        if self.bits not in (2, 4, 8):
            return f"MatMulNBitsQuantizer makes 2, 4 or 8 bits, not {self.bits}"
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            return f"MatMulNBitsQuantizer needs a power-of-two block size >= 16, not {self.group_size}"
        return None


def weight_only_settings(options: Any) -> WeightOnly | None:
    """The weight-only setting of a pass's options (RTN and the passes built on it), or None.

    A "dq" weight (DequantizeLinear + MatMul) runs as the MatMulNBits node ONNX Runtime fuses from it, with
    accuracy level 4 by default, so its twin gets accuracy level 4.
    """
    bits, group = getattr(options, "bits", None), getattr(options, "group_size", None)
    if not isinstance(bits, int) or not isinstance(group, int):
        return None
    level = 4 if getattr(options, "format", None) == "dq" else int(getattr(options, "accuracy_level", 0) or 0)
    return WeightOnly(bits, group, bool(getattr(options, "symmetric", False)), level)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One ORT-made model to benchmark."""

    kind: str
    weight_only: WeightOnly | None = None

    @property
    def name(self) -> str:
        return f"{self.kind} {self.weight_only.tag}" if self.weight_only else self.kind

    @property
    def needs_calibration(self) -> bool:
        return self.kind in ("ort-static", "ort-gptq")

    @property
    def session_config(self) -> dict[str, str]:
        return dict(LUT_SESSION_CONFIG) if self.weight_only and self.weight_only.bits == 2 else {}

    @property
    def description(self) -> str:
        return {
            "ort-fp32": "original fp32 model",
            "ort-dynamic": "quantize_dynamic: int8 weights, dynamic int8 activations",
            "ort-static": "quantize_static QDQ of MatMul/Gemm/Conv: int8 per-channel weights, uint8 activations",
            "ort-nbits": "MatMulNBitsQuantizer RTN",
            "ort-gptq": f"MatMulNBitsQuantizer GPTQ (first {GPTQ_MAX_FEEDS} calibration feeds)",
        }[self.kind]


def expand(kinds: Sequence[str], settings: Sequence[WeightOnly]) -> tuple[list[Baseline], list[tuple[str, str]]]:
    """Baselines for ``kinds``, with ``ort-nbits``/``ort-gptq`` once per weight-only setting; and what was skipped.

    Without any setting from the recipes, ``ort-nbits`` and ``ort-gptq`` use 4 bits in groups of 128.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise KilnError(f"unknown baseline {unknown[0]!r}; baselines: {', '.join(KINDS)}")
    settings = list(dict.fromkeys(settings)) or [WeightOnly(4, 128)]
    baselines: list[Baseline] = []
    skipped: list[tuple[str, str]] = []
    for kind in dict.fromkeys(("ort-fp32", *kinds)):
        if kind not in ("ort-nbits", "ort-gptq"):
            baselines.append(Baseline(kind))
            continue
        for setting in settings:
            baseline = Baseline(kind, setting)
            why = setting.unsupported()
            if why is None and kind == "ort-gptq" and setting.bits != 4:
                why = "ONNX Runtime's GPTQ writes MatMulNBits only for 4 bits"
            if why:
                skipped.append((baseline.name, why))
            else:
                baselines.append(baseline)
    return baselines, skipped


class FeedReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds (copyable, as GPTQ needs)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.feeds = [dict(f) for f in feeds]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0

    def __iter__(self) -> FeedReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self.feeds)


def nbits_module() -> ModuleType:
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without letting it reconfigure logging.

    Importing it calls ``logging.basicConfig(level=INFO)``, which would flood a script's output with INFO lines.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.setLevel(level)
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    return matmul_nbits_quantizer


def cache_dir(baseline: Baseline, model_path: Path, calibration: Sequence[Mapping[str, np.ndarray]], slug: str) -> Path:
    """The cache directory of a baseline built from ``model_path`` (``slug`` names the model for humans)."""
    key = cache.digest(
        cache.model_fingerprint(model_path),
        dataclasses.asdict(baseline),
        ort.__version__,
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),  # how this module calls the quantizers
        cache.feeds_digest(calibration) if baseline.needs_calibration else None,
    )
    return cache.bench_root() / "baselines" / f"{slug}-{baseline.name.replace(' ', '-')}-{key}"


def build(
    baseline: Baseline,
    model_path: Path,
    calibration: Sequence[Mapping[str, np.ndarray]],
    slug: str = "model",
    before_building: Callable[[], None] | None = None,
) -> Path:
    """The ``model.onnx`` of ``baseline`` (built on first use, then cached).

    ``before_building`` runs only when the baseline is not cached, before the build; it may raise to refuse it.
    Raises :class:`KilnError` when the quantizer changed no operator of the model (nothing it handles).
    """
    if baseline.kind == "ort-fp32":
        return model_path
    if baseline.needs_calibration and not calibration:
        raise KilnError(f"{baseline.name} needs calibration feeds")
    if baseline.kind == "ort-gptq":
        calibration = calibration[:GPTQ_MAX_FEEDS]

    def make(directory: Path) -> None:
        start = time.perf_counter()
        # GPTQ prints a progress bar per layer; quantize_static logs advice on the root logger every time.
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()), PeakMemory() as peak:
                _quantize(baseline, model_path, directory / MODEL_FILE, calibration)
        finally:
            logging.disable(logging.NOTSET)
        record = {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak.bytes}
        (directory / BUILD_FILE).write_text(json.dumps(record) + "\n")

    final = cache_dir(baseline, model_path, calibration, slug)
    if before_building is not None and not final.is_dir():
        before_building()
    out = cache.build_once(final, make) / MODEL_FILE
    if _op_types(out) == _op_types(model_path):
        raise KilnError("the quantizer changed no operator (nothing in this model that it handles)")
    return out


def build_record(model_file: Path) -> dict[str, Any]:
    """What was recorded when the variant at ``model_file`` was built: ``seconds`` (baselines) and
    ``peak_rss_bytes``; empty for the original model and for entries cached before the record existed."""
    record = model_file.parent / BUILD_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def _op_types(model_file: Path) -> collections.Counter[str]:
    proto = onnx.load(str(model_file), load_external_data=False)
    return collections.Counter(f"{node.domain}:{node.op_type}" for node in proto.graph.node)


def _quantize(baseline: Baseline, model_path: Path, out: Path, calibration: Sequence[Mapping[str, np.ndarray]]) -> None:
    from onnxruntime import quantization as q

    if baseline.kind == "ort-dynamic":
        q.quantize_dynamic(model_path, out, weight_type=q.QuantType.QInt8, use_external_data_format=True)
        return
    if baseline.kind == "ort-static":
        q.quantize_static(
            model_path,
            out,
            FeedReader(calibration),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
            use_external_data_format=True,
        )
        return
    setting = baseline.weight_only
    assert setting is not None
    nbits = nbits_module()
    algo = None
    if baseline.kind == "ort-gptq":
        algo = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=FeedReader(calibration))
    # ORT's GPTQ runs the model from a temporary copy whose external data paths ORT 1.32 then refuses ("External
    # data path validation failed"): it gets the model with its weights in memory instead.
    model = onnx.load(str(model_path)) if baseline.kind == "ort-gptq" else str(model_path)
    quantizer = nbits.MatMulNBitsQuantizer(
        model,
        bits=setting.bits,
        block_size=setting.group_size,
        is_symmetric=setting.symmetric,
        accuracy_level=setting.accuracy_level,
        algo_config=algo,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
