"""``tvm-llvm`` and ``tvm-aarch64`` (and ``tvm-cuda``, :mod:`kiln.targets.tvm.cuda`): the model compiled by Apache TVM
(Relax) into one shared library.

Build: :func:`kiln.targets.tvm.lower.prepare` (static shapes, quantized weights lowered, folding, op check, all
before any long work) -> Relax import -> kiln's GEMV kernels (:mod:`kiln.targets.tvm.gemv`) -> on CPUs, int16
operands for QDQ's integer matmuls (:mod:`kiln.targets.tvm.qdq`) and channels-last convolutions -> MetaSchedule
tuning when ``trials > 0`` (:mod:`kiln.targets.tvm.tune`, database reused across compiles) -> tuned schedules
plus dlight defaults -> ``tvm.compile``.

Output directory (beside ``model.onnx``):

* ``model.so``: the Relax VM executable with its kernels and the weights (Relax constants);
* ``tvm.json``: inputs (name, dtype, compiled shape), output names, the TVM target description, the device kind
  (``cpu`` or ``cuda``), whether larger batches may run in chunks, what was lowered and what tuning did.

Options (every TVM target):

* ``dims``: values of symbolic dimensions by name (``{batch = 1, seq = 128}``); ``input_shapes``: whole shapes by
  input name (wins over ``dims``). Every symbolic dimension needs a value: TVM compiles static shapes.
* ``mcpu``: the LLVM CPU (``tvm-llvm`` default: the host's, e.g. ``znver3`` with AVX2, ``skylake-avx512``,
  ``sapphirerapids`` with VNNI; ``tvm-aarch64`` default: ``generic`` with NEON); ``num_cores``: threads MetaSchedule
  schedules for (0: this machine's).
* ``trials``: MetaSchedule trials in all (0: untuned, dlight defaults); ``time_budget_s``: wall-clock budget for
  tuning (0: none); ``database``: the database directory (default: under the kiln cache, per target, model and
  budget); ``rpc_tracker`` (``HOST:PORT``) and ``rpc_key``: measure candidates on RPC servers.
* ``max_weight_mb``: refuse models whose weights, once lowered (MatMulNBits weights counted packed, blocked
  DequantizeLinear weights as float32), exceed this (default 256), before import: import and compilation hold the
  weights several times over (SmolLM2 in fp32, 538 MB: 4.9 GB peak, about a minute to build and verify at 512 tokens;
  its 512-token prefill then takes 1.02-1.09x ONNX Runtime's time). Raise it for such models.
* ``integer_qdq`` (CPU targets, default true): QDQ matmuls and 1x1 convolutions with constant weights run in
  integers (:mod:`kiln.targets.tvm.qdq`); false keeps the importer's dequantize-then-float32 form.
* ``shiftadd_kernel`` (``tvm-llvm``): ``"lut"`` (default, where the CPU has AVX2) runs ``ai.kiln.ShiftAddMatMul``
  in decode on kiln's C table-lookup kernel (:mod:`kiln.targets.tvm.shiftadd_lut`: int8 activations, built and
  registered where the library is loaded, so running it needs kiln there; ``tvm.json`` lists it under
  ``runtime_functions``); ``"sign"`` keeps TVM's own sign kernel (float sums, a self-contained library).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from kiln.errors import KilnError, describe
from kiln.targets.base import Target
from kiln.targets.tvm import gemv, layout, lower, qdq, relax_build, shiftadd_lut, tune
from kiln.targets.tvm.runner import LIBRARY, METADATA, TvmRunner

logger = logging.getLogger("kiln")

#: The library of a cross-compiled target built for this machine too, so verification can run the same schedules.
HOST_LIBRARY = "model.host.so"


@dataclasses.dataclass
class TvmOptions:
    """Options of the TVM targets (see the module docstring)."""

    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    mcpu: str = ""
    num_cores: int = 0
    trials: int = 0
    time_budget_s: float = 0.0
    database: str = ""
    rpc_tracker: str = ""
    rpc_key: str = ""
    max_weight_mb: float = 256.0
    integer_qdq: bool = True
    shiftadd_kernel: str = "lut"

    def __post_init__(self) -> None:
        if not isinstance(self.dims, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in self.dims.items()
        ):
            raise ValueError(f"dims must map dimension names to positive integers, got {self.dims!r}")
        if not isinstance(self.input_shapes, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(d, int) and d > 0 for d in v)
            for k, v in self.input_shapes.items()
        ):
            raise ValueError(f"input_shapes must map input names to lists of positive ints, got {self.input_shapes!r}")
        if self.trials < 0 or self.time_budget_s < 0 or self.num_cores < 0 or self.max_weight_mb <= 0:
            raise ValueError("trials, time_budget_s and num_cores must be >= 0, max_weight_mb > 0")
        if not isinstance(self.integer_qdq, bool):
            raise ValueError(f"integer_qdq must be true or false, got {self.integer_qdq!r}")
        if self.shiftadd_kernel not in ("lut", "sign"):
            raise ValueError(f"shiftadd_kernel must be 'lut' or 'sign', got {self.shiftadd_kernel!r}")
        if self.rpc_tracker:
            tune.RpcSpec.parse(self.rpc_tracker, self.rpc_key)


@contextlib.contextmanager
def _tvm_errors(model_file: Path, stage: str) -> Iterator[None]:
    """TVM's own failures (importer assertions, schedule errors, failed checks) as one KilnError line."""
    try:
        yield
    except KilnError:
        raise
    except Exception as e:
        text = describe(e)
        kind = type(e).__name__
        text = text if text.startswith(kind) else f"{kind}: {text}"
        raise KilnError(f"{model_file}: TVM failed to {stage} the model: {text}") from None


