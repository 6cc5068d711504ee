"""TVM vs ONNX Runtime fp32 latency on zoo models: kiln's default schedules (untuned) and, optionally, tuned.

Usage: ``python tools/tvm_bench.py [--models efficientnet-lite0,minilm-l6] [--trials 200,1000] [--time-budget 600]
[--rounds 8] [--block 5] [--int8]``.

With ``--int8``, kiln's int8-static output (QDQ) joins the same run three ways: ONNX Runtime (its int8 kernels), TVM
with integer matmuls and 1x1 convolutions (:mod:`kiln.targets.tvm.qdq`) and TVM with ``integer_qdq=false``
(dequantize, then float32); and kiln's int8-dynamic output (DynamicQuantizeMatMul) two ways: ONNX Runtime and TVM.

Every variant is built first (a tuned one twice: the second compile shows the database's reuse), then all are timed
in one process with :func:`kiln.bench.interleaved.time_interleaved`: rounds in which each variant runs ``--block``
calls in a row after one untimed call, the starting variant rotating (ONNX Runtime's worker threads spin after a
call and would take the cores from the next variant's threads). EfficientNet runs batch 1, MiniLM batch 1 x 128
tokens, SmolLM2 (``--models smollm2-135m``) a prefill of 1 x 512 tokens. Prints one JSON line per build and a
markdown table at the end: median and p90 ms, the ratio to ONNX Runtime, build and tuning seconds, trials.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import kiln
from kiln import zoo
from kiln.bench.interleaved import time_interleaved
from kiln.compiler.recipes import parse
from kiln.targets.ort.runner import make_session

SHAPES = {
    "efficientnet-lite0": {"batch": 1},
    "minilm-l6": {"batch": 1, "seq": 128},
    "smollm2-135m": {"batch": 1, "seq": 512},  # a prefill of 512 tokens (the zoo's verification windows)
}
#: SmolLM2's 538 MB of fp32 weights are over the target's default limit (256 MB).
MAX_WEIGHT_MB = 1024
RECIPE = 'target = "tvm-llvm"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 0.999\n'
#: The int8 recipes of ``--int8``: TARGET and QUANTIZE (the quantization pass) are filled in.
_INT8_TEMPLATE = """target = "TARGET"
[[passes]]
name = "cleanup.optimize"
[[passes]]
QUANTIZE
[verify]
min_output_cosine = 0.97
"""
#: kiln's int8-static recipe (QDQ, min-max calibration).
INT8_RECIPE = _INT8_TEMPLATE.replace("QUANTIZE", 'name = "quantize.static-int8"\noptions = { method = "minmax" }')
#: kiln's int8-dynamic recipe (DynamicQuantizeMatMul).
DYNAMIC_RECIPE = _INT8_TEMPLATE.replace("QUANTIZE", 'name = "quantize.dynamic-int8"')


def _build(name: str, out: Path, trials: int, time_budget: float) -> dict:
    options = {"dims": SHAPES[name], "trials": trials, "time_budget_s": time_budget, "max_weight_mb": MAX_WEIGHT_MB}
    start = time.perf_counter()
    result = kiln.compile_model(name, out, parse(RECIPE, name="tvm"), verify_limit=1, target_options=options)
    target = result.report["target"]
    tuning = target.get("tuning", {})
    return {
        "build_s": round(time.perf_counter() - start, 1),
        "tuning_s": round(tuning.get("seconds", 0.0), 1),
        "trials": tuning.get("trials", 0),
        "tuned_tasks": tuning.get("tuned_tasks"),
        "reused_tasks": tuning.get("reused_tasks"),
        "scheduled": target.get("scheduled_functions"),
        "cosine": min(o["cosine"] for o in result.verification.to_dict()["outputs"].values()),
    }


def _build_int8(name: str, out: Path, target: str, integer: bool, recipe_text: str = INT8_RECIPE) -> dict:
    """kiln's int8-static (or another int8 recipe's) output for ``target`` (ort-cpu, or tvm-llvm with or without
    integer matmuls and convolutions)."""
    options = {"dims": SHAPES[name], "integer_qdq": integer} if target.startswith("tvm") else None
    recipe = parse(recipe_text.replace("TARGET", target), name="int8")
    start = time.perf_counter()
    result = kiln.compile_model(name, out, recipe, verify_limit=1, target_options=options, accept_out_of_tolerance=True)
    lowered = result.report["target"].get("lowered", {})
    return {
        "build_s": round(time.perf_counter() - start, 1),
        "integer_matmuls": lowered.get("QDQ MatMul", 0) + lowered.get("DynamicQuantizeMatMul", 0),
        "integer_convs": lowered.get("QDQ Conv", 0),
        "cosine": min(o["cosine"] for o in result.verification.to_dict()["outputs"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="efficientnet-lite0,minilm-l6")
    parser.add_argument("--trials", default="", help="comma-separated trial budgets (none: kiln's schedules only)")
    parser.add_argument("--time-budget", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also kiln's int8-static (ONNX Runtime's int8 kernels, TVM integer matmuls and convolutions, TVM "
        "dequantize-then-float) and int8-dynamic (ONNX Runtime, TVM)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    budgets = [int(t) for t in args.trials.split(",") if t]
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            feed = {k: v[:1] for k, v in zoo.get(name).verification_feeds(limit=1)[0].items()}
            session = make_session(zoo.export(name), threads=2)
            runs: dict[str, Callable[[], object]] = {"ort fp32": lambda s=session, f=feed: s.run(None, f)}
            builds: dict[str, dict] = {}
            configs = [("tvm, kiln schedules (untuned)", 0, "first")]
            configs += [(f"tvm tuned {t}{suffix}", t, suffix) for t in budgets for suffix in ("", ", second compile")]
            for label, trials, _ in configs:
                out = Path(tmp) / f"{name}-{len(builds)}"
                builds[label] = _build(name, out, trials, args.time_budget)
                print(json.dumps({"model": name, "config": label, **builds[label]}), flush=True)
                runner = kiln.targets.load(out)
                runs[label] = lambda r=runner, f=feed: r(f)
            int8 = [("int8 ort", "ort-cpu", False, INT8_RECIPE), ("int8 tvm, integer", "tvm-llvm", True, INT8_RECIPE)]
            int8 += [("int8 tvm, dequantize-then-float", "tvm-llvm", False, INT8_RECIPE)]
            int8 += [("int8-dynamic ort", "ort-cpu", False, DYNAMIC_RECIPE)]
            int8 += [("int8-dynamic tvm", "tvm-llvm", True, DYNAMIC_RECIPE)]
            for label, target, integer, recipe_text in int8 if args.int8 else []:
                out = Path(tmp) / f"{name}-{len(builds)}"
                builds[label] = _build_int8(name, out, target, integer, recipe_text)
                print(json.dumps({"model": name, "config": label, **builds[label]}), flush=True)
                runner = kiln.targets.load(out)
                runs[label] = lambda r=runner, f=feed: r(f)
            latency = time_interleaved(runs, warmup=1, repeats=args.rounds, block=args.block)
            tables.append((name, runs, builds, latency))
    print(f"\nTVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}, {args.rounds} rounds x {args.block} calls\n")
    print("| model | config | median ms | p90 ms | x ORT | build s | tuning s | trials | min cosine |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs, builds, latency in tables:
        ort = latency["ort fp32"].median_ms
        for label in runs:
            lat, b = latency[label], builds.get(label, {})
            print(
                f"| {name} | {label} | {lat.median_ms:.2f} | {lat.p90_ms:.2f} | {lat.median_ms / ort:.2f} "
                f"| {b.get('build_s', '')} | {b.get('tuning_s', '')} | {b.get('trials', '')} | {b.get('cosine', '')} |"
            )


if __name__ == "__main__":
    main()
