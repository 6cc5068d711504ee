"""SmolLM2-135M decode tokens/s with shift-add weights in ONNX Runtime, beside fp32 and 4-bit MatMulNBits.

One decode step (batch 1, a 16-token past) of the zoo's ``smollm2-135m/decode`` graph, timed round-robin in one
process (:func:`kiln.bench.interleaved.time_interleaved`), every session with the same intra-op threads and no
spinning. Variants:

* ``ort-fp32``: the exported graph;
* ``ort-nbits w4 g128``: ONNX Runtime's own ``MatMulNBitsQuantizer`` (the bench's ``ort-nbits`` baseline);
* ``kiln rtn-w4``: kiln's 4-bit MatMulNBits (the ``rtn-w4`` recipe's pass);
* ``shiftadd w{b} function``: ``shiftadd.bcq`` output as written, ONNX Runtime inlining the op's function form;
* ``shiftadd w{b} kernel {float,int8}``: the same model on kiln's table-lookup kernel (onnxruntime-extensions PyOp,
  :mod:`kiln.runtime_ops.shiftadd_ort`), with exact float tables or the AVX2 int8-activation kernel.

Speed does not depend on how well the planes were fitted, so the shift-add weights here are fitted without GPTQ
compensation (``compensate=False``, seconds instead of minutes); the top-1 agreement column is a sanity check of
that fit, not an accuracy claim (the benchmark's perplexity table is). Usage::

    PYTHONPATH=. python tools/shiftadd_decode.py [--bits 3,2] [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln import zoo
from kiln.bench import baselines
from kiln.bench.interleaved import time_interleaved
from kiln.compiler import io
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.pipeline import Pipeline
from kiln.compiler.timing import TIMING_SESSION_CONFIG
from kiln.passes import PassContext, create
from kiln.runtime_ops import shiftadd_ort


def _options(threads: int, base: ort.SessionOptions | None = None) -> ort.SessionOptions:
    options = base or ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in TIMING_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


Variant = tuple[Path, ort.SessionOptions, str | None]  # model, session options, kernel activation mode


def _runner(variant: Variant, threads: int) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """One session; a kernel variant sets the kernel's process-wide mode before each of its calls."""
    path, options, activations = variant
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        if activations is not None:
            shiftadd_ort.configure(threads, activations)
        return session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]

    return run


def _compile(source: Path, out: Path, passes: Callable[[PassContext], list], calibration: CalibrationData) -> Path:
    model = io.load(source)
    Pipeline(passes(PassContext(calibration)))(model)
    return io.save(model, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,2", help="comma-separated shift-add plane counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    source = zoo.export("smollm2-135m", "decode")
    spec = zoo.get("smollm2-135m")
    feeds = spec.verification_feeds("decode")
    step = {k: v[:1] for k, v in feeds[0].items()}  # batch 1
    calibration = CalibrationData(lambda: iter(spec.calibration_feeds("decode")))
    work = Path(tempfile.mkdtemp(prefix="shiftadd-decode-"))

    threads = args.threads
    variants: dict[str, Variant] = {"ort-fp32": (source, _options(threads), None)}
    wanted, _ = baselines.expand(["ort-nbits"], [baselines.WeightOnly(4, 128)])
    nbits = next(b for b in wanted if b.kind == "ort-nbits")
    variants[nbits.name] = (baselines.build(nbits, source, [], "smollm2-135m-decode"), _options(threads), None)
    rtn = {"bits": 4, "group_size": 128, "format": "matmulnbits"}
    rtn_path = _compile(source, work / "rtn-w4.onnx", lambda c: [create("quantize.rtn", rtn, c)], calibration)
    variants["kiln rtn-w4"] = (rtn_path, _options(threads), None)
    for bits in (int(b) for b in args.bits.split(",")):
        opts = {"bits": bits, "group_size": 128, "compensate": False}

        def passes(context: PassContext, opts: dict = opts) -> list:
            return [create("cleanup.optimize", None, context), create("shiftadd.bcq", opts, context)]

        function = _compile(source, work / f"sa{bits}.onnx", passes, calibration)
        on_kernel = io.load(function)  # the same fit, its nodes moved to the kernel
        shiftadd_ort.use_kernel(on_kernel)
        kernel = io.save(on_kernel, work / f"sa{bits}-kernel.onnx")
        variants[f"shiftadd w{bits} function"] = (function, _options(threads), None)
        for activations in ("float", "int8"):
            options = _options(threads, shiftadd_ort.session_options(threads, activations))
            variants[f"shiftadd w{bits} kernel {activations}"] = (kernel, options, activations)

    runners = {name: _runner(variant, threads) for name, variant in variants.items()}
    reference = [runners["ort-fp32"](f).argmax(-1) for f in feeds]
    latency = time_interleaved({n: (lambda r=r: r(step)) for n, r in runners.items()}, repeats=args.repeats)
    fp32_ms = latency["ort-fp32"].median_ms
    for name, run in runners.items():
        agreement = np.mean([np.mean(run(f).argmax(-1) == ref) for f, ref in zip(feeds, reference, strict=True)])
        size = io.model_bytes(variants[name][0])
        row = {"variant": name, "bytes": size, "median_ms": round(latency[name].median_ms, 2)}
        row |= {"p90_ms": round(latency[name].p90_ms, 2), "tokens_per_s": round(1e3 / latency[name].median_ms, 1)}
        row |= {"speedup_vs_fp32": round(fp32_ms / latency[name].median_ms, 2), "top1_agreement": float(agreement)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