class TvmTarget(Target):
    """What both TVM targets share; subclasses name the LLVM triple and default CPU."""

    Options = TvmOptions
    mtriple: ClassVar[str]
    mattr: ClassVar[tuple[str, ...]] = ()
    #: Whether the library runs on the machine that loads it, so it may call kernels built there (shift-add LUT).
    host_kernels: ClassVar[bool] = False

    def check(self) -> None:
        try:
            import tvm  # noqa: F401
        except ImportError as e:
            raise KilnError(f"{self.name} needs apache-tvm (pip install apache-tvm): {e}") from None
        if self.options.trials and self.options.rpc_tracker:
            tune.RpcSpec.parse(self.options.rpc_tracker, self.options.rpc_key).check_reachable()

    def cpu(self) -> str:
        return self.options.mcpu

    def cores(self) -> int:
        return self.options.num_cores or (os.cpu_count() or 1)

    def tvm_target(self) -> Any:
        return relax_build.llvm_target(self.mtriple, self.cpu(), self.mattr, self.cores())

    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        opts = self.options
        start = time.perf_counter()
        target = self.tvm_target()
        cpu = target.kind.name == "llvm"
        prepared = lower.prepare(
            model_file, opts.input_shapes, opts.dims, opts.max_weight_mb, integer_qdq=cpu and opts.integer_qdq
        )
        with _tvm_errors(model_file, "import"):
            mod = relax_build.import_onnx(prepared.proto, prepared.shapes, qdq.importer_converters())
            shifts = any(weight.kind == "shiftadd" for weight in prepared.packed.values())
            lut = cpu and self.host_kernels and opts.shiftadd_kernel == "lut" and shifts and shiftadd_lut.available()
            mod, kernels = gemv.use_kernels(mod, prepared.packed, len(prepared.shapes), cpu, lut)
            if cpu:
                if any(prepared.lowered.get(k) for k in ("QDQ MatMul", "QDQ Conv", "DynamicQuantizeMatMul")):
                    mod = qdq.narrow(mod)
                mod = layout.channels_last(mod)
            mod = relax_build.legalize(mod, target)
        details: dict[str, Any] = {
            "options": dataclasses.asdict(opts),
            "tvm_target": str(target),
            "input_shapes": prepared.shapes,
            "lowered": prepared.lowered,
            "gemv_kernels": kernels,
        }
        database = None
        if opts.trials:
            rpc = tune.RpcSpec.parse(opts.rpc_tracker, opts.rpc_key) if opts.rpc_tracker else None
            model_key = hashlib.sha256(prepared.proto.SerializeToString(deterministic=True)).hexdigest()
            work_dir = (
                Path(opts.database)
                if opts.database
                else tune.database_dir(_cache_root(), target, model_key, opts.trials, opts.time_budget_s)
            )
            database = tune.open_database(work_dir)
            details["tuning"] = tune.tune(
                mod, target, database, work_dir, trials=opts.trials, time_budget_s=opts.time_budget_s, rpc=rpc
            )
        with _tvm_errors(model_file, "compile"):
            scheduled = relax_build.schedule(mod, target, database)
            done, total = relax_build.count_scheduled(scheduled)
            details["scheduled_functions"] = {"scheduled": done, "total": total}
            library = relax_build.compile_module(scheduled, target)
            if target.kind.name == "cuda":
                details["cuda_kernels"] = relax_build.cuda_kernels(library)
            library.export_library(str(out_dir / LIBRARY), **self.export_options())
        self.build_host_twin(scheduled, out_dir)
        metadata = {
            "inputs": [{"name": n, "dtype": prepared.dtypes[n], "shape": s} for n, s in prepared.shapes.items()],
            "outputs": prepared.outputs,
            "target": str(target),
            "device": "cuda" if target.kind.name == "cuda" else "cpu",
            "batch_split": prepared.batch_split,
            "library": LIBRARY,
            "runtime_functions": [shiftadd_lut.FUNCTION] if kernels["shiftadd_lut"] else [],
        }
        (out_dir / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        details["build_seconds"] = time.perf_counter() - start
        return details

    def export_options(self) -> dict[str, Any]:
        return {}

    def build_host_twin(self, scheduled: Any, out_dir: Path) -> None:
        """Nothing for a target that runs here."""

    def load(self, out_dir: Path) -> TvmRunner:
        return TvmRunner.from_dir(out_dir)


class TvmLlvmTarget(TvmTarget):
    name = "tvm-llvm"
    summary = "Apache TVM (Relax) for this x86-64 CPU: model.so + tvm.json, untuned or MetaSchedule-tuned"
    mtriple = "x86_64-linux-gnu"
    host_kernels = True

    def cpu(self) -> str:
        return self.options.mcpu or relax_build.host_cpu()


def _cache_root() -> Path:
    from kiln.zoo._cache import cache_root

    return cache_root()
