"""SmolLM2-135M perplexity: shift-add (shiftadd.bcq, run in ONNX Runtime through the op's function form) against
kiln's GPTQ at the same bits and group size.

Protocol as in the benchmark: the zoo's 8 calibration windows (Sense and Sensibility) and 16 verification windows
(Pride and Prejudice, 512 tokens each), ``cleanup.optimize`` first. ONNX Runtime 1.32 runs no 3-bit MatMulNBits
and ONNX has no 3-bit type, so kiln's GPTQ cannot emit 3 bits; its quantized weights (``gptq.gptq`` with the
``quantize.gptq`` defaults: asymmetric, act-order, clip search) are written back as float and the model is run in
fp32: the same numbers MatMulNBits would compute with. Usage::

    PYTHONPATH=. python tools/shiftadd_perplexity.py shiftadd:bits=3 gptq:bits=3 shiftadd:average_bits=2.5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln import zoo
from kiln.compiler import io
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.metrics import token_nll
from kiln.compiler.pipeline import Pipeline
from kiln.passes import PassContext, create
from kiln.passes.quantize import grid
from kiln.passes.quantize.gptq import CLIP_RATIOS, Statistics, gptq, load_weight
from kiln.passes.shiftadd.bcq import _hessian, _make_groups
from kiln.targets.ort.runner import make_session


def perplexity(path: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    session = make_session(path)
    nll, count = 0.0, 0
    for feed in feeds:
        logits = session.run(["logits"], feed)[0]
        total, n = token_nll(logits, feed["input_ids"], 0)
        nll, count = nll + total, count + n
    return float(np.exp(nll / count))


def gptq_fake_quant(model: ir.Model, calibration: CalibrationData, bits: int, group_size: int) -> dict:
    """Replace every quantize.gptq-eligible weight by its GPTQ-dequantized float value."""
    finder = create("shiftadd.bcq").options.finder()  # the same nodes both methods quantize
    sites = [s for s in finder._find_sites(model) if s.node.graph is model.graph]
    groups = _make_groups(sites)
    spec = grid.GridSpec(bits, group_size, False)
    with tempfile.TemporaryDirectory() as tmp:
        stats = Statistics(Path(tmp))
        stats.collect(calibration, model, {n: g.k for g in groups for n in g.inputs}, {}, 1 << 30)
        for group in groups:
            weights = [load_weight(key) for key in group.members]
            joined = np.concatenate(weights, axis=1)
            q = gptq(joined, _hessian(group, stats), spec, act_order=True, clip_ratios=CLIP_RATIOS)
            deq = grid.dequantize(q)
            start = 0
            for (value, transposed), w in zip(group.members, weights):
                part = deq[:, start : start + w.shape[1]].astype(np.float32)
                start += w.shape[1]
                value.const_value = ir.tensor(np.ascontiguousarray(part.T if transposed else part), name=value.name)
    return {"layers": len(sites)}


def run(config: str, model_path: Path, calib: list, feeds: list, out: Path) -> dict:
    method, _, rest = config.partition(":")
    options = {k: json.loads(v) for k, v in (item.split("=") for item in rest.split(",") if item)}
    model = io.load(model_path)
    context = PassContext(calibration=CalibrationData(calib))
    start = time.perf_counter()
    Pipeline([create("cleanup.optimize")])(model)
    if method == "shiftadd":
        pass_ = create("shiftadd.bcq", options, context)
        Pipeline([pass_])(model)
        details = {k: v for k, v in pass_.details.items() if k not in ("layers", "skipped")}
    elif method == "gptq":
        details = gptq_fake_quant(model, context.calibration, options["bits"], options.get("group_size", 128))
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    path = io.save(model, out / "model.onnx")
    size = path.stat().st_size + sum(p.stat().st_size for p in out.glob("*.data"))
    return {"config": config, "perplexity": perplexity(path, feeds), "seconds": round(seconds, 1), "bytes": size} | {
        "details": details
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="method:key=value,... with method shiftadd or gptq")
    parser.add_argument("--eval", type=int, default=16, help="verification windows")
    parser.add_argument("--calib", type=int, default=8, help="calibration windows")
    parser.add_argument("--fp32", action="store_true", help="also measure the float model")
    args = parser.parse_args()
    smollm2 = zoo.get("smollm2-135m")
    model_path = zoo.export("smollm2-135m")
    feeds = smollm2.verification_feeds(limit=args.eval)
    calib = smollm2.calibration_feeds(limit=args.calib)
    if args.fp32:
        print(json.dumps({"config": "fp32", "perplexity": perplexity(model_path, feeds)}), flush=True)
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run(config, model_path, calib, feeds, Path(tmp))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
