"""TVM vs ONNX Runtime fp32 latency on zoo models: untuned (dlight), tuned, and the second compile's tuning time.

Usage: ``python tools/tvm_bench.py [--models efficientnet-lite0,minilm-l6] [--trials 200] [--time-budget 600]``.
Latency is the median of ``--runs`` single-batch calls (EfficientNet batch 1, MiniLM batch 1 x 128 tokens).
Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import kiln
from kiln import zoo
from kiln.compiler.recipes import parse
from kiln.targets.ort.runner import OrtRunner

SHAPES = {"efficientnet-lite0": {"batch": 1}, "minilm-l6": {"batch": 1, "seq": 128}}
RECIPE = 'target = "tvm-llvm"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 0.999\n'


def _latency_ms(runner, feed, runs: int) -> float:
    runner(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(feed)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _first_row(feed: dict) -> dict:
    return {k: v[:1] for k, v in feed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="efficientnet-lite0,minilm-l6")
    parser.add_argument("--trials", default="200", help="comma-separated trial budgets")
    parser.add_argument("--time-budget", type=float, default=0.0)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = zoo.export(name)
            feed = _first_row(zoo.get(name).verification_feeds(limit=1)[0])
            ort_ms = _latency_ms(OrtRunner.from_path(path), feed, args.runs)
            rows.append({"model": name, "config": "ort fp32", "ms": ort_ms})
            print(json.dumps(rows[-1]), flush=True)
            configs = [("tvm untuned (dlight)", 0)] + [(f"tvm tuned {t}", int(t)) for t in args.trials.split(",")]
            for label, trials in configs:
                options = {"dims": SHAPES[name], "trials": trials, "time_budget_s": args.time_budget}
                for attempt in ("first", "second") if trials else ("first",):
                    out = Path(tmp) / f"{name}-{trials}-{attempt}"
                    start = time.perf_counter()
                    result = kiln.compile_model(
                        name, out, parse(RECIPE, name="tvm"), verify_limit=1, target_options=options
                    )
                    seconds = time.perf_counter() - start
                    tuning = result.report["target"].get("tuning", {})
                    row = {
                        "model": name,
                        "config": label + ("" if attempt == "first" else " (second compile)"),
                        "compile_s": round(seconds, 1),
                        "tuning_s": round(tuning.get("seconds", 0.0), 1),
                        "trials": tuning.get("trials", 0),
                        "tasks": tuning.get("tasks"),
                        "tuned_tasks": tuning.get("tuned_tasks"),
                        "reused_tasks": tuning.get("reused_tasks"),
                        "cosine": min(o["cosine"] for o in result.verification.to_dict()["outputs"].values()),
                    }
                    row["ms"] = _latency_ms(kiln.targets.load(out), feed, args.runs)
                    row["vs_ort"] = round(row["ms"] / ort_ms, 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"{'model':20} {'config':40} {'ms':>9} {'x ORT':>7} {'tuning s':>9} {'trials':>7}")
    for r in rows:
        print(
            f"{r['model']:20} {r['config']:40} {r['ms']:9.2f} {r.get('vs_ort', 1.0):7.2f} "
            f"{r.get('tuning_s', 0):9.1f} {r.get('trials', 0):7}"
        )


if __name__ == "__main__":
    main()
